"""Pseudo label files: the CSV table, a VOC ``Annotations/`` folder, COCO JSON, and their readers.

* ``pseudo_labels.csv``: :data:`pipeline.boxes.PSEUDO_COLUMNS` (``image_id, class, x1, y1, x2, y2, score, click_id,
  fallback, status``), boxes 0-based continuous (docs/architecture.md).
* VOC: one ``<image_id>.xml`` per image, written by :func:`pipeline.voc.write_annotation` (1-based inclusive,
  rounded to whole pixels), read back by :func:`pipeline.voc.parse_annotation`: a drop-in ``Annotations/`` folder.
* COCO (what mmdetection / detectron2 train from): ``images`` (``id`` 1.., ``file_name``, ``width``, ``height``
  and ``image_key``, our image id), ``annotations`` (``id`` 1.., ``image_id``, ``category_id``, ``bbox``
  ``[x, y, w, h]`` = ``[x1, y1, x2 - x1, y2 - y1]`` in continuous pixels, ``area = w * h``, ``iscrowd`` 0,
  ``score``), ``categories`` (``id`` = class index + 1, ``name``, ``supercategory``). :func:`read_coco` turns any
  COCO detection file (ours or external) back into a boxes table so other stages can train from it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .boxes import PSEUDO_COLUMNS, fallback_counts
from .io import write_csv, write_json, write_text
from .markdown import markdown_table
from .metrics import pseudo_box_metrics
from .voc import VOCObject, parse_annotation, write_annotation

REQUIRED_LABEL_COLUMNS = ["image_id", "class", "x1", "y1", "x2", "y2"]


class LabelFileError(ValueError):
    """A pseudo label / COCO file is missing or malformed; the message names the file and the problem."""


def _images_table(images: pd.DataFrame) -> pd.DataFrame:
    missing = {"image_id", "width", "height"} - set(images.columns)
    if missing:
        raise ValueError(f"images table lacks columns {sorted(missing)}")
    out = images.drop_duplicates("image_id").copy()
    out["image_id"] = out["image_id"].astype(str)
    return out.reset_index(drop=True)


# -- CSV ---------------------------------------------------------------------------------------------------
def write_pseudo_labels(boxes: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the pseudo label table (columns of :data:`PSEUDO_COLUMNS` that are present first, then the rest)."""
    missing = [c for c in REQUIRED_LABEL_COLUMNS if c not in boxes.columns]
    if missing:
        raise ValueError(f"pseudo label table lacks columns {missing}")
    cols = [c for c in PSEUDO_COLUMNS if c in boxes.columns]
    cols += [c for c in boxes.columns if c not in cols]
    return write_csv(boxes[cols], path)


