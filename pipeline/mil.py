"""Click-supervised multiple-instance learning (paper 001: Papadopoulos, Uijlings, Keller, Ferrari, "Training object
class detectors with click supervision", CVPR 2017) as a pseudo-box source: one box per click, chosen among the
proposals that contain the click by an appearance model re-trained over a few rounds with multi-folding.

* **Candidates** of a click (:func:`click_candidates`): the proposals that contain it, at most
  ``max_candidates`` of them (the nearest centers first). A click inside no proposal keeps its initial window.
* **Features** (:func:`extract_features`): one forward of the trained crop classifier's trunk per image (the image
  resized to ``image_side`` px on its longest side), each box ``roi_align``-ed from the feature map at ``layer``
  and average-pooled, then L2-normalised. One forward per image instead of one per crop is what makes a few hundred
  boxes per click affordable on a CPU.
* **Box-center score** (:func:`box_center_score`): ``s_bc(p; c) = exp(-d^2 / (2 sigma_bc^2))`` with ``d`` the
  distance from the proposal's center to the click, divided by ``sqrt(area of p)`` (``center_norm="sqrt_area"``)
  or by the image diagonal (``"diagonal"``).
* **Box-area score** (two clicks): :func:`pipeline.clickpairs.area_score` against the expected log area of an
  :class:`pipeline.clickpairs.AreaModel` of the pair's distance, cross-fitted (:func:`pipeline.clickpairs.
  crossfit_area`) on the boxes of a first MIL pass without it (:func:`mil_boxes`): no ground truth, and no image's
  own box enters its expectation.
* **Appearance model** (:func:`fit_appearance`): one linear one-vs-rest logistic regression per class over the
  features, fitted jointly (one weight matrix, L-BFGS, from zeros: deterministic). For class ``c``: positives are
  the current boxes of the clicks of ``c``; negatives are proposals of the images without a click of ``c`` (a
  seeded sample per image, :func:`negative_sample`) and the current boxes of other classes in such images. Every
  class's positives and negatives weigh half of its loss each.
* **Initialisation**: each click's largest click-centred window inside the image (:func:`init_window`).
* **Re-localisation** (:func:`relocalize`): per click, the candidate maximising ``p_app * s_bc [* s_ba]`` (sum of
  logs), ``p_app`` the appearance model's probability of the click's class.
* **Multi-folding** (:func:`run_mil`): the images fall in ``folds`` folds (:func:`pipeline.clickpairs.image_fold`);
  each round, for each fold, a model trained on the other folds' images only (:func:`fit_fold`) re-localises the
  clicks of the held-out fold; ``rounds`` rounds.

docs/method.md ("Click-supervised MIL") says why each choice; docs/results.md has the measurements.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .boxes import PSEUDO_COLUMNS
from .cam_crops import image_tensor
from .clickpairs import area_score, crossfit_area, image_fold, log_area, pair_distance
from .imageio import read_image
from .selection import contains_click, fallback_windows, rank_by_center_distance

log = logging.getLogger(__name__)

#: what the box-center distance is divided by (:func:`box_center_score`)
CENTER_NORMS = ("sqrt_area", "diagonal")
#: the status of a click inside no proposal: its box is the initial window (``fallback=True``)
NO_PROPOSAL = "no_proposal"


@dataclass(frozen=True)
class MILParams:
    """Everything that determines the MIL boxes besides the classifier, the proposals and the clicks."""

    rounds: int = 3
    folds: int = 10
    sigma_bc: float = 0.15
    center_norm: str = "sqrt_area"
    max_candidates: int = 200
    negatives_per_image: int = 50
    l2: float = 1e-4
    max_iter: int = 50
    image_side: int = 480
    layer: str = ""
    pca_dims: int = 256
    area_folds: int = 5
    area_slope: float | None = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.center_norm not in CENTER_NORMS:
            raise ValueError(f"center_norm must be one of {CENTER_NORMS}, got {self.center_norm!r}")
        for name in ("rounds", "max_candidates", "image_side", "max_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"MIL {name} must be >= 1, got {getattr(self, name)}")
        if self.folds < 2 or self.area_folds < 2:
            raise ValueError(f"MIL needs at least 2 folds (folds {self.folds}, area_folds {self.area_folds})")
        if self.negatives_per_image < 0 or self.l2 < 0 or self.pca_dims < 0 or not self.sigma_bc > 0:
            raise ValueError("MIL negatives_per_image, l2 and pca_dims must be >= 0 and sigma_bc > 0")

    def as_dict(self) -> dict:
        return asdict(self)


# -- geometry and scores -------------------------------------------------------------------------------------
def box_center_score(boxes, click_xy, sigma: float, norm: str = "sqrt_area", image_size=None) -> np.ndarray:
    """The box-center score ``exp(-d^2 / (2 sigma^2))`` of ``(N, 4)`` boxes for one click ``(x, y)`` (or one click
    per box, ``(N, 2)``): ``d`` is the Euclidean distance from the box's center to the click divided by
    ``sqrt(box area)`` (``norm="sqrt_area"``) or by the image diagonal (``"diagonal"``; ``image_size`` ``(W, H)``,
    or one per box ``(N, 2)``)."""
    return np.exp(log_box_center_score(boxes, click_xy, sigma, norm, image_size))


def log_box_center_score(boxes, click_xy, sigma: float, norm: str = "sqrt_area", image_size=None) -> np.ndarray:
    """``log`` of :func:`box_center_score`, ``-d^2 / (2 sigma^2)``, computed directly (no underflow)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    c = np.asarray(click_xy, np.float64).reshape(-1, 2)
    d = np.hypot((b[:, 0] + b[:, 2]) / 2 - c[:, 0], (b[:, 1] + b[:, 3]) / 2 - c[:, 1])
    if norm == "sqrt_area":
        scale = np.sqrt(np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-12))
    elif norm == "diagonal":
        if image_size is None:
            raise ValueError("box_center_score(norm='diagonal') needs image_size=(W, H)")
        wh = np.asarray(image_size, np.float64).reshape(-1, 2)
        scale = np.hypot(wh[:, 0], wh[:, 1])
    else:
        raise ValueError(f"norm must be one of {CENTER_NORMS}, got {norm!r}")
    return -((d / scale) ** 2) / (2.0 * sigma * sigma)


