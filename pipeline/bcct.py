"""Seed 002 (BC-CT, ../shared/papers/002_*.txt, sections 3-4): foreground masks from a background image set.

The paper trains a class-agnostic binary model (BC) to tell target images from a few "Background Images", takes the
gradient of its score with respect to the input pixels (Eq. 1) as a map that covers whole objects, thresholds it at
``delta * max`` (Eq. 2) and keeps the largest connected component as a mask; the mask then supervises the CAM
branch of the classifier (CT). Here:

* **Background set from clicks** (:func:`background_boxes`): crops of selective-search proposals of the trainval
  images that contain no click of any class (neither as a continuous box nor on the pixels the crop is cut on,
  :func:`pipeline.geometry.crop_bounds`) and of which every selected proposal of stage 2 covers less than
  ``overlap_max`` (intersection over the crop's area, :func:`covered_fraction`; an IoU threshold, as first built,
  let small crops of object parts inside a large object's selected proposals through): with clicks on every object,
  such a region is background of this very dataset (the paper collected
  its images from the internet; :func:`folder_background` takes such a folder instead). A seeded random choice of
  at most ``per_image`` crops per image (mutually overlapping less than :data:`SPREAD_IOU`), at most ``total`` in
  all; :func:`contact_sheet` draws a sample to judge them by eye.
* **BC model** (:func:`build_bc_model`, :func:`train_bc_model`): the frozen ImageNet backbone
  (:func:`pipeline.backbones.build_backbone` with one output) and its new linear output trained with BCE
  (Eq. 3), positives (click crops) against background crops drawn with equal probability (the smaller set is
  resampled to the larger's size: :func:`balanced_rows`), through :func:`pipeline.engine.fit` (checkpoint per epoch,
  resume).
* **Gradient map** (Eq. 1, :func:`gradient_maps`): ``|d score / d pixels|``, the maximum over the colour channels
  (Simonyan et al.'s saliency, which the paper's "backward to original images" is). The CAM store machinery
  computes it per click crop and pastes the crops' maps into one image-sized map per click
  (:class:`pipeline.cam_methods.InputGradient`, ``write_cam_store(method="input_gradient")``).
* **Mask** (Eq. 2, :func:`bc_mask`): the map, optionally smoothed (``sigma``, a fraction of the map's longer side:
  an addition, a raw gradient map is speckled pixel noise), thresholded at ``delta * max`` and reduced to its
  largest 8-connected component (``scipy.ndimage.label``), or to the component holding a given point.
* **Use at inference** (:func:`spread_over_mask`, ``--box-bc-mask on`` of stage 5): within the click's Voronoi cell
  the BC mask's component containing the click takes the fused CAM's maximum, so the thresholded region covers at
  least that component.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import box_iou

from .backbones import build_backbone
from .classifier import CropDataset, EpochSampler, lr_factor
from .dataset import scan_images
from .engine import FitSpec, Step, epoch_seed, fit
from .geometry import crop_and_resize
from .imageio import read_image
from .io import atomic_path

log = logging.getLogger(__name__)

BACKGROUND_COLUMNS = ["image_id", "path", "x1", "y1", "x2", "y2", "source"]
#: crops drawn from one image overlap each other less than this (IoU), so an image's crops are not one region
SPREAD_IOU = 0.5
BC_CLASSES = ("foreground",)
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"
#: the one-channel "layer" of the gradient map in a CAM store
INPUT_LAYER = "input"


# -- the background set --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackgroundParams:
    """How background crops are chosen (:func:`background_boxes`)."""

    per_image: int = 4          # at most this many crops per image
    total: int = 400            # at most this many in all (0: no cap)
    overlap_max: float = 0.1    # the fraction of the crop that any selected proposal of its image covers, below this
    min_side_px: float = 32.0   # a crop's shorter side at least this
    seed: int = 0

    def __post_init__(self):
        if self.per_image < 1 or self.total < 0:
            raise ValueError(f"per_image must be >= 1 and total >= 0, got {self.per_image}, {self.total}")
        if not 0 < self.overlap_max <= 1:
            raise ValueError(f"overlap_max must be in (0, 1], got {self.overlap_max}")

    def as_dict(self) -> dict:
        return asdict(self)


def click_free(boxes: np.ndarray, clicks_xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boolean ``(K,)``: the boxes that contain none of the clicks ``(M, 2)``, neither as continuous boxes
    (``x1 <= x <= x2``, borders included) nor on the pixels a crop of them is cut on (the pixel holding the click
    among :func:`pipeline.geometry.crop_bounds`' pixels)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    c = np.asarray(clicks_xy, np.float64).reshape(-1, 2)
    if not len(c):
        return np.ones(len(b), bool)
    x, y = c[:, 0][None], c[:, 1][None]
    inside = (b[:, :1] <= x) & (x <= b[:, 2:3]) & (b[:, 1:2] <= y) & (y <= b[:, 3:4])
    ix1 = np.clip(np.floor(b[:, 0]), 0, width - 1)
    iy1 = np.clip(np.floor(b[:, 1]), 0, height - 1)
    ix2 = np.maximum(np.minimum(np.ceil(b[:, 2]), width), ix1 + 1)
    iy2 = np.maximum(np.minimum(np.ceil(b[:, 3]), height), iy1 + 1)
    cx, cy = np.clip(np.floor(x), 0, width - 1), np.clip(np.floor(y), 0, height - 1)
    on_pixels = (ix1[:, None] <= cx) & (cx < ix2[:, None]) & (iy1[:, None] <= cy) & (cy < iy2[:, None])
    return ~(inside | on_pixels).any(1)


def covered_fraction(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """``(K, M)``: the fraction of each box's area that each of ``others`` covers (intersection over the box's own
    area; at least its IoU with it)."""
    b, o = np.asarray(boxes, np.float64).reshape(-1, 1, 4), np.asarray(others, np.float64).reshape(1, -1, 4)
    w = np.clip(np.minimum(b[..., 2], o[..., 2]) - np.maximum(b[..., 0], o[..., 0]), 0, None)
    h = np.clip(np.minimum(b[..., 3], o[..., 3]) - np.maximum(b[..., 1], o[..., 1]), 0, None)
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return w * h / np.maximum(area, 1e-12)


def _spread_choice(boxes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` rows of ``boxes`` in a seeded random order, each overlapping the ones taken before it less than
    :data:`SPREAD_IOU`."""
    taken: list[int] = []
    for k in rng.permutation(len(boxes)):
        if len(taken) == n:
            break
        if not taken or box_iou(torch.from_numpy(boxes[k:k + 1]), torch.from_numpy(boxes[taken])).max() < SPREAD_IOU:
            taken.append(int(k))
    return np.array(taken, dtype=np.int64)


