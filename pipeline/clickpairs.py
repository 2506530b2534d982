"""Two clicks per object (paper 001, Papadopoulos et al., "Training object class detectors with click supervision").

When two annotators click the center of the same object, their errors are independent and grow with the object, so

* the pair's **mean** is a better center than either click (:func:`pair_clicks` puts it in ``x, y``), and
* the **distance** between the two clicks is evidence on the object's size: :class:`AreaModel` maps it to an
  expected log area ``mu(d) = a + b log d`` with a spread ``sigma``, and :func:`area_score` is the paper's box area
  score ``exp(-(log area - mu)^2 / (2 sigma^2))`` of a box against that expectation.

The area model is fitted without the evaluated boxes: on reference boxes of *other* images only
(:func:`crossfit_area`, folds of images), the reference boxes being either the pipeline's own one-click CAM boxes
(self-calibration, the default) or a small annotated set (``--area-calibration``). docs/method.md (two clicks) has
the derivation and the choices; docs/results.md the measurements.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

#: columns :func:`pair_clicks` adds to a click table: both clicks of the pair (``*_b`` NaN for a lone click)
PAIR_COLUMNS = ["n_clicks", "x_a", "y_a", "x_b", "y_b"]


class TooFewPairs(ValueError):
    """A size model cannot be fitted: too few click pairs (with a box) in a fold's training images."""


def pair_clicks(clicks: pd.DataFrame, annotators: Sequence[int] = (1, 2)) -> tuple[pd.DataFrame, dict]:
    """One row per object from the clicks of two annotators.

    ``clicks`` has ``image_id, class, x, y, annotator, object_index`` (``object_index`` -1 when unknown). Clicks
    of the two ``annotators`` are paired by ``(image_id, object_index)`` where both carry an index; the others by
    an optimal assignment (Hungarian, :func:`scipy.optimize.linear_sum_assignment`, on the Euclidean distance)
    between the two annotators' clicks of the same image and class. A click left without a partner stays a lone
    click (``n_clicks = 1``), counted in the report. ``x, y`` of a pair is its mean; ``x_a, y_a`` the first
    annotator's click, ``x_b, y_b`` the second's (NaN for a lone click, whose own click is ``x_a, y_a``).

    Returns ``(objects, report)``: the rows keep the input's other columns of the first annotator's click (its
    ``annotator`` for a lone click), ordered by image, class, object_index and position;
    ``report = {"annotators", "pairs", "by_object_index", "by_assignment", "lone": {annotator: n}}``.
    ValueError when ``annotators`` is not two distinct ids, or when an ``object_index`` pairs clicks of two
    classes or holds two clicks of one annotator.
    """
    ann = [int(a) for a in annotators]
    if len(ann) != 2 or ann[0] == ann[1]:
        raise ValueError(f"two distinct annotators are needed to pair clicks, got {list(annotators)}")
    missing = {"image_id", "class", "x", "y", "annotator"} - set(clicks.columns)
    if missing:
        raise ValueError(f"clicks table lacks columns {sorted(missing)}")
    df = clicks[clicks["annotator"].isin(ann)].copy()
    if "object_index" not in df:
        df["object_index"] = -1
    df["image_id"] = df["image_id"].astype(str)
    a_rows, b_rows = df[df.annotator == ann[0]], df[df.annotator == ann[1]]
    pairs: list[tuple[int, int]] = []  # (index in df of the a click, of the b click)
    by_index = _pair_by_object_index(a_rows, b_rows, pairs)
    used = {i for p in pairs for i in p}
    by_assignment = _pair_by_assignment(a_rows[~a_rows.index.isin(used)], b_rows[~b_rows.index.isin(used)], pairs)
    used = {i for p in pairs for i in p}
    out = []
    for ia, ib in pairs:
        a, b = df.loc[ia], df.loc[ib]
        row = a.to_dict()
        row.update(x=(a.x + b.x) / 2, y=(a.y + b.y) / 2, n_clicks=2, x_a=a.x, y_a=a.y, x_b=b.x, y_b=b.y)
        if int(row["object_index"]) < 0:
            row["object_index"] = int(b.object_index)
        out.append(row)
    lone = df[~df.index.isin(used)]
    for _, r in lone.iterrows():
        out.append({**r.to_dict(), "n_clicks": 1, "x_a": r.x, "y_a": r.y, "x_b": np.nan, "y_b": np.nan})
    cols = list(df.columns) + [c for c in PAIR_COLUMNS if c not in df.columns]
    objects = pd.DataFrame(out, columns=cols)
    objects = objects.astype({"n_clicks": int, "object_index": int, "annotator": int})
    objects = objects.sort_values(["image_id", "class", "object_index", "x_a", "y_a"], kind="mergesort")
    report = {"annotators": ann, "pairs": len(pairs), "by_object_index": by_index, "by_assignment": by_assignment,
              "lone": {int(a): int((lone.annotator == a).sum()) for a in ann}}
    return objects.reset_index(drop=True), report