def init_window(x: float, y: float, width: int, height: int) -> np.ndarray:
    """The initial box of a click (paper 001): centred on the click, as large as possible inside the image."""
    return fallback_windows(x, y, width, height, scales=(1.0,))[0]


def click_candidates(proposals: np.ndarray, x: float, y: float, cap: int) -> np.ndarray:
    """The proposals that contain the click, the ``cap`` nearest by center distance, nearest first (``(K, 4)``)."""
    p = np.asarray(proposals, np.float32).reshape(-1, 4)
    inside = p[contains_click(p, x, y)]
    order, _ = rank_by_center_distance(inside, x, y)
    return inside[order[:cap]]


def negative_sample(proposals: np.ndarray, n: int, seed: int, image_id: str) -> np.ndarray:
    """A seeded sample of ``n`` of an image's proposals (all when it has fewer), in store order; the draw depends
    on the seed and the image id only (not on which other images are in the run)."""
    p = np.asarray(proposals, np.float32).reshape(-1, 4)
    if len(p) <= n:
        return p
    key = int(hashlib.md5(str(image_id).encode()).hexdigest()[:8], 16)
    idx = np.sort(np.random.default_rng([seed, key]).choice(len(p), size=n, replace=False))
    return p[idx]


# -- features ------------------------------------------------------------------------------------------------
def feature_layer(model, layer: str = "") -> str:
    """``layer``, or the model's deepest convolutional layer that is a cut point of ``split()`` (efficientnet:
    ``conv_head``, the map the classifier's head pools)."""
    cut = [k for k, v in model.layers.items() if v.stride and not v.sub]
    if layer:
        if layer not in cut:
            raise ValueError(f"MIL feature layer {layer!r} is not a convolutional cut point of {model.name}: {cut}")
        return layer
    return max(cut, key=lambda k: list(model.body._modules).index(model.layers[k].module))