def background_boxes(proposals: Mapping[str, np.ndarray], clicks: pd.DataFrame, selected: pd.DataFrame,
                     images: pd.DataFrame, params: BackgroundParams | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Background crops of ``images`` (``image_id, width, height, path``): see the module docstring.

    ``proposals``: image id -> ``(K, 4)`` boxes (a :class:`pipeline.proposals.ProposalStore`); ``clicks``: all
    clicks (``image_id, x, y``); ``selected``: stage 2's table (``image_id, x1..y2``). Returns ``(crops, counts)``:
    ``crops`` has :data:`BACKGROUND_COLUMNS` (source ``proposal``), ``counts`` one row per image: ``image_id,
    proposals, click_free, candidates, chosen`` (chosen after the ``total`` cap)."""
    p = params or BackgroundParams()
    clicks_by = {str(k): g[["x", "y"]].to_numpy(np.float64) for k, g in clicks.groupby(clicks.image_id.astype(str))}
    sel_by = {str(k): g[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
              for k, g in selected.groupby(selected.image_id.astype(str))}
    rows, counts = [], []
    table = images.drop_duplicates("image_id").sort_values("image_id", kind="mergesort")
    for k, r in enumerate(table.itertuples(index=False)):
        image_id, w, h = str(r.image_id), int(r.width), int(r.height)
        boxes = np.asarray(proposals[image_id], np.float64).reshape(-1, 4) if image_id in proposals \
            else np.zeros((0, 4))
        free = click_free(boxes, clicks_by.get(image_id, np.zeros((0, 2))), w, h)
        ok = free & (np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= p.min_side_px)
        sel = sel_by.get(image_id)
        if sel is not None and len(sel) and ok.any():
            ok[np.flatnonzero(ok)[covered_fraction(boxes[ok], sel).max(1) >= p.overlap_max]] = False
        cand = boxes[ok]
        chosen = cand[_spread_choice(cand, p.per_image, np.random.default_rng([p.seed, 17, k]))]
        rows += [(image_id, str(r.path), *b, "proposal") for b in chosen.tolist()]
        counts.append((image_id, len(boxes), int(free.sum()), int(ok.sum()), len(chosen)))
    crops = pd.DataFrame(rows, columns=BACKGROUND_COLUMNS)
    counts = pd.DataFrame(counts, columns=["image_id", "proposals", "click_free", "candidates", "chosen"])
    if p.total and len(crops) > p.total:
        keep = np.sort(np.random.default_rng([p.seed, 19]).choice(len(crops), p.total, replace=False))
        crops = crops.iloc[keep].reset_index(drop=True)
        counts["chosen"] = counts.image_id.map(crops.image_id.value_counts()).fillna(0).astype(int)
    return crops, counts


def folder_background(folder: str | Path, total: int = 0, seed: int = 0) -> pd.DataFrame:
    """Whole images of a folder (recursively, :func:`pipeline.dataset.scan_images`) as background crops, ids
    prefixed ``bg:`` (source ``folder``); a seeded choice of ``total`` when it is > 0 and there are more."""
    found = scan_images(folder)
    if total and len(found) > total:
        found = found.iloc[np.sort(np.random.default_rng([seed, 19]).choice(len(found), total, replace=False))]
    rows = []
    for image_id, path in found.itertuples(index=False):
        h, w = read_image(path).shape[:2]
        rows.append((f"bg:{image_id}", str(path), 0.0, 0.0, float(w), float(h), "folder"))
    return pd.DataFrame(rows, columns=BACKGROUND_COLUMNS)


def contact_sheet(crops: pd.DataFrame, path: str | Path, n: int = 48, seed: int = 0, tile: int = 96,
                  columns: int = 8) -> Path | None:
    """A PNG grid of a seeded random sample of ``n`` crops (``path, x1..y2``), each resized to ``tile`` px; None
    when there is no crop."""
    if not len(crops) or n <= 0:
        return None
    take = np.sort(np.random.default_rng([seed, 23]).choice(len(crops), min(n, len(crops)), replace=False))
    tiles = [crop_and_resize(read_image(r.path), (r.x1, r.y1, r.x2, r.y2), tile)
             for r in crops.iloc[take].itertuples(index=False)]
    return grid_png(tiles, path, columns)


def grid_png(tiles: list[np.ndarray], path: str | Path, columns: int = 8, pad: int = 2) -> Path:
    """Writes RGB tiles of one shape as a PNG grid of ``columns`` columns on white, ``pad`` px between tiles."""
    th, tw = tiles[0].shape[:2]
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = np.full((rows * (th + pad), cols * (tw + pad), 3), 255, np.uint8)
    o = pad // 2
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * (th + pad) + o:r * (th + pad) + o + th, c * (tw + pad) + o:c * (tw + pad) + o + tw] = t
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.tobytes())
    return Path(path)


# -- the BC model ---------------------------------------------------------------------------------------------------
@dataclass
class BCConfig:
    """Training of the BC model's linear output (stored as ``args`` in its checkpoint)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    seed: int = 0
    device: str = "cpu"
    RUNTIME_FIELDS = ("device",)


def build_bc_model(backbone: str, weights: str = "imagenet", seed: int = 0) -> nn.Module:
    """The BC model: ``backbone`` with ImageNet ``weights`` and one new linear output; the body frozen
    (``requires_grad`` off; it stays in eval mode in training, so its BatchNorm statistics and dropout are the
    pretrained network's)."""
    model = build_backbone(backbone, 1, weights, seed=seed)
    for p in model.body.parameters():
        p.requires_grad_(False)
    return model.eval()


def balanced_rows(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Row indices in which both labels (0 / 1) are equally frequent: every row of the larger set once, and the
    smaller set repeated (all of it as often as it fits, the rest a seeded choice) to the larger's size, so a
    shuffled epoch draws a positive or a background with equal probability (paper 3.2). ValueError when a label
    has no row."""
    labels = np.asarray(labels)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if not len(pos) or not len(neg):
        raise ValueError(f"the BC training set needs positives and backgrounds, got {len(pos)} and {len(neg)}")
    small, large = (pos, neg) if len(pos) < len(neg) else (neg, pos)
    reps, rest = divmod(len(large), len(small))
    extra = np.random.default_rng([seed, 29]).choice(small, rest, replace=False)
    return np.sort(np.concatenate([large, np.tile(small, reps), extra]))


def bc_training_set(positives: pd.DataFrame, background: pd.DataFrame, *, input_size: int, mean, std,
                    seed: int = 0, augment=None) -> CropDataset:
    """A :class:`pipeline.classifier.CropDataset` of the positive crops (target 1) and the background crops
    (target 0), both ``image_id, path, x1..y2``, balanced by :func:`balanced_rows`."""
    from .classifier import Augment

    both = pd.concat([positives.assign(target=1), background.assign(target=0)], ignore_index=True)
    both = both.iloc[balanced_rows(both.target.to_numpy(), seed)].reset_index(drop=True)
    paths = dict(zip(both.image_id.astype(str), both.path.astype(str)))
    return CropDataset(both.image_id.astype(str).tolist(), both[["x1", "y1", "x2", "y2"]].to_numpy(),
                       both.target.to_numpy(np.int64), paths, input_size=input_size, mean=mean, std=std,
                       augment=Augment() if augment is None else (augment or None), seed=seed,
                       classes=("background", "foreground"))


def bc_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3: mean BCE of the BC model's score on a batch (the frozen body without autograd); ``(loss, hits)``."""
    with torch.no_grad():
        feats = model.body(x)
    logits = model.head(feats)[:, 0]
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), y.float())
    return loss, (logits.detach() > 0).eq(y > 0.5).sum()


