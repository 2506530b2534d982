"""The dataset manifest: images, objects and clicks of one run, as tables later stages read.

``build_manifest`` reads a VOC<year> root (the embedded synthetic one or a real VOCdevkit), validates it and the
click file (or simulates clicks from ground truth), and returns a :class:`Manifest`; ``Manifest.save/load`` keep it
as CSV tables plus ``manifest.json``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
from tqdm import tqdm

from . import clicks as clicks_mod
from .imageio import ImageReadError, exif_orientation, read_image
from .io import read_json, write_csv, write_json
from .voc import VOC_CLASSES, load_voc

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


def infer_classes(objects: pd.DataFrame) -> tuple[str, ...]:
    """VOC's 20 classes when every object class is one of them, else the sorted classes found."""
    found = set(objects["class"])
    if found <= set(VOC_CLASSES):
        return VOC_CLASSES
    return tuple(sorted(found))


def build_manifest(voc_root: str | os.PathLike, clicks_path: str | os.PathLike | None = None,
                   splits: Sequence[str] = ("trainval", "test"), classes: Sequence[str] | None = None,
                   annotator: int = 1, on_bad_click: str = "error", on_bad_image: str = "error",
                   check_images: bool = True, click_sigma: float = 0.08, seed: int = 0) -> Manifest:
    """Read and validate a VOC root and its clicks.

    - Annotation problems raise :class:`pipeline.voc.AnnotationError` naming the XML file and object.
    - With ``check_images`` every image is decoded once: a missing or corrupt image, or one whose size
      disagrees with its XML, raises :class:`ImageReadError` (``on_bad_image="error"``) or drops the image and
      counts it (``"skip"``).
    - Clicks come from ``clicks_path`` (validated by :func:`pipeline.clicks.read_clicks`, ``on_bad_click``
      policy; only rows of ``annotator`` are kept when the file has several annotators), or are simulated from
      the trainval ground truth with ``click_sigma`` and ``seed`` when no file is given.
    """
    voc_root = Path(voc_root)
    images, objects = load_voc(voc_root, splits, classes)
    classes = tuple(classes) if classes else infer_classes(objects)
    report: dict = {"voc_root": str(voc_root), "splits": list(splits)}

    bad_images: list[str] = []
    rotated: list[str] = []  # EXIF orientation != 1: the stored pixels are used (the annotations' frame)
    if check_images:
        unique = images.drop_duplicates("image_id")
        for image_id, path, w, h in tqdm(unique[["image_id", "path", "width", "height"]].itertuples(index=False),
                                         total=len(unique), desc="check images", leave=False):
            try:
                img = read_image(path, bgr=True, verify=True)
                if img.shape[:2] != (h, w):
                    raise ImageReadError(f"{path}: image is {img.shape[1]}x{img.shape[0]} but its annotation "
                                         f"says {w}x{h}")
                if (orientation := exif_orientation(path)) != 1:
                    rotated.append(f"{path}: EXIF orientation {orientation}")
            except ImageReadError as e:
                if on_bad_image == "error":
                    raise
                log.warning("skipping image: %s", e)
                bad_images.append(str(e))
        if bad_images:
            bad_ids = {Path(m.split(":")[0]).stem for m in bad_images}
            images = images[~images.image_id.isin(bad_ids)].reset_index(drop=True)
            objects = objects[~objects.image_id.isin(bad_ids)].reset_index(drop=True)
    report["bad_images"] = {"count": len(bad_images), "examples": bad_images[:20]}
    if check_images:
        report["exif_rotated"] = {"count": len(rotated), "examples": rotated[:20]}
        if rotated:
            log.warning("%d image(s) carry an EXIF orientation tag (e.g. %s); their stored pixels are used, "
                        "unrotated: annotations and clicks are in the stored frame", len(rotated), rotated[0])

    trainval = images[images.split == "trainval"]
    if clicks_path:
        sizes = {r.image_id: (int(r.width), int(r.height)) for r in trainval.itertuples(index=False)}
        clicks, click_report = clicks_mod.read_clicks(clicks_path, sizes, classes, on_bad=on_bad_click)
        if clicks.annotator.nunique() > 1:
            clicks = clicks[clicks.annotator == annotator]
        click_report["source"] = "file"
    else:
        tv_objects = objects[objects.image_id.isin(set(trainval.image_id))]
        clicks = clicks_mod.simulate_clicks(tv_objects, sigma=click_sigma, annotators=1, seed=seed)
        click_report = {"source": "simulated", "sigma": click_sigma, "seed": seed, "kept": len(clicks)}
    clicks = clicks.sort_values(["image_id", "object_index", "class", "x", "y"], kind="mergesort")
    clicks = clicks.reset_index(drop=True)
    clicks.insert(0, "click_id", range(len(clicks)))
    no_clicks = sorted(set(trainval.image_id) - set(clicks.image_id))
    click_report["images_without_clicks"] = len(no_clicks)
    click_report["annotator"] = annotator
    report["clicks"] = click_report
    report["counts"] = {
        "images": {s: int((images.split == s).sum()) for s in splits},
        "objects": int(len(objects)),
        "clicks": int(len(clicks)),
        "classes": len(classes),
    }
    log.info("manifest: %s", report["counts"])
    return Manifest(images, objects, clicks, classes, str(voc_root.resolve()), report)