@torch.no_grad()
def extract_features(trunk: torch.nn.Module, model, image: np.ndarray, boxes: np.ndarray, side: int,
                     stride: int) -> np.ndarray:
    """L2-normalised features of ``boxes`` (``(K, 4)``, original-image pixels) in ``image``: the image resized to
    ``side`` px on its longest side, one ``trunk`` forward, each box ``roi_align``-ed (3 x 3 bins, 2 samples per
    bin) from the feature map and averaged. Returns float32 ``(K, D)``."""
    device = next(trunk.parameters()).device
    img = image_tensor(image, device)
    h, w = img.shape[-2:]
    scale = side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)
    fmap = trunk(model.normalize(x))
    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4), device=device)
    if len(b) == 0:
        return np.zeros((0, fmap.shape[1]), np.float32)
    rois = torch.cat([torch.zeros(len(b), 1, device=device), b], 1)
    pooled = roi_align(fmap, rois, output_size=(3, 3), spatial_scale=scale / stride, sampling_ratio=2,
                       aligned=True).mean((2, 3))
    return F.normalize(pooled, dim=1).cpu().numpy().astype(np.float32)


@dataclass
class MILData:
    """The features of one run: per click its initial window and its candidates (contiguous, ``cand_offsets``),
    per image its negative sample; image folds and labels (classes clicked in the image)."""

    classes: tuple
    image_ids: list
    image_sizes: np.ndarray      # (n_images, 2) width, height
    image_labels: np.ndarray     # (n_images, C) bool: a click of the class in the image
    clicks: pd.DataFrame         # the click table, in this order
    click_image: np.ndarray      # (n_clicks,) image index
    click_class: np.ndarray      # (n_clicks,) class index
    init_boxes: np.ndarray       # (n_clicks, 4)
    init_feats: np.ndarray       # (n_clicks, D) float16
    no_proposal: np.ndarray      # (n_clicks,) bool: the candidates are the initial window alone
    cand_boxes: np.ndarray       # (M, 4)
    cand_feats: np.ndarray       # (M, D) float16
    cand_offsets: np.ndarray     # (n_clicks + 1,)
    neg_feats: np.ndarray        # (K, D) float16
    neg_image: np.ndarray        # (K,) image index
    folds: int = 10

    @property
    def image_fold(self) -> np.ndarray:
        return np.array([image_fold(i, self.folds) for i in self.image_ids])

    @property
    def click_fold(self) -> np.ndarray:
        return self.image_fold[self.click_image]

    def cand_click(self) -> np.ndarray:
        """The click index of every candidate."""
        return np.repeat(np.arange(len(self.click_image)), np.diff(self.cand_offsets))


def _image_boxes(clicks: pd.DataFrame, proposals: np.ndarray, size, image_id: str, params: MILParams):
    """(init windows, candidate lists, negatives) of one image's clicks."""
    w, h = size
    inits = [init_window(float(x), float(y), w, h) for x, y in zip(clicks.x, clicks.y)]
    cands = [click_candidates(proposals, float(x), float(y), params.max_candidates)
             for x, y in zip(clicks.x, clicks.y)]
    cands = [c if len(c) else i[None] for c, i in zip(cands, inits)]
    return np.asarray(inits, np.float32).reshape(-1, 4), cands, negative_sample(
        proposals, params.negatives_per_image, params.seed, image_id)