class _BCTask:
    """:func:`train_bc_model`'s part of :func:`pipeline.engine.fit`."""

    def __init__(self, model: nn.Module, dataset: CropDataset, cfg: BCConfig, device: torch.device):
        self.model, self.dataset, self.cfg, self.device = model, dataset, cfg, device
        self.sampler = EpochSampler(dataset.image_ids, seed=cfg.seed)
        self.hits = 0

    def start_epoch(self, epoch: int) -> None:
        self.model.eval()  # frozen body: pretrained BatchNorm statistics, no dropout
        self.sampler.set_epoch(epoch)
        self.hits = 0

    def batches(self, epoch: int) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          drop_last=len(self.dataset) > self.cfg.batch_size)

    def step(self, net: nn.Module, batch) -> Step:
        x, y = (t.to(self.device) for t in batch)
        loss, hits = bc_loss(net, x, y)
        return Step(loss, x.shape[0], {"hits": hits})

    def record(self, step: Step, share: float) -> None:
        self.hits += int(step.logs["hits"])

    def describe(self, batch, step: Step) -> str:
        return ""

    def end_epoch(self, stats) -> dict:
        return {"epoch": stats.epoch + 1, "loss": stats.loss_sum / max(stats.items, 1),
                "accuracy": self.hits / max(stats.items, 1), "lr": stats.lr_start.get("head", float("nan")),
                "crops": stats.items, "seconds": round(stats.seconds, 3)}


