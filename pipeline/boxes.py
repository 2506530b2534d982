"""Stage 5: from a click's fused CAM to one pseudo box (docs/method.md, stage 5).

Per click:

0. **partition** (an addition to the paper; ``partition``): with several clicks of the click's class in the image
   (``"same_class"``, the pipeline's default, tasks/defaults.py; ``"all"``: clicks of any class), the map is kept
   only on the pixels nearer to this click than to any other (its Voronoi cell) and set to the map's minimum
   elsewhere, so that the region of one instance cannot run into a neighbour's. ``"none"`` (the default here) uses
   the whole map, as the paper.
1. **normalise** the fused map (float, image-sized ``HxW``) to 0..255 by min-max scaling. A map with a non-finite
   value (``"nonfinite"``) or with no contrast / no positive value (``"empty"``) cannot give a box.
2. **threshold** it at ``T`` (``pixel >= T``): rule ``"paper"`` takes ``T_cam = 80`` when the image has fewer than
   2 labelled classes and 120 otherwise; ``"fixed"`` takes ``threshold_value`` (0..255); ``"fraction"`` takes
   ``threshold_value * 255``, i.e. that fraction of the (normalised) maximum.
3. take the 8-connected **region containing the click**; when the click lies outside every region, the region
   holding the foreground pixel nearest to the click.
4. make the box **centro-symmetric about the click**: the region's extent left of the click is
   ``L = x - x_min`` and right of it ``R = x_max - x`` (continuous coordinates, ``x_max`` exclusive, each side
   at least 0); the half-width is ``max``/``mean``/``min`` of ``(L, R)`` (``symmetry``), the half-height
   likewise; the box is ``(x - hw, y - hh, x + hw, y + hh)`` clipped to the image. ``symmetry="none"`` takes
   the region's own bounding box instead (the ablation).
5. a box narrower or lower than ``min_side`` pixels is ``"degenerate"``.

Whenever no box comes out (``status != "ok"``), :func:`pseudo_boxes_from_cams` substitutes the click's rank-1
proposal and flags the row ``fallback=True``. The score is the mean normalised map inside the box (0..1) by
default (``"box_mean"``), or the mean over the click's region (``"region_mean"``), or the raw map's peak inside
the region (``"raw_peak"``).

Boxes follow docs/architecture.md: float ``(x1, y1, x2, y2)`` in 0-based continuous pixel coordinates; pixel
``(row r, column c)`` covers ``[c, c+1) x [r, r+1)``, and a click ``(x, y)`` lies in pixel
``(floor(y), floor(x))``.

The image-label-only baseline (no click) uses :func:`box_from_image_cam`: the bounding box of the largest region
of the class's whole-image CAM.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, NamedTuple, Sequence

import cv2
import numpy as np
import pandas as pd

from .clicks import other_clicks

THRESHOLD_RULES = ("paper", "fixed", "fraction")
SYMMETRY_MODES = ("max", "mean", "min", "none")
SCORE_MODES = ("box_mean", "region_mean", "raw_peak")
PARTITION_MODES = ("same_class", "all", "none")
#: statuses a click can end in; everything but "ok" means the box is the fallback proposal
STATUSES = ("ok", "empty", "nonfinite", "degenerate", "missing")
PAPER_T_SINGLE, PAPER_T_MULTI = 80.0, 120.0

PSEUDO_COLUMNS = ["image_id", "class", "x1", "y1", "x2", "y2", "score", "click_id", "fallback", "status"]
CANDIDATE_COLUMNS = ["click_id", "threshold", "x1", "y1", "x2", "y2", "score"]


@dataclass(frozen=True)
class BoxParams:
    """Parameters of pseudo box construction; validated on creation. The defaults are the paper's (its T_cam rule, no
    partition); the pipeline's tuned values are in tasks/defaults.py."""

    threshold_rule: str = "paper"
    threshold_value: float | None = None  # "fixed": 0..255; "fraction": 0..1
    symmetry: str = "max"
    score: str = "box_mean"
    min_side: float = 2.0
    partition: str = "none"

    def __post_init__(self) -> None:
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {self.threshold_rule!r}")
        if self.threshold_rule == "fixed":
            if self.threshold_value is None or not 0 < float(self.threshold_value) <= 255:
                raise ValueError("threshold_rule='fixed' needs 0 < threshold_value <= 255, "
                                 f"got {self.threshold_value!r}")
        elif self.threshold_rule == "fraction":
            if self.threshold_value is None or not 0 < float(self.threshold_value) <= 1:
                raise ValueError("threshold_rule='fraction' needs 0 < threshold_value <= 1, "
                                 f"got {self.threshold_value!r}")
        if self.symmetry not in SYMMETRY_MODES:
            raise ValueError(f"symmetry must be one of {SYMMETRY_MODES}, got {self.symmetry!r}")
        if self.score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {self.score!r}")
        if self.partition not in PARTITION_MODES:
            raise ValueError(f"partition must be one of {PARTITION_MODES}, got {self.partition!r}")
        if not self.min_side > 0:
            raise ValueError(f"min_side must be > 0, got {self.min_side!r}")

    def as_dict(self) -> dict:
        return asdict(self)


