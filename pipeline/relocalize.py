"""Re-localisation of the pseudo boxes by a detector trained on them (seed 001's "deep MIL"), cross-fitted by folds.

Every pseudo box of stage 5 comes from its own click's CAM; a detector trained on all of them learns each class's
appearance and box regression from thousands of boxes, and re-localises each object with what it learned from the
*others*. One round (:func:`relocalize_round`, the stage ``RelocalizeBoxes``):

* **Folds** (:func:`fold_assignment`): the trainval images fall in ``folds`` folds of (nearly) equal size, by a
  permutation seeded with the data seed. The detector of fold ``f`` trains on the current boxes of the images of
  the *other* folds only and re-localises the clicks of fold ``f``'s images, so no image is re-localised by a
  detector that trained on its own box.
* **Candidates** of a click: the detections of its class in its image (every proposal regressed by the class's box
  regression, per-class NMS at ``nms``; 1.0, the default, keeps all of them, as MIL keeps all proposals) with a
  score of at least ``min_score``, that contain the click.
* **Choice** (:func:`choose_boxes`): the candidate maximising ``score * s_bc [* s_ba]`` (a sum of logs), ``s_bc`` the
  box-center score of :func:`pipeline.mil.box_center_score` (distance of the box center to the click over
  ``sqrt(box area)``, ``sigma_bc``) and, with two clicks per object, ``s_ba`` the box-area score
  (:func:`pipeline.clickpairs.area_score`) against the click pair's expected area, cross-fitted on the input
  boxes of other images (:func:`expected_areas`, as :func:`pipeline.clickpairs.choose_by_area` self-calibrates).
* A click without a candidate (the detector saw nothing confident of its class there) **keeps its input box**.
  Both are counted (``relocalized``, ``kept``), and ``moved``: the re-localised boxes with IoU < ``moved_iou``
  to their input box.

Round ``k + 1`` trains its detectors on round ``k``'s boxes (round 0: the pseudo-box stage's). docs/method.md
("Re-localisation by a detector") says why; docs/results.md has the measurements (``bench/quality.py
--relocalize``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .boxes import PSEUDO_COLUMNS
from .clickpairs import area_score, crossfit_area, log_area, pair_distance
from .detector import DetectionDataset, FastRCNN, detect
from .mil import log_box_center_score

log = logging.getLogger(__name__)

BOX = ["x1", "y1", "x2", "y2"]
#: columns :func:`choose_boxes` adds to :data:`pipeline.boxes.PSEUDO_COLUMNS` (NaN scores where a box was kept)
RELOCALIZE_COLUMNS = ["relocalized", "moved", "fold", "det_score", "s_bc", "s_ba"]
#: no per-image cap on the candidates (the score threshold bounds them)
ALL_DETECTIONS = 2 ** 31 - 1


@dataclass(frozen=True)
class RelocalizeParams:
    """What decides a round's boxes besides the detectors (their training: ``RelocalizeDetector``)."""

    folds: int = 2
    min_score: float = 0.5     # a detection below this is not confident: no candidate
    sigma_bc: float = 0.15     # the box-center score's sigma (pipeline.mil's, center distance / sqrt(area))
    nms: float = 1.0           # per-class NMS IoU of the candidates; 1.0: none
    area_folds: int = 5        # two clicks: image folds of the cross-fitted area model
    area_slope: float | None = 2.0  # two clicks: the area model's slope (None: fitted), as MILParams
    moved_iou: float = 0.5     # a re-localised box "moved" when its IoU with its input box is below this

    def __post_init__(self) -> None:
        if self.folds < 2 or self.area_folds < 2:
            raise ValueError(f"re-localisation needs at least 2 folds (folds {self.folds}, area_folds "
                             f"{self.area_folds}): a detector must not re-localise its own training images")
        if not 0.0 <= self.min_score <= 1.0 or not 0.0 < self.nms <= 1.0 or not self.sigma_bc > 0:
            raise ValueError(f"re-localisation needs 0 <= min_score <= 1 (got {self.min_score}), 0 < nms <= 1 "
                             f"(got {self.nms}) and sigma_bc > 0 (got {self.sigma_bc})")

    def as_dict(self) -> dict:
        return asdict(self)


