"""PASCAL VOC2007 detection evaluation, scored as the devkit does it (py-faster-rcnn's port, bit for bit).

This is the algorithm of the VOC devkit's ``VOCevaldet.m`` as ported in py-faster-rcnn's / pcl's ``voc_eval.py``
(``use_07_metric=True``), on the project's box convention (0-based continuous ``x1, y1, x2, y2``; see
docs/architecture.md), where ``torchvision.ops.box_iou`` equals the devkit's "+1" IoU:

* per class, detections of all images are sorted by decreasing score (stable sort, so ties keep input order);
* each detection is matched to the ground truth of its class in its image with the largest IoU; it is a true
  positive when that IoU is ``> 0.5`` (strictly) and that ground truth is not yet matched; a second detection of
  an already matched ground truth is a false positive (duplicate);
* when the best-overlapping ground truth is ``difficult`` the detection is neither true nor false positive;
  difficult objects do not count in the number of positives ``n_gt``;
* AP is the 11-point interpolated average precision (VOC2007) or, with ``use_07_metric=False``, the area under
  the monotone (interpolated) precision/recall curve (VOC2010+ "all-point" AP).

The 11 recall thresholds are ``np.arange(0.0, 1.1, 0.1)`` as in py-faster-rcnn, bit for bit (so ``0.3`` there is
``0.30000000000000004``); a recall of exactly 3/10 therefore does not reach the 0.3 threshold, as in the
reference implementation.

Where py-faster-rcnn and the MATLAB devkit differ we follow py-faster-rcnn (and docs/method.md, issue 6): a true
positive needs IoU ``> 0.5``, where ``VOCevaldet.m`` tests ``ovmax >= VOCopts.minoverlap``, and the thresholds
are numpy's ``arange`` values rather than MATLAB's ``0:0.1:1`` (whose elements may differ in the last bit). The
results can differ only when an IoU is exactly 0.5, or a recall such as 3/10 lies within a rounding error of a
threshold.

A class with no non-difficult ground truth in the evaluated images has ``ap = NaN`` and is left out of the mAP
(the devkit would divide by zero); a class with ground truth and no detections has ``ap = 0``.

The VOC results files ``comp4_det_test_<class>.txt`` (one line ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>``,
1-based inclusive pixel coordinates, as the devkit reads them) are written and read by :func:`write_voc_results`
and :func:`read_voc_results`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torchvision.ops import box_iou

from .io import atomic_path, write_text

log = logging.getLogger(__name__)

DET_COLUMNS = ["image_id", "class", "score", "x1", "y1", "x2", "y2"]
BOX = ["x1", "y1", "x2", "y2"]


@dataclass
class ClassResult:
    """Matching result of one class: per-detection flags in score order, and the PR curve."""

    cls: str
    n_gt: int  # non-difficult ground truths
    n_difficult: int
    scores: np.ndarray  # sorted, decreasing
    tp: np.ndarray  # 0/1 per detection in score order
    fp: np.ndarray  # 0/1 per detection (a detection on a difficult GT has tp = fp = 0)
    recall: np.ndarray
    precision: np.ndarray
    ap: float

    @property
    def n_det(self) -> int:
        return int(len(self.scores))


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """Average precision from a recall/precision curve (detections in decreasing score order).

    ``use_07_metric``: VOC2007 11-point interpolation (mean over t in 0, 0.1, ..., 1 of the max precision at
    recall >= t); else the all-point area under the precision envelope (VOC2010+).
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = recall >= t
            p = float(np.max(precision[above])) if above.any() else 0.0
            ap += p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; has {list(df.columns)}")