def build_mil_data(model, clicks: pd.DataFrame, images: pd.DataFrame, proposals: Mapping[str, np.ndarray],
                   classes, params: MILParams, progress: Iterable | None = None) -> MILData:
    """Features of every click's initial window and candidates and of each image's negative sample, with one
    forward of ``model``'s trunk (up to :func:`feature_layer`) per image. ``images``: ``image_id, width, height,
    path`` of the clicked images; ``proposals[image_id]``: ``(K, 4)`` boxes. ``progress`` wraps the image loop."""
    layer = feature_layer(model, params.layer)
    trunk, stride = model.split(layer)[0].eval(), model.layers[layer].stride
    cls_index = {c: i for i, c in enumerate(classes)}
    clicks = clicks.assign(image_id=clicks.image_id.astype(str)).sort_values(["image_id", "click_id"],
                                                                             kind="mergesort")
    imgs = images.assign(image_id=images.image_id.astype(str)).drop_duplicates("image_id").set_index("image_id")
    ids = sorted(set(clicks.image_id))
    groups = clicks.groupby("image_id", sort=True).indices
    inits, init_f, cands, cand_f, negs, neg_img = [], [], [], [], [], []
    for n, image_id in enumerate(progress(ids) if progress else ids):
        rows = clicks.iloc[groups[image_id]]
        size = (int(imgs.at[image_id, "width"]), int(imgs.at[image_id, "height"]))
        init, cand, neg = _image_boxes(rows, proposals[image_id], size, image_id, params)
        allb = np.concatenate([init, *cand, neg]) if len(neg) else np.concatenate([init, *cand])
        feats = extract_features(trunk, model, read_image(imgs.at[image_id, "path"]), allb, params.image_side,
                                 stride).astype(np.float16)
        k = len(init)
        inits.append(init), init_f.append(feats[:k])
        for c in cand:
            cands.append(c), cand_f.append(feats[k:k + len(c)])
            k += len(c)
        negs.append(feats[k:]), neg_img.append(np.full(len(feats) - k, n))
    return _assemble(classes, cls_index, ids, imgs, clicks, inits, init_f, cands, cand_f, negs, neg_img,
                     params.folds)


def _assemble(classes, cls_index, ids, imgs, clicks, inits, init_f, cands, cand_f, negs, neg_img, folds) -> MILData:
    image_pos = {i: n for n, i in enumerate(ids)}
    labels = np.zeros((len(ids), len(classes)), bool)
    click_image = clicks.image_id.map(image_pos).to_numpy(np.int64)
    click_class = clicks["class"].map(cls_index).to_numpy(np.int64)
    labels[click_image, click_class] = True
    sizes = imgs.loc[ids, ["width", "height"]].to_numpy(np.int64).reshape(-1, 2)
    lens = np.array([len(c) for c in cands], np.int64)
    init_boxes = np.concatenate(inits) if inits else np.zeros((0, 4), np.float32)
    cand_boxes = np.concatenate(cands) if cands else np.zeros((0, 4), np.float32)
    no_prop = np.array([len(c) == 1 and np.array_equal(c[0], i) for c, i in zip(cands, init_boxes)], bool)
    dim = init_f[0].shape[1] if init_f else 0
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0, dim), np.float16)  # noqa: E731
    return MILData(tuple(classes), ids, sizes, labels, clicks.reset_index(drop=True), click_image, click_class,
                   init_boxes, cat(init_f), no_prop, cand_boxes, cat(cand_f),
                   np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), cat(negs),
                   np.concatenate(neg_img).astype(np.int64) if neg_img else np.zeros(0, np.int64), folds)


