"""The dataset manifest: images, objects and clicks of one run, as tables later stages read.

``build_manifest`` reads a VOC<year> root (the embedded synthetic one or a real VOCdevkit), validates it and the
click file (or simulates clicks from ground truth); ``build_image_manifest`` reads a folder of images and a click
file, ground truth optional. Both return a :class:`Manifest`; ``Manifest.save/load`` keep it as CSV tables plus
``manifest.json``.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import clicks as clicks_mod
from .clickpairs import pair_clicks
from .imageio import ImageReadError, exif_orientation, image_size, read_image
from .io import read_json, write_csv, write_json
from .voc import OBJECT_COLUMNS, VOC_CLASSES, load_voc, parse_annotation

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")


@dataclass
class Manifest:
    images: pd.DataFrame       # image_id, split, width, height, path
    objects: pd.DataFrame      # pipeline.voc.OBJECT_COLUMNS
    clicks: pd.DataFrame       # click_id, image_id, class, x, y, annotator, object_index
    classes: tuple[str, ...]
    voc_root: str = ""
    report: dict = field(default_factory=dict)

    def split(self, split: str) -> pd.DataFrame:
        return self.images[self.images.split == split].reset_index(drop=True)

    def image_paths(self) -> dict[str, str]:
        return dict(zip(self.images.image_id, self.images.path))

    def image_labels(self) -> pd.DataFrame:
        """Image-level labels of the trainval images (``image_id, class``, one row per object or click): the classes
        of their ground-truth objects when the manifest has ground truth, else the classes clicked in them (a
        click says its class is present), so the image-label-only baseline also runs on a folder without boxes."""
        ids = set(self.split("trainval").image_id)
        source = self.objects if len(self.objects) else self.clicks
        return source[source.image_id.isin(ids)][["image_id", "class"]].reset_index(drop=True)

    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        write_csv(self.images, d / "images.csv")
        write_csv(self.objects, d / "objects.csv")
        write_csv(self.clicks, d / "clicks.csv")
        write_json(d / "manifest.json", {"classes": list(self.classes), "voc_root": self.voc_root,
                                         "report": self.report})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        d = Path(directory)
        meta = read_json(d / "manifest.json")
        images = pd.read_csv(d / "images.csv", dtype={"image_id": str})
        objects = pd.read_csv(d / "objects.csv", dtype={"image_id": str})
        clicks = pd.read_csv(d / "clicks.csv", dtype={"image_id": str})
        return cls(images, objects, clicks, tuple(meta["classes"]), meta.get("voc_root", ""), meta.get("report", {}))


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
class DatasetError(ValueError):
    """A dataset folder, ground-truth file or class list is unusable; the message names the file and problem."""


def infer_classes(objects: pd.DataFrame, voc_root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """VOC's 20 classes when every object class is one of them; the sorted classes found when none is (a dataset
    of its own classes in the VOC layout). A mix (some VOC names and some others, e.g. one misspelt ``persn``) is
    a :class:`DatasetError` naming the XML file and object of the first unknown name: pass the class list
    explicitly (``--classes``) if the names are meant."""
    found = set(objects["class"])
    if found <= set(VOC_CLASSES):
        return VOC_CLASSES
    if found & set(VOC_CLASSES):
        odd = objects[~objects["class"].isin(VOC_CLASSES)].iloc[0]
        where = Path(voc_root) / "Annotations" / f"{odd.image_id}.xml" if voc_root else odd.image_id
        unknown = sorted(found - set(VOC_CLASSES))
        raise DatasetError(f"{where}: object {int(odd.object_index)} has class {odd['class']!r}, not a VOC class, "
                           f"while the other objects use VOC's class names ({len(unknown)} unknown name(s): "
                           f"{unknown[:10]}); fix the name, or give the full class list with --classes")
    return tuple(sorted(found))


def scan_images(images_dir: str | os.PathLike) -> pd.DataFrame:
    """The images below ``images_dir`` (recursively; extensions :data:`IMAGE_EXTENSIONS`, any case), as
    ``image_id, path`` sorted by id. The image id is the path relative to ``images_dir`` without its extension,
    with ``/`` separators (``a/0001`` and ``b/0001`` are two images). Two files with one id (``x.jpg`` and
    ``x.png``) are a :class:`DatasetError` naming both."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    rows: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file() or path.name.startswith("."):
            continue
        image_id = path.relative_to(root).with_suffix("").as_posix()
        if image_id in rows:
            raise DatasetError(f"{root}: two images have the id {image_id!r}: {rows[image_id]} and {path}; "
                               "rename one")
        rows[image_id] = str(path.resolve())
    if not rows:
        raise DatasetError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return pd.DataFrame(sorted(rows.items()), columns=["image_id", "path"])