def read_pseudo_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Read a pseudo label CSV (image ids stay strings); checks columns and boxes, naming the file and row."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"{path}: pseudo label file not found")
    df = pd.read_csv(path, dtype={"image_id": str, "class": str, "status": str})
    missing = [c for c in REQUIRED_LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise LabelFileError(f"{path}: lacks columns {missing} (has {list(df.columns)})")
    xy = df[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
    bad = ~np.isfinite(xy).all(1) | (xy[:, 2] <= xy[:, 0]) | (xy[:, 3] <= xy[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LabelFileError(f"{path}: row {i + 2} has a non-finite or empty box {xy[i].tolist()}")
    if "fallback" in df.columns:
        df["fallback"] = df["fallback"].astype(bool)
    return df


# -- VOC ---------------------------------------------------------------------------------------------------
def write_voc_annotations(boxes: pd.DataFrame, images: pd.DataFrame, out_dir: str | os.PathLike,
                          folder: str = "VOC2007", include_empty: bool = False,
                          with_scores: bool = False) -> list[Path]:
    """One VOC XML file per image under ``out_dir`` (the ``Annotations/`` folder) holding its pseudo boxes.

    ``images`` gives ``image_id, width, height``. Images without boxes get an object-less file only with
    ``include_empty``. ``with_scores`` writes each box's ``score`` column as the object's ``<score>`` (detections).
    Raises ValueError for a box of an image not in ``images``.
    """
    out_dir = Path(out_dir)
    imgs = _images_table(images).set_index("image_id")
    b = boxes.assign(image_id=boxes["image_id"].astype(str))
    unknown = sorted(set(b["image_id"]) - set(imgs.index))
    if unknown:
        raise ValueError(f"boxes of images not in the images table: {unknown[:5]}")
    groups = b.groupby("image_id", sort=False).indices
    ids = imgs.index if include_empty else [i for i in imgs.index if i in groups]
    written = []
    for image_id in ids:
        rows = b.iloc[groups[image_id]] if image_id in groups else b.iloc[:0]
        objs = [VOCObject(str(r["class"]), float(r.x1), float(r.y1), float(r.x2), float(r.y2),
                          score=float(r["score"]) if with_scores else None) for _, r in rows.iterrows()]
        w, h = int(imgs.at[image_id, "width"]), int(imgs.at[image_id, "height"])
        name = Path(imgs.at[image_id, "path"]).name if "path" in imgs.columns else None
        written.append(write_annotation(out_dir / f"{image_id}.xml", image_id, w, h, objs, folder=folder,
                                        filename=name))
    return written


def read_voc_annotations(ann_dir: str | os.PathLike, image_ids: Sequence[str] | None = None,
                         classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Boxes table (``image_id, class, x1..y2, difficult``) from a VOC ``Annotations/`` folder."""
    ann_dir = Path(ann_dir)
    paths = [ann_dir / f"{i}.xml" for i in image_ids] if image_ids is not None else sorted(ann_dir.glob("*.xml"))
    rows = []
    for p in paths:
        ann = parse_annotation(p, classes)
        rows += [(ann.image_id, o.cls, o.x1, o.y1, o.x2, o.y2, o.difficult) for o in ann.objects]
    return pd.DataFrame(rows, columns=["image_id", "class", "x1", "y1", "x2", "y2", "difficult"])


# -- COCO --------------------------------------------------------------------------------------------------
def to_coco(boxes: pd.DataFrame, images: pd.DataFrame, classes: Sequence[str],
            description: str = "clickscale pseudo labels") -> dict:
    """COCO detection dict of the boxes (see module docstring). Every image of ``images`` is listed."""
    imgs = _images_table(images)
    class_id = {c: i + 1 for i, c in enumerate(classes)}
    unknown = sorted(set(boxes["class"]) - set(class_id))
    if unknown:
        raise ValueError(f"boxes of classes not in the class list: {unknown}")
    image_id = {k: i + 1 for i, k in enumerate(imgs["image_id"])}
    b_img = boxes["image_id"].astype(str)
    missing = sorted(set(b_img) - set(image_id))
    if missing:
        raise ValueError(f"boxes of images not in the images table: {missing[:5]}")
    if "path" in imgs.columns:
        file_names = [Path(p).name for p in imgs["path"]]
    else:
        file_names = [f"{k}.jpg" for k in imgs["image_id"]]
    coco_images = [{"id": image_id[k], "file_name": f, "width": int(w), "height": int(h), "image_key": k}
                   for k, f, w, h in zip(imgs["image_id"], file_names, imgs["width"], imgs["height"])]
    xy = boxes[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
    wh = xy[:, 2:] - xy[:, :2]
    scores = boxes["score"].to_numpy(np.float64) if "score" in boxes.columns else np.ones(len(boxes))
    anns = []
    for k, (img, cls, (x1, y1, _, _), (w, h), s) in enumerate(zip(b_img, boxes["class"], xy, wh, scores)):
        anns.append({"id": k + 1, "image_id": image_id[img], "category_id": class_id[cls],
                     "bbox": [round(float(x1), 3), round(float(y1), 3), round(float(w), 3), round(float(h), 3)],
                     "area": round(float(w * h), 3), "iscrowd": 0, "score": round(float(s), 6)})
    cats = [{"id": i, "name": c, "supercategory": "object"} for c, i in class_id.items()]
    return {"info": {"description": description}, "licenses": [], "images": coco_images, "annotations": anns,
            "categories": cats}


def write_coco(path: str | os.PathLike, boxes: pd.DataFrame, images: pd.DataFrame, classes: Sequence[str],
               **kwargs) -> Path:
    return write_json(path, to_coco(boxes, images, classes, **kwargs))


def read_coco(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
    """Read a COCO detection JSON into ``(boxes, images, classes)``.

    ``boxes``: ``image_id, class, x1, y1, x2, y2, score, iscrowd`` (``image_id`` is the image's ``image_key``
    when present, else its file name without extension; ``score`` 1.0 when absent); ``images``: ``image_id, width,
    height, file_name``; ``classes`` in category id order. Raises :class:`LabelFileError` naming the file and the
    offending entry when the JSON is not a valid COCO detection file.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"{path}: COCO file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LabelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise LabelFileError(f"{path}: a COCO file needs the lists 'images', 'annotations' and 'categories'")
    cats = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise LabelFileError(f"{path}: category {c!r} lacks 'id' or 'name'")
        cats[int(c["id"])] = str(c["name"])
    classes = tuple(cats[i] for i in sorted(cats))
    key_of, img_rows = {}, []
    for im in data["images"]:
        try:
            iid, w, h = im["id"], int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError):
            raise LabelFileError(f"{path}: image entry {im!r} lacks a valid 'id', 'width' or 'height'") from None
        name = str(im.get("file_name", ""))
        key = str(im.get("image_key") or Path(name).stem or iid)
        if iid in key_of:
            raise LabelFileError(f"{path}: duplicate image id {iid}")
        key_of[iid] = key
        img_rows.append((key, w, h, name))
    rows = []
    for a in data["annotations"]:
        aid = a.get("id", "?") if isinstance(a, dict) else "?"
        try:
            iid, cid, bbox = a["image_id"], int(a["category_id"]), [float(v) for v in a["bbox"]]
        except (KeyError, TypeError, ValueError):
            raise LabelFileError(
                f"{path}: annotation {aid} lacks a valid 'image_id', 'category_id' or 'bbox'") from None
        if iid not in key_of:
            raise LabelFileError(f"{path}: annotation {aid} refers to unknown image id {iid}")
        if cid not in cats:
            raise LabelFileError(f"{path}: annotation {aid} refers to unknown category id {cid}")
        if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox) or bbox[2] <= 0 or bbox[3] <= 0:
            raise LabelFileError(f"{path}: annotation {aid} has an invalid bbox {a['bbox']!r} (need [x, y, w, h], "
                                 "w and h > 0)")
        x, y, w, h = bbox
        rows.append((key_of[iid], cats[cid], x, y, x + w, y + h, float(a.get("score", 1.0)),
                     int(a.get("iscrowd", 0))))
    boxes = pd.DataFrame(rows, columns=["image_id", "class", "x1", "y1", "x2", "y2", "score", "iscrowd"])
    images = pd.DataFrame(img_rows, columns=["image_id", "width", "height", "file_name"])
    return boxes, images, classes


def _json_safe(obj):
    """NaN/inf floats -> None (strict JSON), recursively."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
        return None
    return obj


# -- the stage's whole output ------------------------------------------------------------------------------
def export_pseudo_labels(out_dir: str | os.PathLike, boxes: pd.DataFrame, images: pd.DataFrame,
                         classes: Sequence[str], objects: pd.DataFrame | None = None,
                         clicks: pd.DataFrame | None = None, params: dict | None = None, load_map=None,
                         report: bool = True, report_images: int = 24, report_worst: int = 3, seed: int = 0,
                         difficult: str = "include") -> dict:
    """Write every output of the pseudo box stage into ``out_dir`` and return the contents of ``metrics.json``.

    ``pseudo_labels.csv``, ``Annotations/`` (VOC XML of the images with boxes), ``coco.json`` (all ``images``)
    (:func:`write_label_files`), ``metrics.json`` and ``per_class.csv`` (:func:`label_metrics`), ``summary.md``
    (:func:`summary_markdown`) and ``report/index.html`` (:mod:`pipeline.report`).
    ``objects`` must be the ground truth of exactly the evaluated images (e.g. the whole trainval split: an image
    with an object of a class but no box of it is a CorLoc miss); ``images`` (``image_id, width, height, path``)
    lists the images written to the VOC/COCO files.
    """
    out_dir = Path(out_dir)
    write_label_files(out_dir, boxes, images, classes)
    scored = with_object_index(boxes, clicks)
    gt = objects if objects is not None and len(objects) else None
    result, per_class = label_metrics(scored, gt, classes, params, difficult)
    if per_class is not None:
        write_csv(per_class, out_dir / "per_class.csv")
    write_json(out_dir / "metrics.json", _json_safe(result))
    if report:
        from .report import write_report  # matplotlib only when a report is asked for

        write_report(out_dir / "report", scored, images, gt, clicks, result.get("metrics"), per_class,
                     {**result["params"], "fallbacks": result["boxes"]}, load_map, n_grid=report_images,
                     n_worst=report_worst, seed=seed)
    write_text(out_dir / "summary.md", summary_markdown(boxes, result, per_class, report))
    return result


def write_label_files(out_dir: str | os.PathLike, boxes: pd.DataFrame, images: pd.DataFrame,
                      classes: Sequence[str]) -> None:
    """``pseudo_labels.csv``, ``Annotations/`` (VOC XML of the images with boxes) and ``coco.json`` (all
    ``images``) in ``out_dir``."""
    out_dir = Path(out_dir)
    write_pseudo_labels(boxes, out_dir / "pseudo_labels.csv")
    write_voc_annotations(boxes, images, out_dir / "Annotations")
    write_coco(out_dir / "coco.json", boxes, images, classes)


def with_object_index(boxes: pd.DataFrame, clicks: pd.DataFrame | None) -> pd.DataFrame:
    """``boxes`` with each click's ``object_index`` from ``clicks`` (for the clicked-object IoU), when it has
    none and ``clicks`` has it."""
    if clicks is not None and "object_index" in clicks.columns and "click_id" in boxes.columns \
            and "object_index" not in boxes.columns:
        return boxes.merge(clicks[["click_id", "object_index"]], on="click_id", how="left")
    return boxes


def label_metrics(boxes: pd.DataFrame, objects: pd.DataFrame | None, classes: Sequence[str],
                  params: dict | None = None, difficult: str = "include") -> tuple[dict, pd.DataFrame | None]:
    """``(metrics.json's content, per-class table or None)``: the parameters, the fallback counts and, with
    ground truth ``objects``, the metrics of :func:`pipeline.metrics.pseudo_box_metrics`."""
    result: dict = {"params": dict(params or {}), "boxes": fallback_counts(boxes)}
    if objects is None:
        return result, None
    result["metrics"], per_class = pseudo_box_metrics(boxes, objects, classes=classes, difficult=difficult)
    return result, per_class


def _pct(v: float) -> str:
    return "-" if not np.isfinite(v) else f"{100 * v:.1f}"


def summary_markdown(boxes: pd.DataFrame, result: dict, per_class: pd.DataFrame | None, report: bool) -> str:
    """The stage's ``summary.md``: counts, the metrics and their per-class table (with ground truth), the files."""
    summary = result.get("metrics")
    lines = [f"# pseudo boxes: {len(boxes)} boxes on {boxes['image_id'].nunique()} images, "
             f"{result['boxes']['fallback']} fallbacks", ""]
    if summary is not None:
        rows = [(r[0], r.boxes, r.images, _pct(r.corloc), _pct(r.box_accuracy), _pct(r.mean_iou))
                for r in per_class.itertuples(index=False)]
        lines += [f"CorLoc {100 * summary['corloc']:.1f}  box-CorLoc {100 * summary['box_accuracy']:.1f}  "
                  f"mean IoU {100 * summary['mean_iou']:.1f}", "",
                  markdown_table(["class", "boxes", "images", "CorLoc", "box-CorLoc", "mean IoU"], rows, "lrrrrr")]
    lines += ["", "Files (in this directory): pseudo_labels.csv, coco.json, Annotations/ (VOC XML), metrics.json"
              + (", per_class.csv" if summary is not None else "") + (", report/index.html" if report else "")]
    return "\n".join(lines) + "\n"