# -- folds --------------------------------------------------------------------------------------------------
def fold_assignment(image_ids: Sequence[str], folds: int, seed: int) -> pd.Series:
    """Each image's fold (``0..folds-1``), indexed by image id: the sorted ids in an order permuted with ``seed``,
    dealt out in turn, so fold sizes differ by at most one and the assignment depends only on the set of ids, the
    number of folds and the seed."""
    ids = sorted({str(i) for i in image_ids})
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    if len(ids) < folds:
        raise ValueError(f"{len(ids)} image(s) cannot fill {folds} folds: every fold's detector needs images to "
                         f"train on and to re-localise")
    order = np.random.default_rng([int(seed), int(folds)]).permutation(len(ids))
    fold = np.empty(len(ids), np.int64)
    fold[order] = np.arange(len(ids)) % folds
    return pd.Series(fold, index=pd.Index(ids, name="image_id"), name="fold")


def training_image_ids(assignment: pd.Series, fold: int) -> list[str]:
    """The images fold ``fold``'s detector trains on: those of every other fold."""
    if not 0 <= fold < int(assignment.max()) + 1:
        raise ValueError(f"fold {fold} is not one of the {int(assignment.max()) + 1} folds")
    return list(assignment.index[assignment.to_numpy() != fold])


def held_out_image_ids(assignment: pd.Series, fold: int) -> list[str]:
    """The images fold ``fold``'s detector re-localises: its own fold's, none of which it trained on."""
    return list(assignment.index[assignment.to_numpy() == fold])


# -- candidates ---------------------------------------------------------------------------------------------
def fold_detections(model: FastRCNN, images: pd.DataFrame, proposals, params: RelocalizeParams, device="cpu",
                    progress: bool = True) -> pd.DataFrame:
    """The candidate detections of ``model`` on ``images`` (``image_id, path, width, height``): every class's
    boxes scoring at least ``params.min_score``, per-class NMS at ``params.nms``, no per-image cap
    (:func:`pipeline.detector.detect`). ``proposals``: the images' proposal store (None for a faster_rcnn)."""
    dataset = DetectionDataset(images, proposals, model.classes)
    dets, _ = detect(model, dataset, device, progress=progress,
                     test_settings={"score_thresh": params.min_score, "nms_thresh": params.nms,
                                    "detections_per_img": ALL_DETECTIONS})
    return dets