def read_ground_truth(gt: str | os.PathLike, images: pd.DataFrame, partial: bool = False) -> pd.DataFrame:
    """Ground-truth objects (:data:`pipeline.voc.OBJECT_COLUMNS`) of ``images`` (``image_id, width, height``) from
    ``gt``: a VOC ``Annotations/`` folder (``<gt>/<image_id>.xml``) or a COCO JSON file with boxes (its
    ``file_name`` matched to the image ids as click files are). Every image needs its annotation (a COCO image
    entry may have no boxes); a missing one, or an annotation whose image size differs from the image's, is a
    :class:`DatasetError` naming the file. ``partial=True`` (a calibration set: a few annotated images) skips the
    images without an annotation instead."""
    from .pointformats import read_coco_boxes, resolve_image_refs

    gt = Path(gt)
    sizes = {r.image_id: (int(r.width), int(r.height)) for r in images.itertuples(index=False)}
    rows = []
    if gt.is_dir():
        for image_id, (w, h) in sizes.items():
            xml = gt / f"{image_id}.xml"
            if not xml.is_file():
                if partial:
                    continue
                raise DatasetError(f"{xml}: ground-truth annotation of image {image_id} not found (--gt {gt} must "
                                   "annotate every image)")
            ann = parse_annotation(xml)
            if (ann.width, ann.height) != (w, h):
                raise DatasetError(f"{xml}: annotation says {ann.width}x{ann.height}, the image is {w}x{h}")
            rows += [(image_id, j, o.cls, o.x1, o.y1, o.x2, o.y2, o.difficult, o.truncated)
                     for j, o in enumerate(ann.objects)]
        return pd.DataFrame(rows, columns=OBJECT_COLUMNS)
    if not gt.is_file():
        raise DatasetError(f"{gt}: ground truth not found (a VOC Annotations/ folder or a COCO JSON file)")
    coco_images, coco_objects = read_coco_boxes(gt)
    refs = resolve_image_refs(list(coco_images.image_ref), list(sizes))
    ids = {}
    for ref, w, h in coco_images[["image_ref", "width", "height"]].itertuples(index=False):
        image_id = refs.get(ref)
        if image_id is None:
            continue  # an annotated image that is not in the folder
        if (int(w), int(h)) != sizes[image_id]:
            raise DatasetError(f"{gt}: image {ref!r} is {int(w)}x{int(h)} in the file, the image is "
                               f"{sizes[image_id][0]}x{sizes[image_id][1]}")
        ids[ref] = image_id
    missing = sorted(set(sizes) - set(ids.values()))
    if missing and not partial:
        raise DatasetError(f"{gt}: {len(missing)} image(s) of the folder have no entry in the COCO file "
                           f"(e.g. {missing[:5]}); --gt must annotate every image")
    objects = coco_objects[coco_objects.image_ref.isin(ids)].copy()
    objects.insert(0, "image_id", objects.pop("image_ref").map(ids))
    return objects[OBJECT_COLUMNS].sort_values(["image_id", "object_index"], kind="mergesort").reset_index(drop=True)