def _pair_by_object_index(a_rows: pd.DataFrame, b_rows: pd.DataFrame, pairs: list) -> int:
    a_idx, b_idx = a_rows[a_rows.object_index >= 0], b_rows[b_rows.object_index >= 0]
    for name, rows in (("first", a_idx), ("second", b_idx)):
        dup = rows.duplicated(["image_id", "object_index"], keep=False)
        if dup.any():
            r = rows[dup].iloc[0]
            raise ValueError(f"the {name} annotator ({int(r.annotator)}) clicked object {int(r.object_index)} of "
                             f"image {r.image_id} {int(dup.sum())} times; one click per object and annotator")
    b_by_key = {(r.image_id, int(r.object_index)): i for i, r in b_idx.iterrows()}
    n = 0
    for i, r in a_idx.iterrows():
        j = b_by_key.get((r.image_id, int(r.object_index)))
        if j is None:
            continue
        if b_idx.at[j, "class"] != r["class"]:
            raise ValueError(f"object {int(r.object_index)} of image {r.image_id}: annotator {int(r.annotator)} "
                             f"says {r['class']!r}, annotator {int(b_idx.at[j, 'annotator'])} says "
                             f"{b_idx.at[j, 'class']!r}")
        pairs.append((i, j))
        n += 1
    return n


def _pair_by_assignment(a_rows: pd.DataFrame, b_rows: pd.DataFrame, pairs: list) -> int:
    """Hungarian assignment on distance within each (image, class); returns the number of pairs added."""
    n = 0
    b_groups = {k: g for k, g in b_rows.groupby(["image_id", "class"], sort=False)}
    for key, ga in a_rows.groupby(["image_id", "class"], sort=True):
        gb = b_groups.get(key)
        if gb is None:
            continue
        pa, pb = ga[["x", "y"]].to_numpy(float), gb[["x", "y"]].to_numpy(float)
        cost = np.hypot(pa[:, None, 0] - pb[None, :, 0], pa[:, None, 1] - pb[None, :, 1])
        rows, cols = linear_sum_assignment(cost)
        for r, c in zip(rows, cols):
            pairs.append((ga.index[r], gb.index[c]))
            n += 1
    return n


def pair_distance(objects: pd.DataFrame) -> np.ndarray:
    """Distance in pixels between the two clicks of each object (NaN for a lone click)."""
    return np.hypot(objects["x_a"].to_numpy(float) - objects["x_b"].to_numpy(float),
                    objects["y_a"].to_numpy(float) - objects["y_b"].to_numpy(float))


# -- the box area score -----------------------------------------------------------------------------------
#: a pair distance below this many pixels counts as this many (two clicks on one pixel say "small", not "empty")
MIN_DISTANCE_PX = 1.0


@dataclass(frozen=True)
class AreaModel:
    """Expected log area (pixels^2) of an object from its click pair's distance ``d`` (pixels):
    ``mu = intercept + slope * log(max(d, MIN_DISTANCE_PX))``, with ``sigma`` the spread of the true log area
    about ``mu`` (residual standard deviation of the fit)."""

    intercept: float
    slope: float
    sigma: float

    def expected_log_area(self, distance) -> np.ndarray:
        d = np.maximum(np.asarray(distance, dtype=float), MIN_DISTANCE_PX)
        return self.intercept + self.slope * np.log(d)


def fit_area_model(distance, area, slope: float | None = None) -> AreaModel:
    """Least-squares fit of ``log area`` on ``log distance`` (pairs with a finite distance and a positive area).

    ``slope=None`` fits the slope; a number fixes it (2.0: click errors proportional to the object's side, so the
    distance grows like the square root of the area) and fits the intercept alone. The slope is clipped to be at
    least 0 (a larger distance never means a smaller object). ``sigma`` is the residual standard deviation (at
    least 0.1). ValueError with fewer than 3 usable pairs."""
    d, a = np.asarray(distance, dtype=float), np.asarray(area, dtype=float)
    ok = np.isfinite(d) & np.isfinite(a) & (a > 0)
    if ok.sum() < 3:
        raise TooFewPairs(f"fitting the area model needs at least 3 click pairs with a reference box, got {ok.sum()}")
    x, y = np.log(np.maximum(d[ok], MIN_DISTANCE_PX)), np.log(a[ok])
    if slope is None:
        vx = float(np.var(x))
        b = float(np.cov(x, y, bias=True)[0, 1] / vx) if vx > 0 else 0.0
        b = max(b, 0.0)
    else:
        b = float(slope)
    a0 = float(np.mean(y - b * x))
    sigma = max(float(np.std(y - a0 - b * x)), 0.1)
    return AreaModel(a0, b, sigma)