def expected_areas(clicks: pd.DataFrame, boxes: pd.DataFrame, params: RelocalizeParams
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Two clicks per object: each box's click pair's expected log area and spread (NaN for a lone click),
    cross-fitted on the areas of the input ``boxes`` that are not fallbacks (self-calibrated:
    :func:`pipeline.clickpairs.crossfit_area`, no image's own box in its estimate); ``(None, None)`` with one click
    per object (fewer than 3 pairs)."""
    if "n_clicks" not in clicks.columns or int((clicks["n_clicks"] == 2).sum()) < 3:
        return None, None
    c = clicks.set_index("click_id").reindex(boxes["click_id"].to_numpy())
    d = np.where(c["n_clicks"].to_numpy(float) == 2, pair_distance(c), np.nan)
    area = ((boxes.x2 - boxes.x1) * (boxes.y2 - boxes.y1)).to_numpy(float)
    ref = np.where(~boxes["fallback"].astype(bool).to_numpy(), area, np.nan)
    mu, sigma, _ = crossfit_area(c["image_id"].astype(str).to_numpy(), d, ref, folds=params.area_folds,
                                 slope=params.area_slope)
    return mu, sigma


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]`` (``(N, 4)`` boxes each; continuous coordinates, as ``box_iou``)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# -- the choice ---------------------------------------------------------------------------------------------
def choose_boxes(clicks: pd.DataFrame, boxes: pd.DataFrame, detections: pd.DataFrame, folds: pd.Series,
                 params: RelocalizeParams, mu=None, sigma=None) -> tuple[pd.DataFrame, dict]:
    """One box per click: the candidate detection maximising ``log score + log s_bc [+ log s_ba]``, or the click's
    input box when it has no candidate (module docstring).

    ``clicks``: ``click_id, x, y``; ``boxes``: the input pseudo boxes, one per click (:data:`PSEUDO_COLUMNS`);
    ``detections``: ``image_id, class, score, x1..y2``, each image's from the detector of its fold (the caller
    guarantees it: :func:`relocalize_round`); ``folds``: :func:`fold_assignment`; ``mu`` / ``sigma``: the expected
    log area per box (:func:`expected_areas`; None: no area score). Returns ``(boxes, report)``: ``boxes`` with
    :data:`PSEUDO_COLUMNS` and :data:`RELOCALIZE_COLUMNS` (a re-localised box: ``status`` ok, not a fallback,
    ``score`` the product of the three scores), ``report``: the counts."""
    out = boxes[PSEUDO_COLUMNS].reset_index(drop=True).copy()
    out["image_id"] = out["image_id"].astype(str)
    missing = sorted(set(out["click_id"]) - set(clicks["click_id"]))
    if missing:
        raise ValueError(f"re-localisation: boxes of clicks not in the clicks table, e.g. {missing[:3]}")
    xy = clicks.set_index("click_id").loc[out["click_id"], ["x", "y"]].to_numpy(float)
    n = len(out)
    mu = np.full(n, np.nan) if mu is None else np.asarray(mu, float)
    sigma = np.full(n, np.nan) if sigma is None else np.asarray(sigma, float)
    own = pd.DataFrame({"row": np.arange(n), "image_id": out["image_id"], "class": out["class"],
                        "cx": xy[:, 0], "cy": xy[:, 1], "mu": mu, "sigma": sigma})
    dets = detections.assign(image_id=detections["image_id"].astype(str)).reset_index(drop=True)
    dets = dets.assign(det_order=np.arange(len(dets)))
    cand = own.merge(dets, on=["image_id", "class"], how="inner")
    inside = ((cand.x1 <= cand.cx) & (cand.cx <= cand.x2) & (cand.y1 <= cand.cy) & (cand.cy <= cand.y2)
              & (cand.score >= params.min_score))
    cand = cand[inside.to_numpy()].reset_index(drop=True)
    b = cand[BOX].to_numpy(float)
    log_bc = log_box_center_score(b, cand[["cx", "cy"]].to_numpy(float), params.sigma_bc)
    s_ba = np.ones(len(cand))
    ok = np.isfinite(cand["mu"].to_numpy(float))
    s_ba[ok] = area_score(np.exp(log_area(b[ok])), cand["mu"].to_numpy(float)[ok], cand["sigma"].to_numpy(float)[ok])
    cand["s_bc"], cand["s_ba"] = np.exp(log_bc), s_ba
    cand["log_score"] = np.log(cand["score"].to_numpy(float)) + log_bc + np.log(np.maximum(s_ba, 1e-300))
    # per click the highest combined score; ties: the detector's order (score, descending)
    best = cand.sort_values(["row", "log_score", "det_order"], ascending=[True, False, True], kind="mergesort") \
        .drop_duplicates("row")
    rows = best["row"].to_numpy()
    before = out[BOX].to_numpy(float, copy=True)  # (a view of the frame otherwise, changed by the writes below)
    out["relocalized"] = False
    out["det_score"] = out["s_bc"] = out["s_ba"] = np.nan
    out.loc[rows, BOX] = best[BOX].to_numpy(float)
    out.loc[rows, "score"] = np.exp(best["log_score"].to_numpy(float))
    out.loc[rows, ["det_score", "s_bc", "s_ba"]] = best[["score", "s_bc", "s_ba"]].to_numpy(float)
    out.loc[rows, "relocalized"] = True
    out.loc[rows, "fallback"] = False
    out.loc[rows, "status"] = "ok"
    out["fallback"] = out["fallback"].astype(bool)
    out["moved"] = out["relocalized"].to_numpy() & (paired_iou(out[BOX].to_numpy(float), before) < params.moved_iou)
    out["fold"] = folds.reindex(out["image_id"]).to_numpy()
    report = {"clicks": n, "relocalized": int(out["relocalized"].sum()), "kept": int((~out["relocalized"]).sum()),
              "moved": int(out["moved"].sum()), "candidates": int(len(cand)), "area_score": bool(ok.any()),
              "moved_iou": params.moved_iou}
    return out[PSEUDO_COLUMNS + RELOCALIZE_COLUMNS], report


def relocalize_round(clicks: pd.DataFrame, boxes: pd.DataFrame, images: pd.DataFrame, folds: pd.Series,
                     detector_for_fold: Callable[[int], FastRCNN], proposals, params: RelocalizeParams,
                     device="cpu", trained_on: Mapping[int, Iterable[str]] | None = None,
                     progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One round: each fold's detector (``detector_for_fold(f)``, trained without fold ``f``'s images) detects on
    fold ``f``'s images (those of ``images`` with a box), then :func:`choose_boxes`. ``trained_on`` (fold -> the
    image ids its detector trained on) is checked: a detector that trained on an image of its own fold is an error.
    Returns ``(boxes, candidate detections with their fold, report)``."""
    ids = set(boxes["image_id"].astype(str))
    images = images.assign(image_id=images["image_id"].astype(str))
    unknown = sorted(ids - set(folds.index))
    if unknown:
        raise ValueError(f"re-localisation: images without a fold, e.g. {unknown[:3]}")
    parts = []
    for f in range(int(folds.max()) + 1):
        held = images[images["image_id"].isin(set(held_out_image_ids(folds, f)) & ids)]
        leak = sorted(set(held["image_id"]) & {str(i) for i in (trained_on or {}).get(f, ())})
        if leak:
            raise ValueError(f"re-localisation: the detector of fold {f} trained on {len(leak)} of the images it "
                             f"would re-localise, e.g. {leak[:3]}")
        if held.empty:
            continue
        dets = fold_detections(detector_for_fold(f), held, proposals, params, device, progress)
        parts.append(dets.assign(fold=f))
        log.info("re-localisation fold %d: %d images, %d candidate detections", f, len(held), len(dets))
    dets = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["image_id", "class", "score", *BOX, "fold"])
    mu, sigma = expected_areas(clicks, boxes.reset_index(drop=True), params)
    out, report = choose_boxes(clicks, boxes, dets.drop(columns="fold"), folds, params, mu, sigma)
    return out, dets, {**report, "detections": int(len(dets)), "params": params.as_dict()}


