"""Localisation metrics of pseudo boxes (and, later, of detections on trainval), as in docs/method.md.

Tables:

* ``boxes``: ``image_id, class, x1, y1, x2, y2[, score][, object_index]`` (0-based continuous boxes;
  ``object_index`` >= 0 names the object a click box was made for, -1 / missing when unknown);
* ``objects``: :data:`pipeline.voc.OBJECT_COLUMNS` (ground truth).

A box is **correct** when its IoU (``torchvision.ops.box_iou``; our boxes make it equal to the VOC devkit's "+1"
IoU) with some ground-truth box of its class in its image is ``>= iou_threshold`` (0.5).

* :func:`box_accuracy` ("box-CorLoc"): per class, the fraction of that class's boxes that are correct; the mean is
  over classes that have boxes.
* :func:`corloc`: per class, over images containing the class, whether the top-scoring box of that class in the
  image is correct (an image with the class but no such box is a miss); the mean is over classes present.
* :func:`mean_iou`: per class, the mean over its boxes of the IoU to the best ground truth of the class (0 when the
  image has none); :func:`clicked_iou` the IoU to the clicked object when ``object_index`` is known.

All values are fractions in 0..1 (reports print percentages).

**Difficult objects.** Matching always uses every ground-truth object, difficult ones included: a tight box on a
difficult object does localise an object of its class (ppengtang/pcl.pytorch ``dis_eval.py`` does the same).
``difficult="include"`` (default) also counts images whose only objects of a class are difficult in CorLoc, and
keeps every box. ``difficult="exclude"`` leaves such images out of CorLoc and drops from box accuracy / mean IoU
the boxes whose best-matching ground truth is difficult (they are neither right nor wrong, as in VOC AP).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torchvision.ops import box_iou

log = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5
DIFFICULT_POLICIES = ("include", "exclude")
BOX_COLUMNS = ["image_id", "class", "x1", "y1", "x2", "y2"]
_XY = ["x1", "y1", "x2", "y2"]


def _check(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} table lacks columns {missing} (has {list(df.columns)})")


def _check_difficult(difficult: str) -> None:
    if difficult not in DIFFICULT_POLICIES:
        raise ValueError(f"difficult must be one of {DIFFICULT_POLICIES}, got {difficult!r}")


def match_boxes(boxes: pd.DataFrame, objects: pd.DataFrame) -> pd.DataFrame:
    """For each box, the best ground truth of its class in its image.

    Returns a DataFrame aligned with ``boxes`` (same index): ``iou`` (0 when there is no such ground truth),
    ``object_index`` of the best one (-1 when none) and whether it is ``difficult``. One ``box_iou`` per image;
    classes are kept apart by shifting each class's boxes to its own x range (as batched NMS does).
    """
    _check(boxes, BOX_COLUMNS, "boxes")
    _check(objects, BOX_COLUMNS + ["object_index"], "objects")
    n = len(boxes)
    iou = np.zeros(n, dtype=np.float64)
    best_obj = np.full(n, -1, dtype=np.int64)
    best_diff = np.zeros(n, dtype=bool)
    if n and len(objects):
        b_img = boxes["image_id"].astype(str).to_numpy()
        o_img = objects["image_id"].astype(str).to_numpy()
        if not np.isin(b_img, o_img).any():
            log.warning("no box's image_id appears in the ground truth (ids read as numbers?)")
        classes = pd.Index(pd.unique(pd.concat([boxes["class"], objects["class"]], ignore_index=True)))
        b_cls = classes.get_indexer(boxes["class"]).astype(np.float64)
        o_cls = classes.get_indexer(objects["class"]).astype(np.float64)
        b_xy = boxes[_XY].to_numpy(np.float64, copy=True)
        o_xy = objects[_XY].to_numpy(np.float64, copy=True)
        span = max(b_xy[:, [0, 2]].max(), o_xy[:, [0, 2]].max()) - min(b_xy[:, [0, 2]].min(), o_xy[:, [0, 2]].min())
        shift = span + 1.0
        b_xy[:, [0, 2]] += (b_cls * shift)[:, None]
        o_xy[:, [0, 2]] += (o_cls * shift)[:, None]
        o_index = objects["object_index"].to_numpy(np.int64)
        o_diff = (objects["difficult"].astype(bool).to_numpy() if "difficult" in objects
                  else np.zeros(len(objects), bool))
        o_groups = pd.Series(np.arange(len(objects))).groupby(o_img).indices
        for img, bi in pd.Series(np.arange(n)).groupby(b_img).indices.items():
            oi = o_groups.get(img)
            if oi is None:
                continue
            m = box_iou(torch.from_numpy(b_xy[bi]), torch.from_numpy(o_xy[oi])).numpy()
            j = m.argmax(1)
            iou[bi] = m[np.arange(len(bi)), j]
            hit = iou[bi] > 0
            best_obj[bi[hit]] = o_index[oi[j[hit]]]
            best_diff[bi[hit]] = o_diff[oi[j[hit]]]
    return pd.DataFrame({"iou": iou, "object_index": best_obj, "difficult": best_diff}, index=boxes.index)


def _per_class(values: pd.Series, classes: Sequence[str] | None) -> tuple[pd.Series, float]:
    per = values.sort_index() if classes is None else values.reindex(list(classes))
    per.index.name = "class"
    return per, float(per.mean()) if per.notna().any() else float("nan")


def _scored_boxes(boxes, objects, difficult):
    _check_difficult(difficult)
    m = match_boxes(boxes, objects)
    keep = ~m["difficult"] if difficult == "exclude" else pd.Series(True, index=boxes.index)
    return m, keep


def box_accuracy(boxes: pd.DataFrame, objects: pd.DataFrame, iou_threshold: float = IOU_THRESHOLD,
                 classes: Sequence[str] | None = None, difficult: str = "include") -> tuple[pd.Series, float]:
    """Box-CorLoc: per class, the fraction of its boxes with IoU >= ``iou_threshold`` to a ground truth of the class
    in the same image; and the mean over classes that have boxes. ``classes`` orders the result (classes without
    boxes are NaN and left out of the mean)."""
    m, keep = _scored_boxes(boxes, objects, difficult)
    correct = (m["iou"] >= iou_threshold)[keep]
    return _per_class(correct.groupby(boxes["class"][keep]).mean().astype(float), classes)


def mean_iou(boxes: pd.DataFrame, objects: pd.DataFrame, classes: Sequence[str] | None = None,
             difficult: str = "include") -> tuple[pd.Series, float]:
    """Per class, the mean IoU of its boxes to the best ground truth of the class in the image (0 when none); and
    the mean over classes that have boxes."""
    m, keep = _scored_boxes(boxes, objects, difficult)
    return _per_class(m["iou"][keep].groupby(boxes["class"][keep]).mean(), classes)


def clicked_iou(boxes: pd.DataFrame, objects: pd.DataFrame) -> pd.Series:
    """IoU of each box to the object it was clicked for (``object_index`` >= 0); NaN where unknown or when the
    object is not in ``objects``. Aligned with ``boxes``."""
    _check(objects, BOX_COLUMNS + ["object_index"], "objects")
    out = pd.Series(np.nan, index=boxes.index, name="clicked_iou")
    if "object_index" not in boxes.columns or not len(boxes):
        return out
    b = boxes[["image_id", "object_index"] + _XY].copy()
    b["image_id"] = b["image_id"].astype(str)
    b["_row"] = np.arange(len(b))
    b = b[b["object_index"].fillna(-1).astype(np.int64) >= 0].astype({"object_index": np.int64})
    o = objects[["image_id", "object_index"] + _XY].copy()
    o["image_id"] = o["image_id"].astype(str)
    o = o.astype({"object_index": np.int64})
    pairs = b.merge(o, on=["image_id", "object_index"], suffixes=("", "_gt"))
    if len(pairs):
        a = torch.from_numpy(pairs[_XY].to_numpy(np.float64))
        g = torch.from_numpy(pairs[[c + "_gt" for c in _XY]].to_numpy(np.float64))
        lt, rb = torch.maximum(a[:, :2], g[:, :2]), torch.minimum(a[:, 2:], g[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        union = (a[:, 2:] - a[:, :2]).prod(1) + (g[:, 2:] - g[:, :2]).prod(1) - inter
        out.iloc[pairs["_row"].to_numpy()] = (inter / union.clamp(min=1e-12)).numpy()
    return out


def corloc(boxes: pd.DataFrame, objects: pd.DataFrame, iou_threshold: float = IOU_THRESHOLD,
           classes: Sequence[str] | None = None, difficult: str = "include",
           return_images: bool = False):
    """Standard CorLoc: per class, over the images containing that class, the fraction whose top-scoring box of
    the class (``score`` column; ties: first row) has IoU >= ``iou_threshold`` with a ground truth of the class.
    An image with the class and no box of it counts as a miss; boxes in images without the class are ignored.
    Returns ``(per_class, mean over classes present)``, plus the per-(image, class) table when ``return_images``.
    """
    _check(boxes, BOX_COLUMNS + ["score"], "boxes")
    _check_difficult(difficult)
    m = match_boxes(boxes, objects)
    b = pd.DataFrame({"image_id": boxes["image_id"].astype(str), "class": boxes["class"],
                      "score": boxes["score"].astype(float), "iou": m["iou"]})
    top = b.sort_values("score", ascending=False, kind="mergesort").drop_duplicates(["image_id", "class"])
    gt = objects
    if difficult == "exclude" and "difficult" in objects:
        gt = objects[~objects["difficult"].astype(bool)]
    present = pd.DataFrame({"image_id": gt["image_id"].astype(str), "class": gt["class"]}).drop_duplicates()
    res = present.merge(top, on=["image_id", "class"], how="left")
    res["correct"] = res["iou"].fillna(0.0) >= iou_threshold
    out = _per_class(res.groupby("class")["correct"].mean().astype(float), classes)
    return (*out, res) if return_images else out


def pseudo_box_metrics(boxes: pd.DataFrame, objects: pd.DataFrame, classes: Sequence[str] | None = None,
                       iou_threshold: float = IOU_THRESHOLD, difficult: str = "include") -> tuple[dict, pd.DataFrame]:
    """All metrics of a box table: ``(summary, per_class)``.

    ``summary``: ``box_accuracy`` (box-CorLoc, mean over classes), ``box_accuracy_all`` (over all boxes),
    ``corloc`` (needs ``score``; NaN without), ``mean_iou`` (mean over classes), ``mean_iou_all`` (over boxes),
    ``clicked_iou`` (mean over boxes with a known object, NaN when none), counts (``n_boxes``, ``n_images``,
    ``n_classes``; ``fallback`` and ``fallback_rate`` when the table has a ``fallback`` column) and the settings.
    ``per_class``: one row per class: ``class, boxes, images, box_accuracy, corloc, mean_iou, clicked_iou``.
    """
    _check_difficult(difficult)
    if classes is None:
        classes = sorted(set(boxes["class"]) | set(objects["class"]))
    m = match_boxes(boxes, objects)
    keep = ~m["difficult"] if difficult == "exclude" else pd.Series(True, index=boxes.index)
    ba, ba_mean = box_accuracy(boxes, objects, iou_threshold, classes, difficult)
    mi, mi_mean = mean_iou(boxes, objects, classes, difficult)
    if "score" in boxes.columns:
        cl, cl_mean = corloc(boxes, objects, iou_threshold, classes, difficult)
    else:
        cl, cl_mean = pd.Series(np.nan, index=ba.index), float("nan")
    ci = clicked_iou(boxes, objects)
    ci_cls = ci.groupby(boxes["class"]).mean().reindex(ba.index)
    gt = objects
    if difficult == "exclude" and "difficult" in objects:
        gt = objects[~objects["difficult"].astype(bool)]
    images = gt.drop_duplicates(["image_id", "class"]).groupby("class").size().reindex(ba.index).fillna(0)
    per_class = pd.DataFrame({
        "boxes": boxes.groupby("class").size().reindex(ba.index).fillna(0).astype(int),
        "images": images.astype(int),
        "box_accuracy": ba, "corloc": cl.reindex(ba.index), "mean_iou": mi.reindex(ba.index),
        "clicked_iou": ci_cls,
    }).rename_axis("class").reset_index()
    kept_iou = m["iou"][keep]
    summary = {
        "box_accuracy": ba_mean,
        "box_accuracy_all": float((kept_iou >= iou_threshold).mean()) if len(kept_iou) else float("nan"),
        "corloc": cl_mean,
        "mean_iou": mi_mean,
        "mean_iou_all": float(kept_iou.mean()) if len(kept_iou) else float("nan"),
        "clicked_iou": float(ci.mean()) if ci.notna().any() else float("nan"),
        "n_boxes": int(len(boxes)),
        "n_images": int(boxes["image_id"].nunique()),
        "n_classes": int(ba.notna().sum()),
        "iou_threshold": iou_threshold,
        "difficult": difficult,
    }
    if "fallback" in boxes.columns:
        fb = int(boxes["fallback"].astype(bool).sum())
        summary.update(fallback=fb, fallback_rate=fb / len(boxes) if len(boxes) else 0.0)
    return summary, per_class


#: object size bins of the by-size tables: the object's side relative to the image's, sqrt(box area / image area)
#: (as pipeline.report's size histogram), below 0.2 small, from 0.6 large (docs/experiments.md, "Where 56.0 fails")
SIZE_BINS = (0.2, 0.6)
SIZE_NAMES = ("small", "medium", "large")


def object_sizes(objects: pd.DataFrame, image_sizes: dict) -> pd.Series:
    """Each object's side relative to its image's: ``sqrt(box area / image area)``; ``image_sizes``: image id ->
    ``(width, height)``. Aligned with ``objects``; NaN for an image of unknown size."""
    wh = objects["image_id"].astype(str).map(lambda i: image_sizes.get(i, (np.nan, np.nan)))
    area = (objects["x2"] - objects["x1"]) * (objects["y2"] - objects["y1"])
    img = np.array([w * h for w, h in wh], dtype=np.float64) if len(wh) else np.zeros(0)
    return pd.Series(np.sqrt(area.to_numpy(np.float64) / img), index=objects.index, name="size")


def box_accuracy_by_size(boxes: pd.DataFrame, objects: pd.DataFrame, image_sizes: dict,
                         bins: Sequence[float] = SIZE_BINS, names: Sequence[str] = SIZE_NAMES,
                         iou_threshold: float = IOU_THRESHOLD, classes: Sequence[str] | None = None,
                         difficult: str = "include") -> pd.DataFrame:
    """Box-CorLoc (:func:`box_accuracy`, the mean over classes) of the boxes whose clicked object (``object_index``
    column, see :func:`pipeline.export.with_object_index`) falls in each size bin of :func:`object_sizes` (edges
    ``bins``: ``[0, b0)``, ``[b0, b1)``, ``[b1, inf)``). One row per bin: ``size, lo, hi, boxes, box_corloc,
    box_corloc_all`` (the plain fraction of correct boxes); boxes of no known object are left out."""
    if len(names) != len(bins) + 1:
        raise ValueError(f"{len(bins)} size edges need {len(bins) + 1} names, got {list(names)}")
    _check(boxes, BOX_COLUMNS + ["object_index"], "boxes")
    o = objects.assign(image_id=objects["image_id"].astype(str))
    size = object_sizes(o, image_sizes)
    key = pd.Series(size.to_numpy(), index=pd.MultiIndex.from_arrays([o["image_id"], o["object_index"].astype(int)]))
    key = key[~key.index.duplicated()]
    idx = pd.MultiIndex.from_arrays([boxes["image_id"].astype(str), boxes["object_index"].fillna(-1).astype(int)])
    b_size = pd.Series(key.reindex(idx).to_numpy(), index=boxes.index)
    correct = match_boxes(boxes, objects)["iou"] >= iou_threshold
    edges = [0.0, *bins, np.inf]
    rows = []
    for name, lo, hi in zip(names, edges[:-1], edges[1:]):
        sel = (b_size >= lo) & (b_size < hi)
        _, mean = box_accuracy(boxes[sel], objects, iou_threshold, classes, difficult) if sel.any() else (None, np.nan)
        rows.append({"size": name, "lo": lo, "hi": hi, "boxes": int(sel.sum()), "box_corloc": mean,
                     "box_corloc_all": float(correct[sel].mean()) if sel.any() else np.nan})
    return pd.DataFrame(rows)