class BoxResult(NamedTuple):
    """One click's outcome: ``box`` is ``(x1, y1, x2, y2)`` or None when ``status != "ok"``."""

    box: tuple[float, float, float, float] | None
    score: float
    status: str
    threshold: float


# -- the steps ---------------------------------------------------------------------------------------------
def normalize_map(cam: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Min-max scale a 2-D map to float32 0..255. Returns ``(map, "ok")`` or ``(None, "nonfinite" | "empty")``.

    ``"empty"``: the map has no positive value or no contrast (max == min), so no region can be told apart.
    """
    cam = np.asarray(cam)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"expected a non-empty 2-D map, got shape {cam.shape}")
    cam = cam.astype(np.float32, copy=False)
    if not np.isfinite(cam).all():
        return None, "nonfinite"
    lo, hi = float(cam.min()), float(cam.max())
    if hi <= 0 or hi - lo <= 1e-6 * max(abs(hi), abs(lo)):
        return None, "empty"
    return (cam - lo) * np.float32(255.0 / (hi - lo)), "ok"


def ensemble_map(maps: Sequence[np.ndarray | None]) -> tuple[np.ndarray | None, int]:
    """One click's fused maps from several classifiers (``--cam-ensemble``) -> ``(mean, members used)``: the mean of
    the maps, each scaled to a maximum of 1 first so that every classifier counts alike whatever its CAM magnitudes.

    A member whose map is missing (None), non-finite or has no positive value is left out of the mean; the mean is
    None when no member is left. ValueError when the maps' shapes differ (they are all image-sized)."""
    shapes = {np.shape(m) for m in maps if m is not None}
    if len(shapes) > 1:
        raise ValueError(f"ensemble maps differ in shape: {sorted(shapes)}")
    kept = []
    for m in maps:
        if m is None:
            continue
        m = np.asarray(m, dtype=np.float32)
        hi = float(m.max()) if m.size else 0.0
        if np.isfinite(m).all() and hi > 0:
            kept.append(m / np.float32(hi))
    if not kept:
        return None, 0
    return np.mean(kept, axis=0, dtype=np.float32), len(kept)


def cam_threshold(rule: str = "paper", value: float | None = None, n_image_classes: int = 1) -> float:
    """The threshold on the 0..255 scale (see module docstring)."""
    if rule == "paper":
        return PAPER_T_SINGLE if n_image_classes < 2 else PAPER_T_MULTI
    if rule == "fixed":
        return float(value)
    if rule == "fraction":
        return float(value) * 255.0
    raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")


def _components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """8-connected components of a boolean mask: ``(n labels including background 0, labels int32 HxW)``.

    (``cv2.connectedComponents``; the ``WithStats`` variant is much slower in OpenCV 5 (docs/experiments.md), so
    boxes and areas are computed for the regions actually used.)
    """
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return n, labels


def click_pixel(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """(column, row) of the pixel holding click ``(x, y)``, clamped into the image."""
    return int(min(max(np.floor(x), 0), width - 1)), int(min(max(np.floor(y), 0), height - 1))


def click_region(labels: np.ndarray, x: float, y: float) -> int:
    """Label of the region containing the click, else of the region with the foreground pixel nearest to it
    (pixel centres, Euclidean; ties broken by row-major order). 0 when there is no foreground at all."""
    h, w = labels.shape
    cx, cy = click_pixel(x, y, w, h)
    lab = int(labels[cy, cx])
    if lab:
        return lab
    rows, cols = np.nonzero(labels)
    if rows.size == 0:
        return 0
    d2 = (cols + 0.5 - x) ** 2 + (rows + 0.5 - y) ** 2
    i = int(np.argmin(d2))
    return int(labels[rows[i], cols[i]])


def voronoi_cell(shape: tuple[int, int], x: float, y: float, others: np.ndarray) -> np.ndarray:
    """Boolean ``HxW`` mask of the pixels whose centre is at least as near to ``(x, y)`` as to every point of
    ``others`` (``(K, 2)`` x, y; all True when K = 0)."""
    h, w = shape
    cols = np.arange(w, dtype=np.float32) + 0.5
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    own = (cols - np.float32(x)) ** 2 + (rows - np.float32(y)) ** 2
    cell = np.ones((h, w), bool)
    for ox, oy in np.asarray(others, np.float32).reshape(-1, 2):
        cell &= own <= (cols - ox) ** 2 + (rows - oy) ** 2
    return cell


def click_cell(shape: tuple[int, int], x: float, y: float, others: np.ndarray | None) -> np.ndarray | None:
    """The click's :func:`voronoi_cell` against ``others`` (its partition's other clicks), or None (the whole map)
    when there are none."""
    return voronoi_cell(shape, x, y, others) if others is not None and len(others) else None


def symmetric_extent(lo: float, hi: float, c: float, mode: str) -> float:
    """Half-extent about ``c`` of an interval ``[lo, hi)``: ``mode`` of the two sides (each at least 0)."""
    a, b = max(c - lo, 0.0), max(hi - c, 0.0)
    if mode == "max":
        return max(a, b)
    if mode == "min":
        return min(a, b)
    if mode == "mean":
        return 0.5 * (a + b)
    raise ValueError(f"symmetry must be one of {SYMMETRY_MODES[:3]} here, got {mode!r}")


def region_box(region: np.ndarray) -> tuple[float, float, float, float]:
    """Continuous bounding box ``(x1, y1, x2, y2)`` of the True pixels of a non-empty boolean mask."""
    cols = np.flatnonzero(region.any(0))
    rows = np.flatnonzero(region.any(1))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def symmetric_box(region: tuple[float, float, float, float], x: float, y: float, mode: str,
                  width: int, height: int) -> tuple[float, float, float, float]:
    """Centro-symmetric box about the click from a region's bounding box (``mode`` max/mean/min), or the region's
    own box (``mode="none"``); clipped to the ``width x height`` image."""
    if mode == "none":
        x1, y1, x2, y2 = region
    else:
        hw = symmetric_extent(region[0], region[2], x, mode)
        hh = symmetric_extent(region[1], region[3], y, mode)
        x1, y1, x2, y2 = x - hw, y - hh, x + hw, y + hh
    return (float(min(max(x1, 0.0), width)), float(min(max(y1, 0.0), height)),
            float(min(max(x2, 0.0), width)), float(min(max(y2, 0.0), height)))


def box_mean(norm: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Mean of a 0..255 map over the pixels a box touches, scaled to 0..1."""
    h, w = norm.shape
    c1, r1 = int(np.floor(box[0])), int(np.floor(box[1]))
    c2, r2 = int(np.ceil(box[2])), int(np.ceil(box[3]))
    c1, r1 = min(max(c1, 0), w - 1), min(max(r1, 0), h - 1)
    c2, r2 = min(max(c2, c1 + 1), w), min(max(r2, r1 + 1), h)
    return float(norm[r1:r2, c1:c2].mean()) / 255.0


def _score(mode: str, cam: np.ndarray, norm: np.ndarray, region: np.ndarray,
           box: tuple[float, float, float, float]) -> float:
    if mode == "box_mean":
        return box_mean(norm, box)
    if mode == "region_mean":
        return float(norm[region].mean()) / 255.0
    return float(np.asarray(cam, dtype=np.float32)[region].max())


# -- one click ---------------------------------------------------------------------------------------------
def _prepared_map(cam: np.ndarray, x: float, y: float, params: BoxParams,
                  others: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray, str]:
    """``(normalised map or None, the map the score reads, status)``: step 0 (partition) and step 1 (normalise)."""
    if others is not None and len(others) and params.partition != "none":
        cam = np.asarray(cam, dtype=np.float32)
        if cam.ndim == 2 and cam.size and np.isfinite(cam).all():  # else: reported "nonfinite" below, not cut away
            cam = np.where(voronoi_cell(cam.shape, x, y, others), cam, cam.min())
    norm, status = normalize_map(cam)
    return norm, cam, status


def _box_at(norm: np.ndarray, cam: np.ndarray, x: float, y: float, t: float, params: BoxParams) -> BoxResult:
    """Steps 2-5 on a normalised map at threshold ``t``."""
    h, w = norm.shape
    _, labels = _components(norm >= t)
    lab = click_region(labels, x, y)
    if lab == 0:  # cannot happen for t <= 255 (the maximum is 255), kept for safety
        return BoxResult(None, 0.0, "empty", t)
    region = labels == lab
    box = symmetric_box(region_box(region), x, y, params.symmetry, w, h)
    if box[2] - box[0] < params.min_side or box[3] - box[1] < params.min_side:
        return BoxResult(None, box_mean(norm, box), "degenerate", t)
    return BoxResult(box, _score(params.score, cam, norm, region, box), "ok", t)


def box_from_cam(cam: np.ndarray, x: float, y: float, n_image_classes: int = 1,
                 params: BoxParams | None = None, others: np.ndarray | None = None) -> BoxResult:
    """One click's pseudo box from its fused map (``HxW``, the image's size). See the module docstring.

    ``others``: the other clicks ``(K, 2)`` to partition the map against (the caller picks them by
    ``params.partition``; ignored when it is ``"none"``)."""
    params = params or BoxParams()
    t = cam_threshold(params.threshold_rule, params.threshold_value, n_image_classes)
    return boxes_at_thresholds(cam, x, y, [t], params, others)[0]


def boxes_at_thresholds(cam: np.ndarray, x: float, y: float, thresholds: Sequence[float],
                        params: BoxParams | None = None, others: np.ndarray | None = None) -> list[BoxResult]:
    """:func:`box_from_cam` at each of several thresholds (0..255) of one map, partitioned and normalised once
    (``params``' threshold rule is not used)."""
    params = params or BoxParams()
    norm, cam, status = _prepared_map(cam, x, y, params, others)
    if norm is None:
        return [BoxResult(None, 0.0, status, float(t)) for t in thresholds]
    return [_box_at(norm, cam, x, y, float(t), params) for t in thresholds]


def box_from_image_cam(cam: np.ndarray, n_image_classes: int = 1, params: BoxParams | None = None) -> BoxResult:
    """No-click variant (image-label-only baseline): bounding box of the largest region of a class's whole-image
    CAM after normalising and thresholding as above (``symmetry`` is ignored). Score as in :func:`box_from_cam`."""
    params = params or BoxParams()
    t = cam_threshold(params.threshold_rule, params.threshold_value, n_image_classes)
    norm, status = normalize_map(cam)
    if norm is None:
        return BoxResult(None, 0.0, status, t)
    n, labels = _components(norm >= t)
    if n < 2:
        return BoxResult(None, 0.0, "empty", t)
    lab = 1 + int(np.argmax(np.bincount(labels.ravel(), minlength=n)[1:]))
    region = labels == lab
    box = region_box(region)
    if box[2] - box[0] < params.min_side or box[3] - box[1] < params.min_side:
        return BoxResult(None, box_mean(norm, box), "degenerate", t)
    return BoxResult(box, _score(params.score, cam, norm, region, box), "ok", t)


# -- many clicks -------------------------------------------------------------------------------------------
def rank1_proposals(selected: pd.DataFrame) -> pd.DataFrame:
    """The best-ranked selected proposal of each click: DataFrame indexed by ``click_id`` with ``x1..y2``
    (from SelectProposals' ``selected.parquet``: ``click_id, rank, x1, y1, x2, y2, ...``)."""
    missing = {"click_id", "rank", "x1", "y1", "x2", "y2"} - set(selected.columns)
    if missing:
        raise ValueError(f"selected proposals lack columns {sorted(missing)}")
    best = selected.sort_values(["click_id", "rank"], kind="mergesort").drop_duplicates("click_id")
    return best.set_index("click_id")[["x1", "y1", "x2", "y2"]]


def classes_per_image(clicks: pd.DataFrame) -> dict[str, int]:
    """Number of distinct labelled (clicked) classes of each image: the ``n_image_classes`` of the paper's rule."""
    return clicks.groupby("image_id")["class"].nunique().to_dict()


def _clicks_by_image(clicks: pd.DataFrame) -> dict[str, pd.DataFrame]:
    missing = {"click_id", "image_id", "class", "x", "y"} - set(clicks.columns)
    if missing:
        raise ValueError(f"clicks table lacks columns {sorted(missing)}")
    return {str(k): g for k, g in clicks.groupby(clicks["image_id"].astype(str), sort=False)}


def pseudo_boxes_from_cams(items: Iterable[tuple[int, np.ndarray | None, Mapping]],
                           fallback_boxes: pd.DataFrame, n_image_classes: Mapping[str, int],
                           params: BoxParams | None = None,
                           image_sizes: Mapping[str, tuple[int, int]] | None = None,
                           clicks: pd.DataFrame | None = None) -> pd.DataFrame:
    """Pseudo boxes for many CAM entries: :func:`pseudo_boxes_and_candidates` without candidates."""
    return pseudo_boxes_and_candidates(items, fallback_boxes, n_image_classes, params, image_sizes, clicks)[0]


def pseudo_boxes_and_candidates(items: Iterable[tuple[int, np.ndarray | None, Mapping]],
                                fallback_boxes: pd.DataFrame, n_image_classes: Mapping[str, int],
                                params: BoxParams | None = None,
                                image_sizes: Mapping[str, tuple[int, int]] | None = None,
                                clicks: pd.DataFrame | None = None, candidate_thresholds: Sequence[float] = (),
                                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pseudo boxes for many CAM entries, and (``candidate_thresholds``) each click's boxes at those thresholds.

    ``items`` yields ``(entry_id, fused map or None, meta)`` (as :meth:`pipeline.cam.CamStore.load` gives) with
    meta holding ``image_id, class, x, y`` and optionally ``kind``:

    * ``kind="click"`` (default; entry id = click id): :func:`box_from_cam`. A None map means the CAM is missing
      (status ``"missing"``). A click without a box takes its row of ``fallback_boxes`` (indexed by click_id,
      ``x1..y2``; see :func:`rank1_proposals`), gets ``fallback=True`` and the mean normalised map inside it as its
      score (0 when the map itself is unusable). ValueError when such a click has no fallback box.
    * ``kind="image"`` (the image-label-only baseline: one whole-image CAM per image and class):
      :func:`box_from_image_cam`; its fallback is the whole image; ``click_id`` is -1.

    ``n_image_classes`` maps image id -> number of labelled classes (paper's threshold rule; 1 when absent).
    ``image_sizes`` (image id -> (width, height)), when given, is checked against each map's shape (ValueError).
    ``clicks`` (``click_id, image_id, class, x, y``): all clicks of the images, for ``params.partition`` (see
    :func:`other_clicks`); without it no map is partitioned.
    Returns ``(boxes, candidates)``: ``boxes`` has :data:`PSEUDO_COLUMNS` plus ``threshold``; ``candidates`` has
    :data:`CANDIDATE_COLUMNS`, one row per click with a map and threshold that gives a box (:func:`boxes_at_thresholds`;
    for the per-click threshold choice of :func:`pipeline.clickpairs.choose_by_area`).
    """
    params = params or BoxParams()
    by_image = _clicks_by_image(clicks) if clicks is not None and params.partition != "none" else {}
    rows, cands = [], []
    for entry_id, cam, meta in items:
        image_id, cls = str(meta["image_id"]), meta["class"]
        kind = meta.get("kind", "click")
        n_cls = int(n_image_classes.get(image_id, 1))
        if cam is not None and image_sizes is not None and image_id in image_sizes:
            w, h = image_sizes[image_id]
            if tuple(cam.shape) != (int(h), int(w)):
                raise ValueError(f"entry {entry_id} ({image_id}, {cls}): fused map is {cam.shape[1]}x{cam.shape[0]} "
                                 f"but the image is {int(w)}x{int(h)}")
        if cam is None:
            res = BoxResult(None, 0.0, "missing", cam_threshold(params.threshold_rule, params.threshold_value, n_cls))
        elif kind == "image":
            res = box_from_image_cam(cam, n_cls, params)
        else:
            others = other_clicks(by_image.get(image_id), int(entry_id), cls, params.partition)
            res = box_from_cam(cam, float(meta["x"]), float(meta["y"]), n_cls, params, others)
            if len(candidate_thresholds):
                cands.extend((int(entry_id), r.threshold, *r.box, r.score) for r in boxes_at_thresholds(
                    cam, float(meta["x"]), float(meta["y"]), candidate_thresholds, params, others) if r.box)
        box, score = res.box, res.score
        if box is None:
            if kind == "image":
                if cam is None:
                    raise ValueError(f"entry {entry_id} ({image_id}, {cls}): no CAM and no image size to fall back to")
                box = (0.0, 0.0, float(cam.shape[1]), float(cam.shape[0]))
            elif entry_id in fallback_boxes.index:
                box = tuple(float(v) for v in fallback_boxes.loc[entry_id, ["x1", "y1", "x2", "y2"]])
            else:
                raise ValueError(f"click {entry_id} ({image_id}, {cls}): no box from its CAM ({res.status}) and no "
                                 "selected proposal to fall back to")
            score = 0.0
            if cam is not None:
                norm, _ = normalize_map(cam)
                if norm is not None:
                    score = box_mean(norm, box)
        click_id = -1 if kind == "image" else int(entry_id)
        rows.append((image_id, cls, *box, score, click_id, res.status != "ok", res.status, res.threshold))
    df = pd.DataFrame(rows, columns=PSEUDO_COLUMNS + ["threshold"])
    df["fallback"] = df["fallback"].astype(bool)
    return df, pd.DataFrame(cands, columns=CANDIDATE_COLUMNS)


def fallback_counts(boxes: pd.DataFrame) -> dict:
    """``{"n": clicks, "fallback": count, "fallback_rate": fraction, "by_status": {status: count}}``."""
    n = len(boxes)
    fb = int(boxes["fallback"].sum()) if n else 0
    return {"n": n, "fallback": fb, "fallback_rate": fb / n if n else 0.0,
            "by_status": {k: int(v) for k, v in boxes["status"].value_counts().items()} if n else {}}