def round_row(round_index: int, boxes: pd.DataFrame, metrics: dict | None, report: dict | None) -> dict:
    """One row of the per-round table: the round, its box-CorLoc / CorLoc / mean IoU (with ground truth: the
    export's ``metrics``), and, for a re-localisation round, how many boxes were re-localised, kept and moved."""
    m = metrics or {}
    return {"round": int(round_index), "boxes": int(len(boxes)),
            "box_corloc": m.get("box_accuracy"), "corloc": m.get("corloc"), "mean_iou": m.get("mean_iou"),
            "relocalized": None if report is None else report["relocalized"],
            "kept": None if report is None else report["kept"], "moved": None if report is None else report["moved"]}


def rounds_markdown(rows: list[dict]) -> str:
    """The per-round table of the summary (percent; "-" where a value does not exist)."""
    from .markdown import markdown_table

    def pct(v):
        return "-" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"

    def num(v):
        return "-" if v is None else str(v)

    return markdown_table(["round", "boxes", "box-CorLoc", "CorLoc", "mean IoU", "re-localised", "kept CAM box",
                           "moved (IoU < 0.5 with input)"],
                          [(r["round"], r["boxes"], pct(r["box_corloc"]), pct(r["corloc"]), pct(r["mean_iou"]),
                            num(r["relocalized"]), num(r["kept"]), num(r["moved"])) for r in rows], "rrrrrrrr")


__all__ = ["RelocalizeParams", "RELOCALIZE_COLUMNS", "fold_assignment", "training_image_ids", "held_out_image_ids",
           "fold_detections", "expected_areas", "paired_iou", "choose_boxes", "relocalize_round", "round_row",
           "rounds_markdown"]