def train_bc_model(model: nn.Module, dataset: CropDataset, out_dir: str | Path, cfg: BCConfig | None = None,
                   progress: bool = True, on_epoch_end=None) -> pd.DataFrame:
    """Train the BC model's linear output on ``dataset`` (:func:`bc_training_set`) with SGD, warmup + cosine;
    ``out_dir/checkpoint.pt`` after every epoch, resumed when present (the same weights as an uninterrupted run).
    Returns the log (``epoch, loss, accuracy, lr, crops, seconds``)."""
    cfg = cfg or BCConfig()
    device = torch.device(cfg.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    head = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": head, "lr": cfg.lr, "name": "head"}], lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    per_epoch = max(1, len(dataset) // cfg.batch_size) if len(dataset) > cfg.batch_size else 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(it, per_epoch * cfg.epochs,
                                                                         cfg.warmup_fraction))
    spec = FitSpec(model, opt, _BCTask(model, dataset, cfg, device), out_dir / CHECKPOINT_NAME, asdict(cfg),
                   cfg.epochs, device, scheduler=sched, seed=lambda e, r: epoch_seed(cfg.seed, e) + r,
                   runtime_args=BCConfig.RUNTIME_FIELDS, log_csv=out_dir / LOG_NAME, name="BC model")
    rows = fit(spec, resume=True, progress=progress, on_epoch_end=on_epoch_end)
    model.eval()
    return pd.DataFrame(rows)


# -- Eq. 1 and Eq. 2 ------------------------------------------------------------------------------------------------
def gradient_maps(model: nn.Module, x: torch.Tensor, output: int = 0) -> torch.Tensor:
    """Eq. 1: ``(B, H, W)`` maps ``max_c |d score_b / d x_b[c]|`` of the model's ``output`` score for a batch of
    network inputs ``(B, 3, H, W)`` (:class:`pipeline.cam_methods.InputGradient`; model in eval mode, so a sample's
    score depends on that sample alone and one backward of the summed scores gives every sample's gradient)."""
    from .cam_methods import InputGradient

    with InputGradient(model) as grad:
        return grad(x, torch.full((x.shape[0],), int(output), dtype=torch.long))