def area_score(box_area, expected_log_area, sigma) -> np.ndarray:
    """The paper's box area score: ``exp(-(log box_area - mu)^2 / (2 sigma^2))`` (1 when the box's area is the
    expected one); 0 for a box without area."""
    area = np.asarray(box_area, dtype=float)
    with np.errstate(divide="ignore"):
        z = (np.log(np.where(area > 0, area, np.nan)) - np.asarray(expected_log_area, float)) / np.asarray(sigma)
    return np.nan_to_num(np.exp(-0.5 * z * z), nan=0.0)


def image_fold(image_id: str, folds: int) -> int:
    """A stable fold of an image (md5 of its id): the same image always falls in the same fold."""
    return int(hashlib.md5(str(image_id).encode()).hexdigest()[:8], 16) % folds


def crossfit_area(image_ids, distance, ref_area, folds: int = 5, slope: float | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, list[AreaModel]]:
    """Cross-fitted expected log areas: each object's ``mu`` and ``sigma`` come from an :class:`AreaModel` fitted
    on the reference areas (``ref_area``; NaN where an object has none) of the images of the *other* folds
    (:func:`image_fold`), so no image's own reference box enters its estimate. Returns ``(mu, sigma, models)``
    (``mu`` NaN for a lone click)."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    ids = [str(i) for i in image_ids]
    d, ref = np.asarray(distance, float), np.asarray(ref_area, float)
    fold = np.array([image_fold(i, folds) for i in ids])
    mu, sigma, models = np.full(len(ids), np.nan), np.full(len(ids), np.nan), []
    for f in range(folds):
        model = fit_area_model(d[fold != f], ref[fold != f], slope=slope)
        models.append(model)
        here = fold == f
        mu[here] = np.where(np.isfinite(d[here]), model.expected_log_area(d[here]), np.nan)
        sigma[here] = model.sigma
    return mu, sigma, models


def log_area(boxes) -> np.ndarray:
    """``log((x2 - x1) * (y2 - y1))`` of ``(N, 4)`` boxes (NaN for an empty box)."""
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area > 0, np.log(np.where(area > 0, area, 1.0)), np.nan)




# -- the per-click threshold choice (stage 5 with two clicks) ---------------------------------------------
#: thresholds (0..255 of the normalised map) among which :func:`choose_by_area` picks a click's box
AREA_THRESHOLDS = tuple(float(t) for t in range(10, 250, 10))


def _keep_best(out: pd.DataFrame, cand: pd.DataFrame, key: str, largest: bool) -> tuple[int, int]:
    """Replace, in place, each click's box in ``out`` by its candidate of the largest (or smallest) ``key``, ties
    to the lower threshold; returns ``(chosen, changed)``: the clicks given a candidate and those whose threshold
    changed."""
    best = cand.sort_values(["click_id", key, "threshold"], ascending=[True, not largest, True],
                            kind="mergesort").drop_duplicates("click_id").set_index("click_id")
    rows = out["click_id"].isin(best.index).to_numpy()
    cols = ["x1", "y1", "x2", "y2", "score", "threshold"]
    before = out.loc[rows, "threshold"].to_numpy(copy=True)
    out.loc[rows, cols] = best.loc[out.loc[rows, "click_id"], cols].to_numpy()
    return int(rows.sum()), int((out.loc[rows, "threshold"].to_numpy() != before).sum())


def choose_by_area(boxes: pd.DataFrame, candidates: pd.DataFrame, clicks: pd.DataFrame, map_sigma: float | None,
                   reference_area: pd.Series | None = None, folds: int = 5) -> tuple[pd.DataFrame, dict]:
    """Stage 5 with two clicks: each paired click's box among its ``candidates`` (its map thresholded at
    :data:`AREA_THRESHOLDS`, :func:`pipeline.boxes.pseudo_boxes_and_candidates`), the one maximising

        area_score(area; mu(d), sigma) * area_score(area; area of the default box, map_sigma)

    i.e. the box whose log area is nearest to the precision-weighted mean of the click pair's estimate ``mu(d)``
    (:func:`crossfit_area`) and the log area of the click's box at the default threshold (the map's own answer;
    ``map_sigma=None`` leaves it out).

    ``boxes``: stage 5's boxes at the default threshold (``click_id, x1..y2, status, threshold``, as
    :func:`pipeline.boxes.pseudo_boxes_from_cams`); ``clicks``: ``click_id, image_id`` and the pair columns
    (:data:`PAIR_COLUMNS`). The area model is fitted on ``reference_area`` (click_id -> area of a reference box,
    e.g. ground truth of a few annotated images) or, by default, on the default boxes that did not fall back
    (self-calibration); either way cross-fitted by image folds. A lone click, a fallback box, or a click without
    candidates keeps its box. Returns ``(boxes, report)`` with ``boxes`` updated (``x1..y2, score, threshold``)
    and ``area_mu``, ``area_sigma`` added (NaN where not used).
    """
    out = boxes.copy()
    c = clicks.set_index("click_id").reindex(out["click_id"])
    d = np.where(c["n_clicks"].to_numpy(float) == 2, pair_distance(c), np.nan)
    ok = (out["status"] == "ok").to_numpy()
    default_area = ((out.x2 - out.x1) * (out.y2 - out.y1)).to_numpy(float)
    if reference_area is None:
        ref, source = np.where(ok, default_area, np.nan), "default boxes (self-calibrated)"
    else:
        ref, source = reference_area.reindex(out["click_id"]).to_numpy(float), "reference boxes"
    mu, sigma, models = crossfit_area(c["image_id"].to_numpy(), d, ref, folds=folds)
    out["area_mu"], out["area_sigma"] = mu, sigma
    target = mu.copy()
    if map_sigma is not None:
        w_click, w_map = 1.0 / sigma ** 2, 1.0 / float(map_sigma) ** 2
        target = (mu * w_click + np.log(np.maximum(default_area, 1e-9)) * w_map) / (w_click + w_map)
    use = ok & np.isfinite(target)
    cand = candidates[candidates["click_id"].isin(out.loc[use, "click_id"])].copy()
    cand["gap"] = np.abs(log_area(cand[["x1", "y1", "x2", "y2"]]) - pd.Series(target, index=out["click_id"])
                         .reindex(cand["click_id"]).to_numpy())
    chosen, changed = _keep_best(out, cand, "gap", largest=False)
    report = {"reference": source, "reference_boxes": int(np.isfinite(ref).sum()), "paired": int(np.isfinite(d).sum()),
              "chosen": chosen, "changed": changed,
              "map_sigma": map_sigma, "folds": folds,
              "models": [{"intercept": m.intercept, "slope": m.slope, "sigma": m.sigma} for m in models]}
    return out, report


def reference_areas(clicks: pd.DataFrame, objects: pd.DataFrame) -> pd.Series:
    """Area of each click's reference box (:func:`reference_boxes`); NaN when none. Indexed by click_id."""
    ref = reference_boxes(clicks, objects)
    return ref["w"] * ref["h"]