def verify_images(images: pd.DataFrame, on_bad_image: str = "error") -> tuple[pd.DataFrame, dict]:
    """Decode every image once (``read_image(verify=True)``). ``images`` has ``image_id, path`` and optionally
    ``width, height`` (what the annotation says); a missing ``width``/``height`` column is filled from the images.

    A missing, corrupt or size-mismatched image raises :class:`ImageReadError` (``on_bad_image="error"``) or is
    dropped and counted (``"skip"``). Images with an EXIF orientation tag are counted: their stored pixels are used
    (the frame annotation tools and the VOC devkit use). Returns ``(images kept, report)``."""
    images = images.copy()
    has_size = "width" in images.columns
    bad, rotated, sizes = {}, [], {}
    unique = images.drop_duplicates("image_id")
    for row in tqdm(unique.itertuples(index=False), total=len(unique), desc="check images", leave=False):
        try:
            img = read_image(row.path, bgr=True, verify=True)
            if has_size and img.shape[:2] != (row.height, row.width):
                raise ImageReadError(f"{row.path}: image is {img.shape[1]}x{img.shape[0]} but its annotation "
                                     f"says {row.width}x{row.height}")
            sizes[row.image_id] = (img.shape[1], img.shape[0])
            if (orientation := exif_orientation(row.path)) != 1:
                rotated.append(f"{row.path}: EXIF orientation {orientation}")
        except ImageReadError as e:
            if on_bad_image == "error":
                raise
            log.warning("skipping image: %s", e)
            bad[row.image_id] = str(e)
    images = images[~images.image_id.isin(bad)].reset_index(drop=True)
    if not has_size:
        images["width"] = [sizes[i][0] for i in images.image_id]
        images["height"] = [sizes[i][1] for i in images.image_id]
    if rotated:
        log.warning("%d image(s) carry an EXIF orientation tag (e.g. %s); their stored pixels are used, "
                    "unrotated: annotations and clicks are in the stored frame", len(rotated), rotated[0])
    report = {"bad_images": {"count": len(bad), "examples": list(bad.values())[:20]},
              "exif_rotated": {"count": len(rotated), "examples": rotated[:20]}}
    return images, report


def header_sizes(images: pd.DataFrame) -> pd.DataFrame:
    """``images`` with ``width, height`` read from each file's header (:func:`pipeline.imageio.image_size`)."""
    sizes = [image_size(p) for p in images.path]
    return images.assign(width=[w for w, _ in sizes], height=[h for _, h in sizes])