def bc_mask(gmap: np.ndarray, delta: float = 0.8, sigma: float = 0.0, point: tuple[float, float] | None = None,
            region: np.ndarray | None = None) -> np.ndarray:
    """Eq. 2 and its component rule: boolean ``HxW`` mask of ``gmap >= delta * max(gmap)`` reduced to its largest
    8-connected component (ties: the lowest label, i.e. first in row-major order), or, with ``point = (x, y)``, to
    the component holding that point (else the one with the pixel nearest to it, as
    :func:`pipeline.boxes.click_region`). ``sigma`` > 0 first smooths the map with a Gaussian of ``sigma`` times
    its longer side (pixels); ``region`` (boolean ``HxW``) restricts map and mask to it. An all-False mask when
    the map has no positive value there."""
    from .boxes import click_region

    g = np.asarray(gmap, np.float32)
    if g.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {g.shape}")
    if not 0 < delta <= 1:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    if sigma > 0:
        g = ndimage.gaussian_filter(g, sigma * max(g.shape), mode="nearest")
    if region is not None:
        g = np.where(region, g, 0.0)
    hi = float(g.max()) if g.size else 0.0
    if not np.isfinite(g).all() or hi <= 0:
        return np.zeros(g.shape, bool)
    labels, n = ndimage.label(g >= delta * hi, structure=np.ones((3, 3), bool))
    if point is not None:
        lab = click_region(labels, float(point[0]), float(point[1]))
    else:
        lab = 1 + int(np.argmax(np.bincount(labels.ravel(), minlength=n + 1)[1:]))
    return labels == lab