def reference_boxes(clicks: pd.DataFrame, objects: pd.DataFrame) -> pd.DataFrame:
    """Width ``w`` and height ``h`` of each click's reference box in ``objects`` (ground truth of a few annotated
    images, ``--box-area-calibration``): the object its ``object_index`` names when that is an object of its class,
    else the smallest box of its class in its image that contains the click; NaN when none. Indexed by click_id."""
    objs = objects.assign(image_id=objects["image_id"].astype(str),
                          area=(objects.x2 - objects.x1) * (objects.y2 - objects.y1))
    groups = {k: g for k, g in objs.groupby(["image_id", "class"], sort=False)}
    index = clicks["object_index"] if "object_index" in clicks else pd.Series(-1, index=clicks.index)
    out = {}
    for cid, image_id, cls, x, y, idx in zip(clicks["click_id"], clicks["image_id"].astype(str), clicks["class"],
                                             clicks["x"], clicks["y"], index):
        g = groups.get((image_id, cls))
        box = None
        if g is not None:
            named = g[g["object_index"] == int(idx)]
            inside = g[(g.x1 <= x) & (x <= g.x2) & (g.y1 <= y) & (y <= g.y2)]
            if len(named):
                box = named.iloc[0]
            elif len(inside):
                box = inside.loc[inside["area"].idxmin()]
        out[int(cid)] = ((float(box.x2 - box.x1), float(box.y2 - box.y1)) if box is not None else (np.nan, np.nan))
    return pd.DataFrame.from_dict(out, orient="index", columns=["w", "h"], dtype=float).rename_axis("click_id")


# -- the per-axis extent model ("--box-area-prior axes") --------------------------------------------------
#: median and variance of log of a chi-square variable with one degree of freedom (a squared standard normal)
CHI2_1_MEDIAN = 0.454936423119572
LOG_CHI2_1_VAR = float(np.pi ** 2 / 2)
#: bounds of the fitted spread of the default box's log side
EXTENT_SIGMA_RANGE = (0.05, 2.0)