def build_manifest(voc_root: str | os.PathLike, clicks_path: str | os.PathLike | None = None,
                   splits: Sequence[str] = ("trainval", "test"), classes: Sequence[str] | None = None,
                   annotator: int | Sequence[int] = 1, on_bad_click: str = "error", on_bad_image: str = "error",
                   check_images: bool = True, click_sigma: float = 0.08, seed: int = 0,
                   clicks_format: str = "auto") -> Manifest:
    """Read and validate a VOC root and its clicks.

    - The first split's list must exist; a later one whose list is missing (a trainval-only root) is left out.
    - Annotation problems raise :class:`pipeline.voc.AnnotationError` naming the XML file and object.
    - With ``check_images`` every image is decoded once (:func:`verify_images`).
    - Clicks come from ``clicks_path`` (any :data:`pipeline.pointformats.POINT_FORMATS`, validated by
      :func:`pipeline.clicks.read_clicks` and :func:`check_clicks`), or are simulated from the trainval ground
      truth with ``click_sigma`` and ``seed`` when no file is given.
    - ``annotator``: one id (that annotator's clicks), or two (:func:`annotator_ids`): each object's two clicks
      are paired (:func:`pipeline.clickpairs.pair_clicks`); the clicks table then holds the pair's mean in ``x, y``
      and both clicks in :data:`pipeline.clickpairs.PAIR_COLUMNS`.
    """
    voc_root = Path(voc_root)
    images, objects = load_voc(voc_root, splits, classes)
    classes = tuple(classes) if classes else infer_classes(objects, voc_root)
    report: dict = {"source": "voc", "voc_root": str(voc_root), "splits": sorted(set(images.split))}
    if check_images:
        images, image_report = verify_images(images, on_bad_image)
        objects = objects[objects.image_id.isin(set(images.image_id))].reset_index(drop=True)
        report.update(image_report)
    trainval = images[images.split == "trainval"]
    if clicks_path:
        clicks, click_report = _read_clicks(clicks_path, images, classes, objects, annotator, on_bad_click,
                                            clicks_format)
    else:
        tv_objects = objects[objects.image_id.isin(set(trainval.image_id))]
        ids = annotator_ids(annotator)
        clicks = clicks_mod.simulate_clicks(tv_objects, sigma=click_sigma, annotators=max(ids), seed=seed)
        clicks = clicks[clicks.annotator.isin(ids)].reset_index(drop=True)
        click_report = {"source": "simulated", "sigma": click_sigma, "seed": seed, "kept": len(clicks),
                        "annotator": ids[0] if len(ids) == 1 else ids}
        if len(ids) == 2:
            clicks, click_report["pairs"] = pair_clicks(clicks, ids)
    return _manifest(images, objects, clicks, classes, click_report, report, str(voc_root.resolve()))


def build_image_manifest(images_dir: str | os.PathLike, clicks_path: str | os.PathLike,
                         gt: str | os.PathLike | None = None, classes: Sequence[str] | None = None,
                         annotator: int | Sequence[int] = 1, on_bad_click: str = "error",
                         on_bad_image: str = "error", check_images: bool = True, clicks_format: str = "auto") -> Manifest:
    """A folder of images (:func:`scan_images`) and a click file, ground truth optional (:func:`read_ground_truth`,
    used for metrics only).

    Image sizes are read from the images. The images with at least one usable click form the ``trainval`` split
    (the images the pseudo boxes are for); the others get split ``unclicked`` and are counted, never processed.
    Classes are ``classes`` when given (a click or ground-truth object of another class is an error naming the
    file and row/object), else the sorted classes of the clicks.
    """
    images = scan_images(images_dir)
    images.insert(1, "split", "trainval")
    report: dict = {"source": "images", "images_dir": str(Path(images_dir).resolve()),
                    "gt": str(gt) if gt else None}
    if check_images:
        images, image_report = verify_images(images, on_bad_image)
        report.update(image_report)
    else:
        images = header_sizes(images)
    images = images[["image_id", "split", "width", "height", "path"]]
    objects = read_ground_truth(gt, images) if gt else pd.DataFrame(columns=OBJECT_COLUMNS)
    clicks, click_report = _read_clicks(clicks_path, images, classes, objects if gt else None, annotator,
                                        on_bad_click, clicks_format)
    classes_given = bool(classes)
    classes = tuple(classes) if classes else tuple(sorted(set(clicks["class"])))
    if gt:
        odd = objects[~objects["class"].isin(classes)]
        if len(odd):
            o = odd.iloc[0]
            raise DatasetError(f"{gt}: image {o.image_id} object {int(o.object_index)} has class {o['class']!r}, "
                               f"which is not among the classes {list(classes)[:20]} (from "
                               f"{'--classes' if classes_given else 'the clicks'}); give the full class list "
                               "with --classes")
    clicked = set(clicks.image_id)
    images = images.assign(split=["trainval" if i in clicked else "unclicked" for i in images.image_id])
    return _manifest(images, objects, clicks, classes, click_report, report, "")