def spread_over_mask(cam: np.ndarray, gmap: np.ndarray, x: float, y: float, delta: float = 0.8,
                     sigma: float = 0.0, cell: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``--box-bc-mask on``: the fused CAM with its maximum (over ``cell``, the click's Voronoi cell, or the whole
    map) written over the BC mask's component that holds the click (:func:`bc_mask` of ``gmap`` with ``point``,
    restricted to ``cell``), so thresholding keeps at least that component. Returns ``(map, mask pixels)``; the map
    unchanged (0 pixels) when either map is unusable."""
    cam = np.asarray(cam, np.float32)
    gmap = np.asarray(gmap, np.float32)
    if cam.shape != gmap.shape:
        raise ValueError(f"CAM {cam.shape} and BC map {gmap.shape} differ in shape")
    if not np.isfinite(cam).all():
        return cam, 0
    mask = bc_mask(gmap, delta, sigma, point=(x, y), region=cell)
    top = float(cam[cell].max()) if cell is not None and cell.any() else float(cam.max())
    if not mask.any() or top <= 0:
        return cam, 0
    return np.where(mask, np.maximum(cam, np.float32(top)), cam), int(mask.sum())


def with_bc_masks(items, bc_store_dir: str | Path, clicks: pd.DataFrame, partition: str, delta: float,
                  sigma: float, stats: dict):
    """Stage 5's ``(entry_id, fused map, meta)`` items with :func:`spread_over_mask` applied to each click that has a
    BC map in the CAM store at ``bc_store_dir`` (``input_gradient`` maps, entry id = click id), inside its Voronoi
    cell against the clicks ``partition`` picks (:func:`pipeline.clicks.other_clicks`). ``stats`` counts ``masked``
    clicks and their mask ``pixels``."""
    from .boxes import click_cell
    from .cam_store import CamStore
    from .clicks import other_clicks

    by_image = {str(k): g for k, g in clicks.groupby(clicks.image_id.astype(str), sort=False)}
    stats.update(masked=0, pixels=0)
    with CamStore(bc_store_dir) as store:
        for entry_id, cam, meta in items:
            if cam is not None and entry_id in store:
                x, y = float(meta["x"]), float(meta["y"])
                others = other_clicks(by_image.get(str(meta["image_id"])), int(entry_id), meta["class"], partition)
                cell = click_cell(cam.shape, x, y, others)
                cam, px = spread_over_mask(cam, store.load(entry_id)[0], x, y, delta, sigma, cell)
                stats["masked"] += int(px > 0)
                stats["pixels"] += px
            yield entry_id, cam, meta


def positive_crops(selected: pd.DataFrame, images: pd.DataFrame, max_crops: int = 0, seed: int = 0) -> pd.DataFrame:
    """The BC model's positives: stage 2's selected crops (``image_id, x1..y2``) with their image paths, a seeded
    choice of ``max_crops`` when > 0."""
    paths = dict(zip(images.image_id.astype(str), images.path.astype(str)))
    pos = selected.assign(image_id=selected.image_id.astype(str))
    pos = pos.assign(path=pos.image_id.map(paths))[["image_id", "path", "x1", "y1", "x2", "y2"]]
    if pos.path.isna().any():
        raise ValueError(f"{int(pos.path.isna().sum())} selected crops name images outside the images table")
    if max_crops and len(pos) > max_crops:
        pos = pos.iloc[np.sort(np.random.default_rng([seed, 31]).choice(len(pos), max_crops, replace=False))]
    return pos.reset_index(drop=True)


def click_entries_bc(selected: pd.DataFrame, max_crops: int | None = None) -> list:
    """CAM-store entries of every click for the BC gradient maps: its selected crops, target the BC model's one
    output (class ``foreground``)."""
    from .cam_writer import click_entries

    return click_entries(selected.assign(**{"class": BC_CLASSES[0]}), BC_CLASSES, max_crops)



# -- CT: the masks supervise the classifier ----------------------------------------------------------------------------
class CTNet(nn.Module):
    """Paper 4.1's CT model: the classifier (``net``, a :class:`pipeline.backbones.ClassifierNet`) and a mask branch
    on its ``layer`` activation (3x3 conv, ReLU, 1x1 conv to one channel; the paper's two 3x3 convolutions of 1024
    filters shrunk to ``width``). ``forward`` returns the classifier's logits and keeps the branch's input for
    :meth:`mask_logits`; the head learning rate applies to the branch too. Only ``net`` is saved as the classifier."""

    def __init__(self, net: nn.Module, layer: str, width: int = 128, seed: int = 0):
        super().__init__()
        self.net = net
        channels = net.layers[layer].channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.mask_head = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True),
                                           nn.Conv2d(width, 1, 1))
        self._features: torch.Tensor | None = None
        self._hook = net.layer_module(layer).register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self._features = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def mask_logits(self) -> torch.Tensor:
        """``(B, 1, h, w)`` mask branch logits of the last forward."""
        if self._features is None:
            raise RuntimeError("CTNet.mask_logits() before a forward pass")
        return self.mask_head(self._features)

    def head_parameters(self):
        yield from self.net.head.parameters()
        yield from self.mask_head.parameters()

    def backbone_parameters(self):
        return self.net.body.parameters()


class CTLoss:
    """Eq. 5-6's mask loss, an auxiliary loss of :func:`pipeline.classifier.train_classifier`: the mask branch's map
    (:class:`CTNet`), upsampled to the crop, against the BC mask of the same (augmented) crop (:func:`bc_mask` of
    :func:`gradient_maps` of ``bc_model``, largest component), binary cross-entropy (the paper's Eq. 5 has only the
    foreground term, which a map of ones would minimise), times ``weight``. ``mean_std`` / ``bc_mean_std``: the
    normalisations of the classifier's and the BC model's inputs (the crop is renormalised between them)."""

    def __init__(self, bc_model: nn.Module, weight: float = 1.0, delta: float = 0.8, sigma: float = 0.01,
                 mean_std=((0.5,) * 3, (0.5,) * 3), bc_mean_std=None):
        self.bc, self.weight, self.delta, self.sigma = bc_model.eval(), float(weight), float(delta), float(sigma)
        self.norm = [torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in mean_std]
        self.bc_norm = [torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)
                        for v in (bc_mean_std or (bc_model.mean, bc_model.std))]

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` float BC masks of the normalised crops ``x``."""
        (m, s), (bm, bs) = [[t.to(x.device) for t in p] for p in (self.norm, self.bc_norm)]
        g = gradient_maps(self.bc, ((x.detach().float() * s + m) - bm) / bs).cpu().numpy()
        masks = np.stack([bc_mask(gi, self.delta, self.sigma) for gi in g]).astype(np.float32)
        return torch.from_numpy(masks)[:, None].to(x.device)

    def __call__(self, net: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        pred = nn.functional.interpolate(net.mask_logits().float(), size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)
        return self.weight * nn.functional.binary_cross_entropy_with_logits(pred, self.targets(x))