@dataclass(frozen=True)
class ExtentModel:
    """Two annotators click an object of width ``w`` and height ``h``; each click's error along an axis is
    normal with standard deviation ``k`` times the object's side along it, independently, so the pair's
    difference along x is ``N(0, 2 (k w)^2)`` (along y with ``h``). The default box's log side deviates from the
    true one by ``N(0, sigma^2)`` per axis (the map's own evidence, the prior)."""

    k: float
    sigma: float

    def log_posterior(self, dx, dy, w, h, w0, h0) -> np.ndarray:
        """Unnormalised log posterior of a box of sides ``w, h`` given the pair's differences ``dx, dy`` and the
        default box's sides ``w0, h0`` (arrays broadcast)."""
        out = 0.0
        for d, side, side0 in ((dx, w, w0), (dy, h, h0)):
            side = np.maximum(np.asarray(side, float), 1e-6)
            s = np.sqrt(2.0) * self.k * side
            out = out - np.log(s) - np.asarray(d, float) ** 2 / (2 * s * s) \
                - (np.log(side) - np.log(np.maximum(np.asarray(side0, float), 1e-6))) ** 2 / (2 * self.sigma ** 2)
        return out


def fit_extent_model(dx, dy, w0, h0, ref_w=None, ref_h=None) -> ExtentModel:
    """:class:`ExtentModel` from click pairs (``dx, dy``: the two clicks' differences) and their default boxes
    (``w0, h0``), pooled over both axes; NaN rows are left out.

    Self-calibrated (no ``ref_*``): with ``r = (d / side0)^2``, ``k = sqrt(median(r) / (2 median(chi2_1)))``, and,
    since ``log r = 2 (log side - log side0) + log(2 k^2 chi2_1)``, ``sigma^2 = (var(log r) - var(log chi2_1)) / 4``
    (the part of the spread the click noise does not explain). With reference sides (``ref_w, ref_h``, ground truth
    of a few images): ``r`` uses them, and ``sigma`` is the standard deviation of ``log(ref / side0)``. ``sigma`` is
    kept within :data:`EXTENT_SIGMA_RANGE`. ValueError with fewer than 3 usable pairs."""
    d = np.concatenate([np.abs(np.asarray(dx, float)), np.abs(np.asarray(dy, float))])
    side0 = np.concatenate([np.asarray(w0, float), np.asarray(h0, float)])
    ref = None if ref_w is None else np.concatenate([np.asarray(ref_w, float), np.asarray(ref_h, float)])
    scale = side0 if ref is None else ref
    ok = np.isfinite(d) & (d > 0) & np.isfinite(scale) & (scale > 0) & np.isfinite(side0) & (side0 > 0)
    if ok.sum() < 6:  # 3 pairs, 2 axes
        raise TooFewPairs(f"fitting the extent model needs at least 3 click pairs with a box, got {ok.sum() // 2}")
    r = (d[ok] / scale[ok]) ** 2
    k = float(np.sqrt(np.median(r) / (2 * CHI2_1_MEDIAN)))
    if ref is None:
        var = (float(np.var(np.log(r))) - LOG_CHI2_1_VAR) / 4
        sigma = float(np.sqrt(max(var, 0.0)))
    else:
        sigma = float(np.std(np.log(ref[ok] / side0[ok])))
    return ExtentModel(k, float(np.clip(sigma, *EXTENT_SIGMA_RANGE)))