def _read_clicks(path, images, classes, objects, annotator, on_bad, fmt) -> tuple[pd.DataFrame, dict]:
    """Read the click file against the trainval images, keep ``annotator``'s clicks (an error listing the
    annotators present when it has none) and cross-check them against the ground truth (:func:`check_clicks`)."""
    trainval = images[images.split == "trainval"]
    sizes = {r.image_id: (int(r.width), int(r.height)) for r in trainval.itertuples(index=False)}
    split_of = dict(zip(images.image_id[images.split != "trainval"], images.split[images.split != "trainval"]))
    clicks, report = clicks_mod.read_clicks(path, sizes, classes, on_bad=on_bad, fmt=fmt, split_of=split_of)
    present = sorted(int(a) for a in clicks.annotator.unique())
    if not present:
        raise clicks_mod.ClickFileError(f"{path}: no usable click in the file ({report['rows']} rows, "
                                        f"{report['skipped']} skipped: {report['skipped_by_reason']})")
    ids = annotator_ids(annotator)
    absent = [a for a in ids if a not in present]
    if absent:
        raise clicks_mod.ClickFileError(
            f"{path}: no click of annotator {absent[0]}; annotators present: {present} "
            + ("(choose one with --annotator)" if len(ids) == 1 else "(choose two with --annotators)"))
    parts, checked = [], Counter()
    for a in ids:  # each annotator's clicks are checked on their own (two annotators may click alike)
        part, counts = check_clicks(clicks[clicks.annotator == a].reset_index(drop=True), objects, path, on_bad)
        parts.append(part)
        checked.update(counts)
    clicks = pd.concat(parts, ignore_index=True)
    report.update({"source": "file", "annotator": ids[0] if len(ids) == 1 else ids, "annotators_in_file": present,
                   "duplicates": checked["duplicates"], "bad_object_index": checked["bad_object_index"]})
    if len(ids) == 2:
        clicks, report["pairs"] = pair_clicks(clicks, ids)
    return clicks, report


def annotator_ids(annotator: int | Sequence[int]) -> list[int]:
    """``annotator`` as a list: one id (one click per object) or two distinct ids (a click pair per object,
    :func:`pipeline.clickpairs.pair_clicks`). ValueError otherwise."""
    ids = [int(annotator)] if np.isscalar(annotator) else [int(a) for a in annotator]
    if len(ids) not in (1, 2) or len(set(ids)) != len(ids):
        raise ValueError(f"annotators: one id or two distinct ids, got {ids}")
    return ids


def check_clicks(clicks: pd.DataFrame, objects: pd.DataFrame | None, path, on_bad: str = "error"
                 ) -> tuple[pd.DataFrame, dict]:
    """Cross-checks of one annotator's clicks: the same click twice (image, class, x, y), and, with ground truth
    (``objects``), an ``object_index`` that names no object of the image or an object of another class. Under
    ``on_bad="error"`` a :class:`pipeline.clicks.ClickFileError` naming the file, image and problem; under
    ``"skip"`` the click is dropped and counted (``duplicates``, ``bad_object_index``)."""
    dup = clicks.duplicated(["image_id", "class", "x", "y"], keep="first").to_numpy()
    bad_obj = np.zeros(len(clicks), dtype=bool)
    if objects is not None and len(clicks):
        known = {(i, int(j)): c for i, j, c in objects[["image_id", "object_index", "class"]].itertuples(index=False)}
        for k, (image_id, cls, idx) in enumerate(clicks[["image_id", "class", "object_index"]].itertuples(
                index=False)):
            if idx >= 0 and known.get((image_id, int(idx))) != cls:
                bad_obj[k] = True
                if on_bad == "error":
                    what = (f"object {idx} of image {image_id} is a {known[(image_id, int(idx))]!r}"
                            if (image_id, int(idx)) in known else f"image {image_id} has no object {idx}")
                    raise clicks_mod.ClickFileError(f"{path}: a {cls!r} click names object_index {idx}, but {what} "
                                                    "in the ground truth")
    if dup.any() and on_bad == "error":
        r = clicks[dup].iloc[0]
        raise clicks_mod.ClickFileError(f"{path}: duplicate click: image {r.image_id}, class {r['class']!r} at "
                                        f"({r.x:g}, {r.y:g}) appears twice ({int(dup.sum())} duplicate(s) in all)")
    if dup.any() or bad_obj.any():
        log.warning("%s: dropped %d duplicate click(s) and %d click(s) naming a wrong object", path, int(dup.sum()),
                    int(bad_obj.sum()))
    keep = ~(dup | bad_obj)
    return clicks[keep].reset_index(drop=True), {"duplicates": int(dup.sum()), "bad_object_index": int(bad_obj.sum())}


