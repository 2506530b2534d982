"""Stage 2: click-guided proposal selection (paper Sec. III-A).

For each click: keep the proposals that contain it (``x1 <= x <= x2 and y1 <= y <= y2``), rank them by the
Euclidean distance from their center to the click (ties: store order, which is lexicographic), walk the ranking
and drop a proposal whose IoU with an already kept one exceeds ``iou`` (greedy NMS with the ranking as score), and
keep the first ``n``. A click inside no proposal gets :func:`fallback_windows` instead (flagged ``fallback``).

``exclusive`` (an addition to the paper; off by default here, on in the pipeline: tasks/defaults.py): before
ranking, drop the proposals that also contain another click of the same class in the image: such a crop shows two
instances, and its CAM lights both, which merges them in the fused map of either click. When that would leave a
click no proposal, its proposals are kept as they are (counted as ``exclusion_waived`` in the report). Measured on
voc07-sample by ``bench/quality.py`` (docs/experiments.md).
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torchvision.ops import nms
from tqdm import tqdm

from .clicks import other_clicks

log = logging.getLogger(__name__)

SELECTED_COLUMNS = ["click_id", "image_id", "class", "x", "y", "rank", "x1", "y1", "x2", "y2", "fallback"]
#: scales of the fallback windows relative to the largest click-centred window inside the image
DEFAULT_FALLBACK_SCALES = (1.0, 0.75, 0.5, 0.25)


def contains_click(boxes: np.ndarray, x: float, y: float) -> np.ndarray:
    """Boolean mask of the boxes that contain the point ``(x, y)`` (borders included)."""
    b = np.asarray(boxes).reshape(-1, 4)
    return (b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])


def rank_by_center_distance(boxes: np.ndarray, x: float, y: float) -> tuple[np.ndarray, np.ndarray]:
    """``(order, distance)``: indices of ``boxes`` sorted by the distance of their center to the click (stable,
    so equal distances keep the input order) and the sorted distances."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    d = np.hypot((b[:, 0] + b[:, 2]) / 2 - x, (b[:, 1] + b[:, 3]) / 2 - y)
    order = np.argsort(d, kind="stable")
    return order, d[order]


def greedy_nms_ranked(boxes: np.ndarray, iou: float, n: int | None = None) -> np.ndarray:
    """Indices (into ``boxes``, which are already in rank order) of the boxes kept by walking the ranking and
    dropping a box whose IoU with an already kept one exceeds ``iou``; the first ``n`` of them.

    Runs ``torchvision.ops.nms`` with strictly decreasing scores, which is exactly this greedy walk.
    """
    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4))
    if len(b) == 0:
        return np.zeros(0, np.int64)
    scores = torch.arange(len(b), 0, -1, dtype=torch.float32)  # rank 0 has the highest score
    keep = nms(b, scores, float(iou)).numpy()
    keep = np.sort(keep)  # nms returns them by decreasing score = increasing rank already; be explicit
    return keep[:n] if n is not None else keep


def fallback_windows(x: float, y: float, width: int, height: int,
                     scales: Sequence[float] = DEFAULT_FALLBACK_SCALES, min_side: float = 2.0) -> np.ndarray:
    """Click-centred windows for a click that no proposal contains (Papadopoulos et al.'s initialisation).

    The first is the largest window centred on the click that fits in the image (half-width ``min(x, W - x)``,
    half-height ``min(y, H - y)``); the others are it scaled by ``scales`` about the click. A window narrower
    than ``min_side`` (a click on the border) is widened to ``min_side`` and clipped into the image.
    Returns float32 ``(len(scales), 4)``, largest first.
    """
    hw = min(x, width - x)
    hh = min(y, height - y)
    out = []
    for s in scales:
        a, b = max(hw * s, min_side / 2), max(hh * s, min_side / 2)
        out.append((max(0.0, x - a), max(0.0, y - b), min(float(width), x + a), min(float(height), y + b)))
    return np.asarray(out, np.float32).reshape(-1, 4)