def project_pca(data: MILData, dims: int) -> tuple[MILData, float]:
    """``data`` with every feature projected on the ``dims`` principal axes of the negative sample (proposals of
    every image, no label or box involved), centred, as float16; and the fraction of the variance kept. ``dims``
    0 or at least the feature size: ``data`` unchanged (fraction 1). Deterministic: ``eigh`` of the float64
    covariance, each axis's sign fixed by its largest component."""
    d = data.neg_feats.shape[1]
    if dims == 0 or dims >= d or len(data.neg_feats) < 2:
        return data, 1.0
    x = data.neg_feats.astype(np.float64)
    mean = x.mean(0)
    with one_thread():
        vals, vecs = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(np.cov(x - mean, rowvar=False))))
    order = np.argsort(vals)[::-1][:dims]
    axes = vecs[:, order] * np.sign(vecs[np.abs(vecs[:, order]).argmax(0), order])
    kept = float(vals[order].sum() / max(vals.sum(), 1e-300))
    mean32, axes32 = mean.astype(np.float32), axes.astype(np.float32)

    def proj(f: np.ndarray) -> np.ndarray:
        out = np.empty((len(f), dims), np.float16)
        for i in range(0, len(f), 65536):  # in blocks: no float32 copy of the whole array
            out[i:i + 65536] = (f[i:i + 65536].astype(np.float32) - mean32) @ axes32
        return out

    return replace(data, init_feats=proj(data.init_feats), cand_feats=proj(data.cand_feats),
                   neg_feats=proj(data.neg_feats)), kept


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread inside: the model fits and the PCA are many small operations, which threads do not
    speed up, and which stall when another process holds the other cores (measured: docs/experiments.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the appearance model ------------------------------------------------------------------------------------
def fit_appearance(x: np.ndarray, y: np.ndarray, mask: np.ndarray, l2: float, max_iter: int = 100,
                   init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest logistic regressions fitted jointly: ``x`` ``(N, D)`` features, ``y`` ``(N, C)`` 0/1 targets,
    ``mask`` ``(N, C)`` whether row ``n`` is a training example of class ``c``. Minimises, over ``W`` ``(D, C)`` and
    ``b`` ``(C,)``, ``mean_c [mean of the BCE over c's positives + mean over its negatives] / 2 + l2 / 2 ||W||^2``
    with L-BFGS (strong Wolfe line search, at most ``max_iter`` iterations) in float32, from ``init`` (a previous
    ``(W, b)``, warm start) or zeros: no random draw, so the same inputs give the same model. A class without
    positives or negatives only has the penalty (its weights go to 0). Returns ``(W, b)``."""
    X = torch.as_tensor(np.asarray(x, np.float32))
    Y = torch.as_tensor(np.asarray(y, np.float32))
    M = torch.as_tensor(np.asarray(mask, bool))
    pos, neg = (M & (Y > 0.5)).float(), (M & (Y <= 0.5)).float()
    weight = (pos / pos.sum(0).clamp(min=1) + neg / neg.sum(0).clamp(min=1)) / (2 * Y.shape[1])
    w0, b0 = init if init is not None else (np.zeros((X.shape[1], Y.shape[1])), np.zeros(Y.shape[1]))
    W = torch.tensor(np.asarray(w0, np.float32), requires_grad=True)
    b = torch.tensor(np.asarray(b0, np.float32), requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(X @ W + b, Y, reduction="none") * weight).sum()
        loss = loss + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with one_thread():
        opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def fold_training_set(data: MILData, chosen_feats: np.ndarray, fold: int) -> tuple[np.ndarray, ...]:
    """``(x, y, mask)`` of the model that re-localises ``fold``: only the images of the other folds. Positives: the
    current boxes (``chosen_feats``, one row per click) of the clicks of those images; negatives of class ``c``:
    their negative samples and current boxes in images without a click of ``c``."""
    train_img = data.image_fold != fold
    pos = train_img[data.click_image]
    neg = train_img[data.neg_image]
    x = np.concatenate([chosen_feats[pos], data.neg_feats[neg]])
    n_pos, n_cls = int(pos.sum()), len(data.classes)
    y = np.zeros((len(x), n_cls))
    y[np.arange(n_pos), data.click_class[pos]] = 1.0
    absent = ~data.image_labels[np.concatenate([data.click_image[pos], data.neg_image[neg]])]
    mask = absent | (y > 0.5)
    return x, y, mask


def fit_fold(data: MILData, chosen_feats: np.ndarray, fold: int, params: MILParams, init=None):
    """The appearance model ``(W, b)`` that re-localises the clicks of ``fold`` (:func:`fold_training_set`),
    from ``init`` (the fold's model of the previous round) when given."""
    return fit_appearance(*fold_training_set(data, chosen_feats, fold), params.l2, params.max_iter, init)


def fold_logits(data: MILData, model: tuple[np.ndarray, np.ndarray], cand: np.ndarray) -> np.ndarray:
    """The appearance logits of candidates ``cand`` (indices) for their clicks' classes, class by class."""
    W, b = (np.asarray(m, np.float32) for m in model)
    cls = data.click_class[data.cand_click()[cand]]
    out = np.empty(len(cand), np.float64)
    for c in np.unique(cls):
        at = np.flatnonzero(cls == c)
        out[at] = data.cand_feats[cand[at]].astype(np.float32) @ W[:, c] + b[c]
    return out


# -- re-localisation ------------------------------------------------------------------------------------------
def relocalize(log_score: np.ndarray, offsets: np.ndarray, clicks: Iterable[int]) -> np.ndarray:
    """Per click of ``clicks``, the index (into the candidate arrays) of its candidate with the highest
    ``log_score`` (the first on ties); ``offsets`` delimit each click's candidates."""
    return np.array([offsets[i] + int(np.argmax(log_score[offsets[i]:offsets[i + 1]])) for i in clicks], np.int64)


def log_prior(data: MILData, params: MILParams, mu=None, sigma=None) -> np.ndarray:
    """``log s_bc [+ log s_ba]`` of every candidate: the box-center score for its click, and, when ``mu`` /
    ``sigma`` (expected log area and spread per click, NaN for none) are given, the box-area score."""
    owner = data.cand_click()
    xy = data.clicks[["x", "y"]].to_numpy(np.float64)[owner]
    out = log_box_center_score(data.cand_boxes, xy, params.sigma_bc, params.center_norm,
                               data.image_sizes[data.click_image[owner]])
    if mu is not None:
        m, s = np.asarray(mu, float)[owner], np.asarray(sigma, float)[owner]
        ok = np.isfinite(m)
        area = np.exp(log_area(data.cand_boxes))
        sba = np.ones(len(owner))
        sba[ok] = area_score(area[ok], m[ok], s[ok])
        out = out + np.log(np.maximum(sba, 1e-300))
    return out


@dataclass
class MILResult:
    choice: np.ndarray        # (n_clicks,) index into the candidate arrays
    log_score: np.ndarray     # (n_clicks,) log p_app + log prior of the chosen candidate
    log_app: np.ndarray       # (n_clicks,) log p_app of the chosen candidate
    cand_log_app: np.ndarray  # (M,) log p_app of every candidate in the last round
    history: list             # per round: fraction of the clicks whose box changed (round 1: from the init window)


def run_mil(data: MILData, params: MILParams, prior: np.ndarray, progress=None) -> MILResult:
    """``params.rounds`` rounds of re-training and re-localisation with ``params.folds`` folds, from the initial
    windows; ``prior`` is :func:`log_prior`. Returns each click's final candidate."""
    n = len(data.click_image)
    folds, owner = data.click_fold, data.cand_click()
    chosen = data.init_feats
    choice, log_app_c = np.full(n, -1, np.int64), np.zeros(len(data.cand_boxes))
    history, models = [], {}
    rounds = range(params.rounds)
    for r in (progress(rounds) if progress else rounds):
        new = np.full(n, -1, np.int64)
        for f in range(params.folds):
            held = np.flatnonzero(folds == f)
            if not len(held):
                continue
            sel = np.flatnonzero(np.isin(owner, held))
            models[f] = fit_fold(data, chosen, f, params, models.get(f))  # warm start: last round's model
            log_app_c[sel] = -np.logaddexp(0.0, -fold_logits(data, models[f], sel))
            new[held] = relocalize(log_app_c + prior, data.cand_offsets, held)
        before = data.init_boxes if r == 0 else data.cand_boxes[choice]
        history.append(float(np.mean(np.any(data.cand_boxes[new] != before, axis=1))))
        choice = new
        chosen = data.cand_feats[choice]
    return MILResult(choice, (log_app_c + prior)[choice], log_app_c[choice], log_app_c, history)


def mil_boxes(data: MILData, params: MILParams, progress=None) -> tuple[pd.DataFrame, dict]:
    """The pseudo boxes (:data:`pipeline.boxes.PSEUDO_COLUMNS` plus ``p_app``, ``s_bc``, ``s_ba``) and a report.

    One click per object: one MIL pass with the box-center score. Two (the clicks table has ``n_clicks``, some 2):
    a first pass without the area score gives reference boxes; the area model is cross-fitted on them by image
    folds (:func:`pipeline.clickpairs.crossfit_area`) and a second pass, from the initial windows again, adds the
    box-area score; the second pass's boxes are returned."""
    data, kept = project_pca(data, params.pca_dims)
    center = log_prior(data, params)
    res = run_mil(data, params, center, progress)
    report = {"params": params.as_dict(), "clicks": len(data.click_image), "images": len(data.image_ids),
              "candidates": int(len(data.cand_boxes)), "negatives": int(len(data.neg_feats)),
              "feature_dims": int(data.cand_feats.shape[1]), "pca_variance_kept": kept,
              "no_proposal": int(data.no_proposal.sum()), "changed_per_round": res.history}
    mu = sigma = None
    pairs = "n_clicks" in data.clicks and (data.clicks["n_clicks"] == 2).sum() >= 3
    if pairs:
        ref = np.exp(log_area(data.cand_boxes[res.choice]))
        mu, sigma, models = crossfit_area(data.clicks.image_id, pair_distance(data.clicks), ref,
                                          folds=params.area_folds, slope=params.area_slope)
        report["area_models"] = [asdict(m) for m in models]
        report["first_pass_changed_per_round"] = res.history
        res = run_mil(data, params, log_prior(data, params, mu, sigma), progress)
        report["changed_per_round"] = res.history
    return _box_table(data, params, res, center, mu, sigma), report


def _box_table(data: MILData, params: MILParams, res: MILResult, center: np.ndarray, mu, sigma) -> pd.DataFrame:
    c, boxes = data.clicks, data.cand_boxes[res.choice]
    s_ba = np.ones(len(c))
    if mu is not None:
        ok = np.isfinite(mu)
        s_ba[ok] = area_score(np.exp(log_area(boxes[ok])), mu[ok], sigma[ok])
    status = np.where(data.no_proposal, NO_PROPOSAL, "ok")
    df = pd.DataFrame({"image_id": c.image_id.astype(str).to_numpy(), "class": c["class"].to_numpy(),
                       "x1": boxes[:, 0].astype(float), "y1": boxes[:, 1].astype(float),
                       "x2": boxes[:, 2].astype(float), "y2": boxes[:, 3].astype(float),
                       "score": np.exp(res.log_score), "click_id": c.click_id.to_numpy(np.int64),
                       "fallback": data.no_proposal.copy(), "status": status,
                       "p_app": np.exp(res.log_app), "s_bc": np.exp(center[res.choice]), "s_ba": s_ba})
    return df[PSEUDO_COLUMNS + ["p_app", "s_bc", "s_ba"]].sort_values("click_id", kind="mergesort") \
        .reset_index(drop=True)


__all__ = ["CENTER_NORMS", "NO_PROPOSAL", "MILParams", "MILData", "MILResult", "box_center_score", "init_window",
           "click_candidates", "negative_sample", "feature_layer", "extract_features", "build_mil_data",
           "fit_appearance", "fold_training_set", "fit_fold", "relocalize", "log_prior", "run_mil", "mil_boxes",
           "log_box_center_score", "fold_logits", "project_pca"]