#: the split of the images :func:`hold_out` takes out of trainval
HOLDOUT_SPLIT = "holdout"


def hold_out(manifest: Manifest, n: int, seed: int) -> Manifest:
    """The manifest with ``n`` of its trainval images moved to split :data:`HOLDOUT_SPLIT`: an evaluation set with
    ground truth only. Their clicks are dropped, so nothing computed from clicks (pseudo boxes, the detector trained
    on them) sees these images; the ground-truth detector trains on the remaining trainval images alike. The images
    are a seeded choice (``seed``: the data seed) among the sorted trainval ids, so the split depends only on the
    ids, ``n`` and the seed. Needs ground truth; ``n`` must leave at least one trainval image."""
    if n <= 0:
        return manifest
    if not len(manifest.objects):
        raise DatasetError(f"a held-out evaluation split ({n} images) needs ground truth; this dataset has none "
                           "(give --gt with --images)")
    ids = np.array(sorted(set(manifest.split("trainval").image_id)), dtype=object)
    if n >= len(ids):
        raise DatasetError(f"cannot hold out {n} of the {len(ids)} trainval images: at least one must stay for "
                           "training")
    picked = set(ids[np.random.default_rng([int(seed), 26]).permutation(len(ids))[:n]])
    images = manifest.images.copy()
    images.loc[(images.split == "trainval") & images.image_id.isin(picked), "split"] = HOLDOUT_SPLIT
    dropped = manifest.clicks.image_id.isin(picked)
    clicks = manifest.clicks[~dropped].reset_index(drop=True)  # click ids stay those of the full run
    report = {**manifest.report, "holdout": {"images": int(n), "seed": int(seed), "clicks_dropped": int(dropped.sum())}}
    report["counts"] = {**report.get("counts", {}), "clicks": int(len(clicks)),
                        "images": {s: int((images.split == s).sum()) for s in sorted(set(images.split))}}
    log.info("held out %d trainval images (%d clicks dropped) as split %r", n, int(dropped.sum()), HOLDOUT_SPLIT)
    return Manifest(images, manifest.objects, clicks, manifest.classes, manifest.voc_root, report)


def _manifest(images, objects, clicks, classes, click_report, report, voc_root) -> Manifest:
    """Sort and number the clicks (``click_id``) and count what the manifest holds."""
    if clicks.empty:
        raise clicks_mod.ClickFileError(f"{click_report.get('file', 'simulated clicks')}: no usable click")
    clicks = clicks.sort_values(["image_id", "object_index", "class", "x", "y"], kind="mergesort")
    clicks = clicks.reset_index(drop=True)
    clicks.insert(0, "click_id", range(len(clicks)))
    trainval = images[images.split == "trainval"]
    click_report["images_without_clicks"] = len(set(trainval.image_id) - set(clicks.image_id))
    report["clicks"] = click_report
    report["ground_truth"] = bool(len(objects)) or report.get("source") == "voc"
    report["counts"] = {
        "images": {s: int((images.split == s).sum()) for s in sorted(set(images.split))},
        "objects": int(len(objects)),
        "clicks": int(len(clicks)),
        "classes": len(classes),
    }
    log.info("manifest: %s", report["counts"])
    return Manifest(images.reset_index(drop=True), objects.reset_index(drop=True), clicks, tuple(classes), voc_root,
                    report)