def exclude_other_clicks(boxes: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(kept boxes, waived)``: the boxes that contain none of the points ``others`` (``(K, 2)`` x, y); all of them,
    with ``waived=True``, when every box contains one."""
    b = np.asarray(boxes).reshape(-1, 4)
    pts = np.asarray(others, np.float64).reshape(-1, 2)
    if len(b) == 0 or len(pts) == 0:
        return b, False
    hit = np.zeros(len(b), bool)
    for ox, oy in pts:
        hit |= contains_click(b, ox, oy)
    if hit.all():
        return b, True
    return b[~hit], False


def select_for_click(boxes: np.ndarray, x: float, y: float, width: int, height: int, n: int = 8,
                     iou: float = 0.7, fallback_scales: Sequence[float] = DEFAULT_FALLBACK_SCALES,
                     ) -> tuple[np.ndarray, bool]:
    """``(selected boxes (m, 4) float32 in rank order, fallback used)`` for one click, m <= n."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    cand = b[contains_click(b, x, y)]
    if len(cand) == 0:
        return fallback_windows(x, y, width, height, fallback_scales)[:n], True
    order, _ = rank_by_center_distance(cand, x, y)
    ranked = cand[order]
    return ranked[greedy_nms_ranked(ranked, iou, n)], False


def select_proposals(clicks: pd.DataFrame, proposals, sizes: Mapping[str, tuple[int, int]] | Callable | None = None,
                     n: int = 8, iou: float = 0.7, fallback_scales: Sequence[float] = DEFAULT_FALLBACK_SCALES,
                     exclusive: bool = False, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Select up to ``n`` proposals per click (``exclusive``: see the module docstring).

    ``clicks``: columns ``click_id, image_id, class, x, y``. ``proposals``: ``proposals[image_id] -> (K, 4)``
    (a dict or a :class:`pipeline.proposals.ProposalStore`). ``sizes``: ``image_id -> (width, height)`` as a
    mapping or callable; by default ``proposals.size`` (a store knows its image sizes). Returns the table
    (:data:`SELECTED_COLUMNS`, one row per click x crop, ``rank`` 0 = nearest) and a report dict.
    """
    missing_cols = {"click_id", "image_id", "class", "x", "y"} - set(clicks.columns)
    if missing_cols:
        raise ValueError(f"clicks table lacks columns {sorted(missing_cols)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sizes is None:
        if not hasattr(proposals, "size"):
            raise ValueError("pass sizes (image_id -> (width, height)) when proposals is not a ProposalStore")
        sizes = proposals.size
    get_size = sizes.__getitem__ if isinstance(sizes, Mapping) else sizes

    rows: list[tuple] = []
    fallbacks = 0
    candidates: list[int] = []
    shared, waived = 0, 0  # clicks with another same-class click in their image; of them, exclusion waived
    clicks = clicks.sort_values(["image_id", "click_id"], kind="mergesort")
    groups = clicks.groupby("image_id", sort=False)
    for image_id, group in tqdm(groups, total=groups.ngroups, desc="select proposals", unit="img",
                                disable=not progress, leave=False):
        try:
            boxes = np.asarray(proposals[image_id], np.float32).reshape(-1, 4)
            width, height = get_size(image_id)
        except KeyError as e:
            raise KeyError(f"no proposals for image {image_id!r} of the clicks ({e})") from None
        for click_id, cls, x, y in zip(group.click_id, group["class"], group.x.astype(float), group.y.astype(float)):
            if not (0 <= x <= width and 0 <= y <= height):
                raise ValueError(f"click {click_id} ({x:g}, {y:g}) lies outside image {image_id} "
                                 f"({width}x{height})")
            cand = boxes[contains_click(boxes, x, y)]
            candidates.append(len(cand))
            same = other_clicks(group, click_id, cls, "same_class") if exclusive else None
            if same is not None and len(same):
                cand, w = exclude_other_clicks(cand, same)
                shared += 1
                waived += w
            sel, fb = select_for_click(cand, x, y, width, height, n, iou, fallback_scales)
            fallbacks += fb
            for r, (x1, y1, x2, y2) in enumerate(sel):
                rows.append((int(click_id), str(image_id), cls, x, y, r,
                             float(x1), float(y1), float(x2), float(y2), bool(fb)))
    table = pd.DataFrame(rows, columns=SELECTED_COLUMNS)
    table = table.astype({"click_id": "int64", "rank": "int64", "x1": "float32", "y1": "float32",
                          "x2": "float32", "y2": "float32", "fallback": "bool"})
    n_clicks = len(clicks)
    per_click = table.groupby("click_id").size() if len(table) else pd.Series(dtype=int)
    report = {
        "clicks": int(n_clicks),
        "images": int(groups.ngroups),
        "crops": int(len(table)),
        "fallbacks": int(fallbacks),
        "mean_crops_per_click": float(len(table) / n_clicks) if n_clicks else 0.0,
        "clicks_with_fewer_than_n": int((per_click < n).sum()),
        "mean_candidates_per_click": float(np.mean(candidates)) if candidates else 0.0,
        "n": int(n), "iou": float(iou), "fallback_scales": [float(s) for s in fallback_scales],
        "exclusive": bool(exclusive), "clicks_sharing_class": int(shared), "exclusion_waived": int(waived),
    }
    log.info("selected %d crops for %d clicks (%d fallbacks, %.2f crops/click)", report["crops"],
             report["clicks"], report["fallbacks"], report["mean_crops_per_click"])
    return table, report