def choose_by_extent(boxes: pd.DataFrame, candidates: pd.DataFrame, clicks: pd.DataFrame,
                     reference: pd.DataFrame | None = None, folds: int = 5) -> tuple[pd.DataFrame, dict]:
    """Stage 5 with two clicks, per axis: each paired click's box among its ``candidates`` (its map thresholded at
    :data:`AREA_THRESHOLDS`) with the highest :meth:`ExtentModel.log_posterior` given the pair's x and y
    differences and the default box. The model is cross-fitted by image folds (:func:`image_fold`): a click's
    ``k`` and ``sigma`` come from the clicks of the other folds' images, on their default boxes (self-calibrated)
    or on ``reference`` sides (``w, h`` indexed by click_id: :func:`reference_boxes`). A lone click, a fallback
    box or a click without candidates keeps its box. Arguments and result as :func:`choose_by_area`'s (the report
    lists each fold's ``k`` and ``sigma``)."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    out = boxes.copy()
    c = clicks.set_index("click_id").reindex(out["click_id"])
    paired = (c["n_clicks"].to_numpy(float) == 2)
    dx = np.where(paired, c["x_a"].to_numpy(float) - c["x_b"].to_numpy(float), np.nan)
    dy = np.where(paired, c["y_a"].to_numpy(float) - c["y_b"].to_numpy(float), np.nan)
    ok = (out["status"] == "ok").to_numpy() & paired
    w0, h0 = (out.x2 - out.x1).to_numpy(float), (out.y2 - out.y1).to_numpy(float)
    if reference is None:
        rw = rh = None
        source = "default boxes (self-calibrated)"
    else:
        ref = reference.reindex(out["click_id"])
        rw, rh = ref["w"].to_numpy(float), ref["h"].to_numpy(float)
        source = "reference boxes"
    fold = np.array([image_fold(i, folds) for i in out["image_id"].astype(str)])
    models = []
    cand = candidates[candidates["click_id"].isin(out.loc[ok, "click_id"])].copy()
    row_of = pd.Series(np.arange(len(out)), index=out["click_id"].to_numpy())
    cand_fold = fold[row_of.reindex(cand["click_id"]).to_numpy()]
    cand["logp"] = -np.inf
    for f in range(folds):
        train = ok & (fold != f)
        model = fit_extent_model(dx[train], dy[train], w0[train], h0[train],
                                 None if rw is None else rw[train], None if rh is None else rh[train])
        models.append(model)
        sel = cand_fold == f
        rows = row_of.reindex(cand.loc[sel, "click_id"]).to_numpy()
        cand.loc[sel, "logp"] = model.log_posterior(dx[rows], dy[rows], (cand.x2 - cand.x1)[sel].to_numpy(float),
                                                    (cand.y2 - cand.y1)[sel].to_numpy(float), w0[rows], h0[rows])
    chosen, changed = _keep_best(out, cand, "logp", largest=True)
    report = {"model": "axes", "reference": source, "paired": int(paired.sum()), "chosen": chosen,
              "changed": changed, "folds": folds,
              "models": [{"k": m.k, "sigma": m.sigma} for m in models]}
    return out, report


# -- the learned extent prior ("--box-area-prior learned") ------------------------------------------------
#: Gauss-Hermite nodes (probabilists') of the marginal likelihood over a click's unknown log side
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(24)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()
#: a class gets its own coefficient when the training folds hold at least this many of its click pairs
MIN_CLASS_PAIRS = 10
#: L2 penalty on the prior's coefficients other than the intercept: numerical safety only (collinear features)
SIDE_PRIOR_L2 = 1e-3


def extent_features(boxes: pd.DataFrame, clicks: pd.DataFrame, axis: str, classes: Sequence[str],
                    image_sizes: dict | None = None) -> np.ndarray:
    """Per-click features of the learned extent prior along ``axis`` (``"x"``: width, ``"y"``: height), one row per
    row of ``boxes`` (stage 5's default boxes, ``click_id, image_id, class, x1..y2``): an intercept, the log of the
    default box's side along the axis and across it (the map's own answer), one indicator per class of ``classes``
    (the class's typical extent relative to that answer), and the image's crowding: the log number of clicked
    objects in the image and of its class there, the log distance to the nearest other click of the image (when it
    is alone: the image's diagonal, from ``image_sizes`` (id -> (w, h)), else the largest default box's side times
    sqrt(2)) and whether it is alone. Clicks from ``clicks`` (``click_id, image_id, class, x, y``)."""
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    w0, h0 = (boxes.x2 - boxes.x1).to_numpy(float), (boxes.y2 - boxes.y1).to_numpy(float)
    own, other = (w0, h0) if axis == "x" else (h0, w0)
    allc = clicks.assign(image_id=clicks["image_id"].astype(str))
    n_img = allc.groupby("image_id")["click_id"].count()
    n_cls = allc.groupby(["image_id", "class"])["click_id"].count()
    nearest = {}
    for _, g in allc[allc["image_id"].map(n_img) > 1].groupby("image_id", sort=False):
        p = g[["x", "y"]].to_numpy(float)
        dist = np.hypot(p[:, None, 0] - p[None, :, 0], p[:, None, 1] - p[None, :, 1])
        np.fill_diagonal(dist, np.inf)
        nearest.update(zip(g["click_id"], dist.min(1)))
    if image_sizes is not None:
        alone_ids = allc[allc["image_id"].map(n_img) == 1]
        nearest.update({cid: float(np.hypot(*image_sizes[i])) for cid, i in zip(alone_ids["click_id"],
                                                                              alone_ids["image_id"])
                        if i in image_sizes})
    ids = boxes["image_id"].astype(str)
    n_i = n_img.reindex(ids).to_numpy(float)
    n_c = n_cls.reindex(pd.MultiIndex.from_arrays([ids, boxes["class"]])).to_numpy(float)
    near = pd.Series(nearest, dtype=float).reindex(boxes["click_id"]).to_numpy(float)
    alone = n_i <= 1
    # an alone click without the image's size: the largest default box side of the data as its "distance"
    near = np.where(np.isfinite(near), near, np.nanmax(np.concatenate([w0, h0, [1.0]])) * np.sqrt(2))
    cols = [np.ones(len(boxes)), np.log(np.maximum(own, 1.0)), np.log(np.maximum(other, 1.0))]
    cols += [(boxes["class"] == c).to_numpy(float) for c in classes]
    cols += [np.log(np.maximum(n_i, 1.0)), np.log(np.maximum(n_c, 1.0)), np.log(np.maximum(near, 1.0)),
             alone.astype(float)]
    return np.column_stack(cols)


@dataclass(frozen=True)
class SidePrior:
    """A learned prior on the log click-error scale ``log s`` of an object along one axis, ``s = sqrt(2) k side``:
    ``log s ~ N(features @ beta, sigma^2)``; the two clicks' difference along the axis is ``N(0, s^2)``."""

    beta: np.ndarray
    sigma: float

    def mean(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, float) @ self.beta


def fit_side_prior(features: np.ndarray, diff: np.ndarray, l2: float = SIDE_PRIOR_L2) -> SidePrior:
    """:class:`SidePrior` by maximum marginal likelihood of the click pairs' differences ``diff`` along one axis:
    ``sum_i log integral N(diff_i; 0, s^2) N(log s; x_i beta, sigma^2) dlog s`` (Gauss-Hermite quadrature), minus
    ``l2 |beta[1:]|^2``, by L-BFGS with the analytic gradient. No box enters the fit, only the clicks: the pairs'
    spread is a noisy, unbiased-in-scale measurement of each object's side, and the prior learns across images how
    that side follows the features (:func:`extent_features`). Rows with a NaN are left out; ``sigma`` is kept within
    :data:`EXTENT_SIGMA_RANGE`. :class:`TooFewPairs` with fewer usable pairs than twice the number of features."""
    from scipy.optimize import minimize

    X, d = np.asarray(features, float), np.asarray(diff, float)
    ok = np.isfinite(d) & np.isfinite(X).all(1)
    X, d2 = X[ok], d[ok] ** 2
    n, p = X.shape
    if n < max(2 * p, 6):
        raise TooFewPairs(f"fitting the learned extent prior needs at least {max(2 * p, 6)} click pairs "
                         f"({p} features), got {n}")
    penalty = np.full(p, float(l2))
    penalty[0] = 0.0
    lo, hi = np.log(EXTENT_SIGMA_RANGE[0]), np.log(EXTENT_SIGMA_RANGE[1])

    def nll(theta):
        beta, log_sigma = theta[:-1], float(np.clip(theta[-1], lo, hi))
        sigma = np.exp(log_sigma)
        logs = (X @ beta)[:, None] + sigma * _GH_NODES[None, :]
        inv = d2[:, None] * np.exp(-2 * logs)
        ll = -logs - 0.5 * inv  # log N(d; 0, s^2) up to a constant, at each node
        top = ll.max(1, keepdims=True)
        wq = np.exp(ll - top) * _GH_WEIGHTS
        total = wq.sum(1, keepdims=True)
        post = wq / total
        dll = post * (inv - 1.0)  # d ll / d logs, weighted by the nodes' posterior
        g_beta = X.T @ dll.sum(1)
        g_ls = sigma * float((dll * _GH_NODES[None, :]).sum()) if lo < theta[-1] < hi else 0.0
        value = -float((top[:, 0] + np.log(total[:, 0])).sum()) + float(penalty @ beta ** 2)
        return value, -np.concatenate([g_beta, [g_ls]]) + np.concatenate([2 * penalty * beta, [0.0]])

    beta0 = np.linalg.lstsq(X, 0.5 * np.log(d2 + 1e-6) + 0.635, rcond=None)[0]  # E log|z| = -0.635
    res = minimize(nll, np.concatenate([beta0, [np.log(0.5)]]), jac=True, method="L-BFGS-B")
    return SidePrior(res.x[:-1], float(np.exp(np.clip(res.x[-1], lo, hi))))


#: feature groups of :func:`extent_features` beyond the intercept and the default box's sides
EXTENT_FEATURE_GROUPS = ("class", "crowding")


def choose_by_learned_extent(boxes: pd.DataFrame, candidates: pd.DataFrame, clicks: pd.DataFrame,
                             reference: pd.DataFrame | None = None, folds: int = 5,
                             image_sizes: dict | None = None, groups: Sequence[str] = EXTENT_FEATURE_GROUPS,
                             l2: float = SIDE_PRIOR_L2) -> tuple[pd.DataFrame, dict]:
    """Stage 5 with two clicks, per axis, with a prior learned across images: each paired click's box among its
    ``candidates`` maximising, summed over the two axes,

        log N(d; 0, s^2) + log N(log s; x beta, sigma^2),   s = sqrt(2) k side

    with ``d`` the pair's difference along the axis and ``side`` the candidate's. The prior (:class:`SidePrior`
    on :func:`extent_features`, one per axis) is fitted on the click pairs of the other folds' images
    (:func:`image_fold`; cross-fitted like :func:`choose_by_extent`); the clicks fix only ``s``, so the error scale
    ``k`` (one for both axes) is set so that the prior's mean log side over the training clicks equals that of
    their default boxes (self-calibrated) or of their ``reference`` sides (``w, h`` by click_id,
    :func:`reference_boxes`). The map enters through the candidates and the features, not as a fixed-spread prior
    around the default box as in :func:`choose_by_extent`. A lone click, a fallback box or a click without
    candidates keeps its box. ``groups`` (a subset of :data:`EXTENT_FEATURE_GROUPS`) and ``l2``
    (:func:`fit_side_prior`) are there for ablations (bench/two_click_probe.py). Arguments and result as
    :func:`choose_by_extent`'s (the report lists each fold's ``k``, the two ``sigma`` and the number of training
    pairs)."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    if set(groups) - set(EXTENT_FEATURE_GROUPS):
        raise ValueError(f"unknown feature groups {sorted(set(groups) - set(EXTENT_FEATURE_GROUPS))}; "
                         f"known: {list(EXTENT_FEATURE_GROUPS)}")
    out = boxes.copy()
    c = clicks.set_index("click_id").reindex(out["click_id"])
    paired = (c["n_clicks"].to_numpy(float) == 2)
    diff = {"x": np.where(paired, c["x_a"].to_numpy(float) - c["x_b"].to_numpy(float), np.nan),
            "y": np.where(paired, c["y_a"].to_numpy(float) - c["y_b"].to_numpy(float), np.nan)}
    ok = (out["status"] == "ok").to_numpy() & paired
    side0 = {"x": (out.x2 - out.x1).to_numpy(float), "y": (out.y2 - out.y1).to_numpy(float)}
    if reference is None:
        anchor, source = side0, "default boxes (self-calibrated)"
    else:
        ref = reference.reindex(out["click_id"])
        anchor, source = {"x": ref["w"].to_numpy(float), "y": ref["h"].to_numpy(float)}, "reference boxes"
    fold = np.array([image_fold(i, folds) for i in out["image_id"].astype(str)])
    row_of = pd.Series(np.arange(len(out)), index=out["click_id"].to_numpy())
    cand = candidates[candidates["click_id"].isin(out.loc[ok, "click_id"])].copy()
    cand_rows = row_of.reindex(cand["click_id"]).to_numpy()
    cand_side = {"x": (cand.x2 - cand.x1).to_numpy(float), "y": (cand.y2 - cand.y1).to_numpy(float)}
    cand["logp"] = -np.inf
    all_classes = sorted(out["class"].astype(str).unique())
    features = {a: extent_features(out, clicks, a, all_classes, image_sizes) for a in ("x", "y")}
    models = []
    for f in range(folds):
        train = ok & (fold != f)
        counts = out.loc[train, "class"].astype(str).value_counts()
        kept = [k for k in all_classes if counts.get(k, 0) >= MIN_CLASS_PAIRS][1:] if "class" in groups else []
        columns = ([0, 1, 2] + [3 + all_classes.index(k) for k in kept]  # intercept, sides, the kept classes
                   + (list(range(3 + len(all_classes), features["x"].shape[1])) if "crowding" in groups else []))
        priors, means = {}, {}
        for axis in ("x", "y"):
            X = features[axis][:, columns]
            try:
                priors[axis] = fit_side_prior(X[train], diff[axis][train], l2)
            except TooFewPairs as e:
                raise TooFewPairs(f"fold {f} of {folds}: {e}; the default-box prior (choose_by_extent, "
                                  "--box-area-prior axes) needs fewer") from e
            means[axis] = priors[axis].mean(X)
        # log(sqrt(2) k): the prior's mean log s minus the mean log side of the anchor, both axes pooled
        gaps = [means[a][train] - np.log(anchor[a][train]) for a in ("x", "y")]
        gaps = np.concatenate([g[np.isfinite(g)] for g in gaps])
        if not len(gaps):
            raise ValueError(f"fold {f}: no training click pair has a {'default' if reference is None else 'reference'} "
                             "box to set the click error scale k")
        log_s_per_side = float(np.mean(gaps))
        models.append({"k": float(np.exp(log_s_per_side) / np.sqrt(2)), "sigma_x": priors["x"].sigma,
                       "sigma_y": priors["y"].sigma, "pairs": int(train.sum()), "classes": len(kept) + 1})
        sel = fold[cand_rows] == f
        rows = cand_rows[sel]
        logp = np.zeros(int(sel.sum()))
        for axis in ("x", "y"):
            ls = np.log(np.maximum(cand_side[axis][sel], 1e-6)) + log_s_per_side
            logp += -ls - diff[axis][rows] ** 2 / (2 * np.exp(2 * ls)) \
                - (ls - means[axis][rows]) ** 2 / (2 * priors[axis].sigma ** 2)
        cand.loc[sel, "logp"] = logp
    chosen, changed = _keep_best(out, cand, "logp", largest=True)
    report = {"model": "learned", "groups": list(groups), "l2": l2, "reference": source,
              "paired": int(paired.sum()), "chosen": chosen, "changed": changed, "folds": folds, "models": models}
    return out, report