def match_class(dets: pd.DataFrame, objects: pd.DataFrame, cls: str, iou_thresh: float = 0.5,
                use_07_metric: bool = True) -> ClassResult:
    """Match the detections of one class to its ground truth, devkit rules; see the module docstring.

    ``dets``: rows of ``image_id, score, x1..y2`` (other classes are filtered out if a ``class`` column exists);
    ``objects``: ground truth ``image_id, class, x1..y2, difficult``.
    """
    if "class" in dets.columns:
        dets = dets[dets["class"] == cls]
    gt = objects[objects["class"] == cls]
    difficult_all = gt["difficult"].to_numpy().astype(bool) if "difficult" in gt.columns else np.zeros(len(gt), bool)
    n_gt = int((~difficult_all).sum())

    # ground truth per image: boxes, difficult flags, "already detected" flags
    gt_by_image: dict[str, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
    gt_ids = gt["image_id"].astype(str).to_numpy()
    gt_boxes = gt[BOX].to_numpy(dtype=np.float64)
    for image_id in np.unique(gt_ids):
        sel = gt_ids == image_id
        gt_by_image[image_id] = (torch.from_numpy(gt_boxes[sel]), difficult_all[sel], np.zeros(int(sel.sum()), bool))

    scores = dets["score"].to_numpy(dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    det_ids = dets["image_id"].astype(str).to_numpy()[order]
    det_boxes = torch.from_numpy(dets[BOX].to_numpy(dtype=np.float64)[order])
    nd = len(order)
    tp = np.zeros(nd)
    fp = np.zeros(nd)

    # IoU of every detection with the GT of its image, computed per image in one call
    best_iou = np.full(nd, -np.inf)
    best_j = np.full(nd, -1, dtype=np.int64)
    for image_id in np.unique(det_ids):
        if image_id not in gt_by_image:
            continue
        sel = np.where(det_ids == image_id)[0]
        iou = box_iou(det_boxes[sel], gt_by_image[image_id][0]).numpy()
        best_j[sel] = iou.argmax(axis=1)  # first maximum, as np.argmax in the reference
        best_iou[sel] = iou.max(axis=1)

    for d in range(nd):  # sequential: matching depends on the order
        if best_iou[d] > iou_thresh:
            _, difficult, detected = gt_by_image[det_ids[d]]
            j = best_j[d]
            if difficult[j]:
                continue
            if not detected[j]:
                tp[d] = 1.0
                detected[j] = True
            else:
                fp[d] = 1.0
        else:
            fp[d] = 1.0

    ctp = np.cumsum(tp)
    cfp = np.cumsum(fp)
    if n_gt > 0:
        recall = ctp / float(n_gt)
    else:
        recall = np.full(nd, np.nan)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    ap = voc_ap(recall, precision, use_07_metric) if n_gt > 0 else float("nan")
    return ClassResult(cls, n_gt, int(difficult_all.sum()), scores, tp, fp, recall, precision, ap)


def evaluate_detections(dets_df: pd.DataFrame, objects_df: pd.DataFrame, classes: Sequence[str],
                        iou_thresh: float = 0.5, use_07_metric: bool = True,
                        image_ids: Iterable[str] | None = None,
                        return_curves: bool = False):
    """Per-class AP and mAP of detections against ground truth, VOC devkit rules.

    ``dets_df``: ``image_id, class, score, x1, y1, x2, y2`` (0-based continuous boxes of the original image).
    ``objects_df``: ``image_id, class, x1, y1, x2, y2, difficult`` (the manifest's objects).
    ``image_ids``: the evaluated image set (e.g. the test split). When given, ground truth of other images is
    ignored and a detection on an image outside it is an error (as in the devkit); when ``None`` the set is
    every image in either table.

    Returns ``(table, mAP)``: ``table`` has one row per class with ``class, ap, n_gt, n_difficult, n_det, n_tp,
    n_fp``; ``mAP`` is the mean AP over classes with ground truth (NaN classes left out). With
    ``return_curves`` also a dict ``class -> ClassResult`` (recall/precision for plots).
    """
    _check_columns(dets_df, DET_COLUMNS, "detections")
    _check_columns(objects_df, ["image_id", "class"] + BOX, "ground-truth objects")
    objects = objects_df
    if "difficult" not in objects.columns:
        objects = objects.assign(difficult=False)
    if image_ids is not None:
        ids = set(map(str, image_ids))
        outside = sorted(set(dets_df["image_id"].astype(str)) - ids)
        if outside:
            raise ValueError(f"detections: {len(outside)} image(s) are not in the evaluated image set, "
                             f"e.g. {outside[:3]}")
        objects = objects[objects["image_id"].astype(str).isin(ids)]
    unknown = sorted(set(dets_df["class"]) - set(classes))
    if unknown:
        raise ValueError(f"detections: unknown class(es) {unknown}; classes are {list(classes)}")
    if len(dets_df) and not np.isfinite(dets_df[["score"] + BOX].to_numpy(dtype=np.float64)).all():
        raise ValueError("detections: non-finite score or box values")

    rows, curves = [], {}
    for cls in classes:
        r = match_class(dets_df, objects, cls, iou_thresh, use_07_metric)
        curves[cls] = r
        rows.append((cls, r.ap, r.n_gt, r.n_difficult, r.n_det, int(r.tp.sum()), int(r.fp.sum())))
    table = pd.DataFrame(rows, columns=["class", "ap", "n_gt", "n_difficult", "n_det", "n_tp", "n_fp"])
    valid = table["ap"].notna()
    mean_ap = float(table.loc[valid, "ap"].mean()) if valid.any() else float("nan")
    if return_curves:
        return table, mean_ap, curves
    return table, mean_ap


# --------------------------------------------------------------------------------------------- results files
def results_filename(cls: str, comp: str = "comp4", image_set: str = "test") -> str:
    """The devkit's results-file name ``<comp>_det_<image_set>_<class>.txt``."""
    return f"{comp}_det_{image_set}_{cls}.txt"


def write_voc_results(dets_df: pd.DataFrame, out_dir: str | os.PathLike, classes: Sequence[str],
                      comp: str = "comp4", image_set: str = "test") -> list[Path]:
    """Write one devkit results file per class (also for classes without detections, as the devkit expects).

    Each line is ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>`` in the devkit's 1-based inclusive pixel
    coordinates: ``xmin = x1 + 1, xmax = x2`` (the inverse of pipeline.voc's XML conversion).
    """
    _check_columns(dets_df, DET_COLUMNS, "detections")
    out_dir = Path(out_dir)
    paths = []
    for cls in classes:
        d = dets_df[dets_df["class"] == cls]
        lines = [f"{i} {s:.6f} {x1 + 1:.2f} {y1 + 1:.2f} {x2:.2f} {y2:.2f}\n"
                 for i, s, x1, y1, x2, y2 in zip(d["image_id"].astype(str), d["score"], d["x1"], d["y1"],
                                                 d["x2"], d["y2"])]
        path = out_dir / results_filename(cls, comp, image_set)
        write_text(path, "".join(lines))
        paths.append(path)
    return paths


def read_voc_results(path: str | os.PathLike, cls: str | None = None) -> pd.DataFrame:
    """Read one devkit results file back into ``image_id, class, score, x1..y2`` (0-based continuous boxes).

    ``cls`` defaults to the class in the file name ``..._det_<set>_<class>.txt``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results file not found")
    if cls is None:
        stem = path.stem
        if "_det_" not in stem or stem.count("_") < 3:
            raise ValueError(f"{path}: cannot tell the class from the name; expected <comp>_det_<set>_<class>.txt")
        cls = stem.split("_", 3)[3]
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise ValueError(f"{path}:{n}: expected 6 fields '<image_id> <score> <xmin> <ymin> <xmax> <ymax>', "
                             f"got {len(parts)}")
        try:
            s, xmin, ymin, xmax, ymax = map(float, parts[1:])
        except ValueError:
            raise ValueError(f"{path}:{n}: non-numeric score or coordinate in {line.strip()!r}") from None
        rows.append((parts[0], cls, s, xmin - 1.0, ymin - 1.0, xmax, ymax))
    return pd.DataFrame(rows, columns=DET_COLUMNS).astype({"image_id": str, "class": str})


def read_voc_results_dir(out_dir: str | os.PathLike, classes: Sequence[str], comp: str = "comp4",
                         image_set: str = "test") -> pd.DataFrame:
    """Read every class's results file of a directory into one detections table."""
    frames = [read_voc_results(Path(out_dir) / results_filename(c, comp, image_set), c) for c in classes]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=DET_COLUMNS)


# ------------------------------------------------------------------------------------------------------ plots
def plot_pr_curves(curves: dict[str, ClassResult], path: str | os.PathLike, title: str = "") -> Path:
    """One PNG with the precision/recall curve of every class (AP in the legend), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    cols = min(5, max(1, n))
    rows = int(np.ceil(n / cols)) if n else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False)
    for ax, (cls, r) in zip(axes.ravel(), curves.items()):
        if r.n_det and r.n_gt:
            ax.plot(r.recall, r.precision, lw=1.2)
            env = np.maximum.accumulate(r.precision[::-1])[::-1]
            ax.plot(r.recall, env, lw=0.8, ls="--", color="gray")
        ap = "n/a" if np.isnan(r.ap) else f"{100 * r.ap:.1f}"
        ax.set_title(f"{cls}  AP {ap}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)
