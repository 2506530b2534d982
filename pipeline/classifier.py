"""Stage 3: the crop classifier (and the paper's image-label-only baseline).

The classifier is fine-tuned on the proposals kept for each click (``selected.parquet`` of the SelectProposals stage),
each crop labelled with its click's class (``num_classes`` = the dataset's classes). The image-label-only variant
(paper, Table IV) trains the same network on whole images with multi-label targets (``BCEWithLogitsLoss``), or,
with seed 003's CAM layer and a GMP / SPAM pooling in place of its head (:mod:`pipeline.pooling`), that network.

Pieces:

- :func:`crop_bounds` / :func:`crop_and_resize`: the one crop geometry (also for the CAM stage, which must paste maps
  back onto exactly the pixels a crop was cut from).
- :class:`CropDataset`: ``(image, box, target)`` rows -> ``(normalised CxSxS float tensor, target)``; training-time
  augmentation (:class:`Augment`: horizontal flip, colour jitter, box jitter) drawn from ``(seed, epoch, index)`` so
  results do not depend on worker count, resuming or order; decoded images cached per worker (LRU, byte budget).
  Built by :func:`selection_dataset` (crops) or :func:`image_label_dataset` (whole images).
- :class:`EpochSampler`: seeded per-epoch shuffle, optionally *windowed* (the crops of a window of images are
  shuffled together) so that an image's several crops are cut while it is still in the worker's cache.
- :func:`train_classifier`: crops, logits and loss plugged into :func:`pipeline.engine.fit` (SGD/AdamW, head
  learning rate x ``head_lr_mult``, warmup + cosine per iteration, AMP on CUDA, DataLoader workers, tqdm).
  On a CPU with frozen BatchNorm a batch is forwarded and backpropagated in micro-batches (:func:`micro_batch_size`;
  the same gradient up to rounding, one micro-batch's activations held at a time).
  Checkpoint dict ``{model, optimizer, lr_scheduler, scaler, epoch, args, log}`` (torchvision references style)
  written atomically after every epoch; ``resume`` continues from it and ends with the same weights as an
  uninterrupted run (bit-identical on CPU). A NaN/inf loss raises :class:`NonFiniteLossError` and leaves the last
  good checkpoint in place.
- :func:`save_classifier` / :func:`load_classifier`: ``model.pt`` = backbone name, classes, input size and the state
  dict (plain tensors and JSON-like metadata; loadable with ``weights_only=True`` and without the training code).
- Several processes (torch DDP): :func:`train_classifier` run by each of ``torchrun``'s processes (see
  :mod:`pipeline.distributed`) wraps the model in ``DistributedDataParallel`` and gives each rank its piece of
  every global batch of ``batch_size`` (so the optimizer steps and the samples per step are those of one process);
  only rank 0 writes the checkpoint and the log. :func:`train_classifier_distributed` starts such a run from a
  single process and returns like :func:`train_classifier`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from . import distributed as D
from .device import resolve_device
from .engine import (EpochStats, FitSpec, NonFiniteLossError, Step, batchnorm_layers, epoch_seed,  # noqa: F401
                     fit, freeze_batchnorm, normalize)
from .geometry import crop_and_resize, crop_bounds  # noqa: F401 (crop_bounds: re-exported)
from .imageio import read_image
from .io import atomic_path

log = logging.getLogger(__name__)

SELECTION_COLUMNS = ("click_id", "image_id", "class", "x1", "y1", "x2", "y2")
IMAGE_COLUMNS = ("image_id", "width", "height", "path")
MODEL_FORMAT = "clickscale-classifier"
MODEL_FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"


@dataclass(frozen=True)
class Augment:
    """Training augmentation. ``box_jitter``: each box side moves by up to that fraction of the box's width
    (x sides) or height (y sides); colour factors are drawn uniformly in ``[1 - a, 1 + a]``."""

    hflip: float = 0.5
    box_jitter: float = 0.1
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


def jitter_box(box: Sequence[float], amount: float, width: int, height: int,
               rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Move each side of ``box`` by ``U(-amount, amount)`` times the box side, clipped to the image; the box is
    kept when the jittered one would be smaller than one pixel."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if amount <= 0:
        return x1, y1, x2, y2
    bw, bh = x2 - x1, y2 - y1
    d = rng.uniform(-amount, amount, size=4)
    nx1 = min(max(x1 + d[0] * bw, 0.0), width)
    ny1 = min(max(y1 + d[1] * bh, 0.0), height)
    nx2 = min(max(x2 + d[2] * bw, 0.0), width)
    ny2 = min(max(y2 + d[3] * bh, 0.0), height)
    if nx2 - nx1 < 1.0 or ny2 - ny1 < 1.0:
        return x1, y1, x2, y2
    return nx1, ny1, nx2, ny2


def _grey(x: np.ndarray) -> np.ndarray:
    """torchvision's rgb_to_grayscale weights; elementwise (a BLAS matmul could start threads)."""
    return x[..., 0] * np.float32(0.2989) + x[..., 1] * np.float32(0.587) + x[..., 2] * np.float32(0.114)


def colour_jitter(img: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation jitter of an ``HxWx3`` RGB image (uint8 or float in 0..255) as
    torchvision's ``adjust_brightness/contrast/saturation`` define them (blend with black, with the mean grey
    level, with the grey image; clipped to 0..255 after each step). Returns float32. Written in numpy so that data
    preparation never runs on torch's intra-op thread pool (in the training process, tiny parallel ops on a busy
    2-core machine were much slower; docs/experiments.md)."""
    b, c, s = rng.uniform(-1.0, 1.0, size=3)  # one draw per factor whether used or not: a fixed stream
    x = img.astype(np.float32)
    if aug.brightness > 0:
        x = np.clip(x * np.float32(1.0 + b * aug.brightness), 0, 255)
    if aug.contrast > 0:
        f = np.float32(1.0 + c * aug.contrast)
        m = np.float32(_grey(x).mean())
        x = np.clip(f * x + (1 - f) * m, 0, 255)
    if aug.saturation > 0:
        f = np.float32(1.0 + s * aug.saturation)
        grey = _grey(x)[..., None]
        x = np.clip(f * x + (1 - f) * grey, 0, 255)
    return x


# ---------------------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------------------
class _ImageCache:
    """LRU cache of decoded images with a byte budget (one per process: DataLoader workers get their own copy)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: str, path: str) -> np.ndarray:
        img = self.items.get(key)
        if img is not None:
            self.items.move_to_end(key)
            self.hits += 1
            return img
        self.misses += 1
        img = read_image(path)
        if img.nbytes <= self.max_bytes:
            self.items[key] = img
            self.bytes += img.nbytes
            while self.bytes > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.bytes -= old.nbytes
        return img


class CropDataset(Dataset):
    """Crops of images as normalised network inputs.

    Row ``i`` is (``image_ids[i]``, ``boxes[i]`` in 0-based continuous pixel coordinates, ``targets[i]``);
    ``targets`` is ``(N,)`` int class indices or ``(N, C)`` float multi-hot rows (multi-label). ``dataset[i]`` or
    ``dataset[(i, epoch)]`` returns ``(float32 tensor 3 x input_size x input_size, target)``, normalised as
    ``(rgb / 255 - mean) / std``. With ``augment`` the crop is augmented from the random stream
    ``(seed, epoch, i)``; without it the crop is deterministic.
    """

    def __init__(self, image_ids: Sequence[str], boxes: np.ndarray, targets: np.ndarray,
                 image_paths: Mapping[str, str], *, input_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: Augment | None = None, seed: int = 0, classes: Sequence[str] = (),
                 cache_mb: float = 256.0):
        self.image_ids = [str(i) for i in image_ids]
        self.boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.targets = np.asarray(targets)
        n = len(self.image_ids)
        if len(self.boxes) != n or len(self.targets) != n:
            raise ValueError(f"CropDataset: {n} image ids, {len(self.boxes)} boxes, {len(self.targets)} targets")
        self.multilabel = self.targets.ndim == 2
        self.targets = self.targets.astype(np.float32 if self.multilabel else np.int64)
        missing = sorted(set(self.image_ids) - set(image_paths))
        if missing:
            raise KeyError(f"CropDataset: no image path for {len(missing)} image ids, e.g. {missing[:5]}")
        self.image_paths = {i: str(image_paths[i]) for i in set(self.image_ids)}
        bad = ~((self.boxes[:, 2] > self.boxes[:, 0]) & (self.boxes[:, 3] > self.boxes[:, 1]))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"CropDataset: {int(bad.sum())} degenerate boxes, e.g. row {i} of image "
                             f"{self.image_ids[i]}: {self.boxes[i].tolist()}")
        self.input_size = int(input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.augment = augment
        self.seed = int(seed)
        self.classes = tuple(classes)
        self.cache = _ImageCache(int(cache_mb * 2**20))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict:  # a worker started by pickling gets an empty cache of its own
        state = dict(self.__dict__)
        state["cache"] = _ImageCache(self.cache.max_bytes)
        return state

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(self.targets.shape[1]) if self.multilabel else int(self.targets.max()) + 1

    def image(self, image_id: str) -> np.ndarray:
        return self.cache.get(image_id, self.image_paths[image_id])

    def crop(self, index: int, epoch: int = 0) -> np.ndarray:
        """The (augmented) ``S x S x 3`` uint8 crop of row ``index`` for ``epoch``, before colour jitter."""
        return self._crop(index, epoch)[0]

    def _crop(self, index: int, epoch: int):
        img = self.image(self.image_ids[index])
        box = self.boxes[index]
        rng = None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, int(epoch), int(index)])
            h, w = img.shape[:2]
            box = jitter_box(box, self.augment.box_jitter, w, h, rng)
            flip = rng.random() < self.augment.hflip
        crop = crop_and_resize(img, box, self.input_size)
        if rng is not None and flip:
            crop = crop[:, ::-1]
        return np.ascontiguousarray(crop), rng

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"CropDataset index {index} out of range 0..{len(self) - 1}")
        crop, rng = self._crop(index, epoch)
        x = colour_jitter(crop, self.augment, rng) if rng is not None else crop.astype(np.float32)
        x = torch.from_numpy(np.ascontiguousarray(normalize(x, self.mean, self.std).transpose(2, 0, 1)))
        target = torch.from_numpy(self.targets[index]) if self.multilabel else int(self.targets[index])
        return x, target


def _image_table(images: pd.DataFrame, source: str = "images table") -> pd.DataFrame:
    missing = [c for c in IMAGE_COLUMNS if c not in images.columns]
    if missing:
        raise ValueError(f"{source}: missing columns {missing} (need {list(IMAGE_COLUMNS)})")
    t = images.drop_duplicates("image_id").copy()
    t["image_id"] = t["image_id"].astype(str)
    return t.set_index("image_id")


def subsample_per_class(labels: Sequence, max_per_class: int | None = None, fraction: float | None = None,
                        seed: int = 0) -> np.ndarray:
    """Sorted row indices keeping, per label, a seeded random ``fraction`` of its rows (at least one) and at most
    ``max_per_class``; all rows when both are None/0."""
    labels = np.asarray(labels)
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if max_per_class is not None and max_per_class < 0:
        raise ValueError(f"max_per_class must be >= 0 (0 = all), got {max_per_class}")
    rng = np.random.default_rng([int(seed), 7])
    keep = []
    for lab in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == lab)
        n = len(rows)
        if fraction:
            n = max(1, int(round(fraction * n)))
        if max_per_class:
            n = min(n, max_per_class)
        keep.append(rows if n == len(rows) else rng.choice(rows, size=n, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def selection_crops(selected: pd.DataFrame, classes: Sequence[str], *, max_crops_per_class: int | None = None,
                    fraction: float | None = None, seed: int = 0, source: str = "selection table") -> pd.DataFrame:
    """The training crops: rows of the selection table with a ``target`` class index column, optionally
    subsampled per class (seeded; see :func:`subsample_per_class`). Raises naming ``source`` on missing columns,
    unknown classes or degenerate boxes."""
    missing = [c for c in SELECTION_COLUMNS if c not in selected.columns]
    if missing:
        raise ValueError(f"{source}: missing columns {missing} (need {list(SELECTION_COLUMNS)})")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(selected["class"]) - set(index))
    if unknown:
        raise ValueError(f"{source}: classes {unknown} are not among the dataset's classes {tuple(classes)}")
    boxes = selected[["x1", "y1", "x2", "y2"]].to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(boxes).all(1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    if bad.any():
        r = selected.iloc[int(np.flatnonzero(bad)[0])]
        raise ValueError(f"{source}: {int(bad.sum())} rows with a degenerate or non-finite box, e.g. click "
                         f"{r.click_id} of image {r.image_id}: {boxes[np.flatnonzero(bad)[0]].tolist()}")
    out = selected.reset_index(drop=True).copy()
    out["image_id"] = out["image_id"].astype(str)
    out["target"] = out["class"].map(index).astype(np.int64)
    if max_crops_per_class or fraction:
        out = out.iloc[subsample_per_class(out["target"].to_numpy(), max_crops_per_class, fraction, seed)]
        out = out.reset_index(drop=True)
    return out


def selection_dataset(selected: pd.DataFrame, images: pd.DataFrame, classes: Sequence[str], *, input_size: int,
                      mean: Sequence[float], std: Sequence[float], augment: Augment | None = Augment(),
                      seed: int = 0, max_crops_per_class: int | None = None, fraction: float | None = None,
                      cache_mb: float = 256.0, source: str = "selection table") -> CropDataset:
    """:class:`CropDataset` of the selected proposals, each labelled with its click's class."""
    crops = selection_crops(selected, classes, max_crops_per_class=max_crops_per_class, fraction=fraction,
                            seed=seed, source=source)
    table = _image_table(images)
    unknown = sorted(set(crops.image_id) - set(table.index))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} images are not in the manifest's images table, "
                         f"e.g. {unknown[:5]}")
    return CropDataset(crops.image_id.tolist(), crops[["x1", "y1", "x2", "y2"]].to_numpy(),
                       crops["target"].to_numpy(), table["path"].to_dict(), input_size=input_size, mean=mean,
                       std=std, augment=augment, seed=seed, classes=classes, cache_mb=cache_mb)


def image_label_targets(image_ids: Sequence[str], labels: pd.DataFrame, classes: Sequence[str],
                        source: str = "labels table") -> np.ndarray:
    """``(N, C)`` float32 multi-hot image-level targets: ``[i, c] = 1`` when ``labels`` (columns ``image_id``,
    ``class``; e.g. the clicks table) has a row for image ``image_ids[i]`` and class ``classes[c]``."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels["class"]) - set(index))
    if unknown:
        raise ValueError(f"{source}: classes {unknown} are not among the dataset's classes {tuple(classes)}")
    row = {str(i): k for k, i in enumerate(image_ids)}
    y = np.zeros((len(image_ids), len(classes)), dtype=np.float32)
    for image_id, cls in labels[["image_id", "class"]].itertuples(index=False):
        k = row.get(str(image_id))
        if k is not None:
            y[k, index[cls]] = 1.0
    return y


def image_label_dataset(images: pd.DataFrame, labels: pd.DataFrame, classes: Sequence[str], *, input_size: int,
                        mean: Sequence[float], std: Sequence[float], augment: Augment | None = Augment(),
                        seed: int = 0, fraction: float | None = None, cache_mb: float = 256.0) -> CropDataset:
    """Whole images (squashed to ``input_size``) with multi-hot targets of their labelled classes, for the
    image-label-only baseline. Images without any label are left out. ``fraction`` subsamples images (seeded)."""
    table = _image_table(images)
    ids = [i for i in table.index if i in set(labels["image_id"].astype(str))]
    if not ids:
        raise ValueError("image_label_dataset: no image has a label")
    if fraction:
        ids = [ids[k] for k in subsample_per_class(np.zeros(len(ids)), None, fraction, seed)]
    t = table.loc[ids]
    boxes = np.stack([np.zeros(len(t)), np.zeros(len(t)), t["width"].to_numpy(float), t["height"].to_numpy(float)], 1)
    return CropDataset(ids, boxes, image_label_targets(ids, labels, classes), t["path"].to_dict(),
                       input_size=input_size, mean=mean, std=std, augment=augment, seed=seed, classes=classes,
                       cache_mb=cache_mb)


class EpochSampler(Sampler):
    """Seeded per-epoch shuffle yielding ``(index, epoch)`` keys for :class:`CropDataset`.

    ``window`` > 0: images are shuffled, cut into windows of ``window`` images, and the rows of each window are
    shuffled together, so the several crops of an image are cut close in time (decoded image stays in the
    worker's cache); 0: a plain permutation of all rows. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, groups: Sequence[str], seed: int = 0, window: int = 0, shuffle: bool = True):
        self.groups = list(groups)
        self.seed = int(seed)
        self.window = int(window)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.groups)

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.groups)
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, int(epoch), 1])
        if self.window <= 0:
            return rng.permutation(n)
        codes, uniques = pd.factorize(pd.Series(self.groups))
        rows_of = [[] for _ in range(len(uniques))]
        for i, c in enumerate(codes):
            rows_of[c].append(i)
        perm = rng.permutation(len(uniques))
        out = []
        for start in range(0, len(perm), self.window):
            rows = np.concatenate([rows_of[g] for g in perm[start:start + self.window]])
            out.append(rows[rng.permutation(len(rows))])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(int(i), epoch) for i in self.order(epoch)])


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_classifier` (stored as ``args`` in checkpoints).

    Defaults (SGD, lr 0.003, head x10, frozen BatchNorm statistics) were picked on voc07-sample with
    efficientnet_lite0 by the top-1 accuracy of a classifier trained on GT-box crops of some images and tested on
    those of the others (the sweep: docs/experiments.md). The new head's learning rate is the sensitive one: pooled
    efficientnet features have a large squared norm, so a head step of lr * ||f||^2 moves the logits by several
    units at a large lr.
    """

    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.003                # backbone learning rate; the new head gets lr * head_lr_mult
    head_lr_mult: float = 10.0
    optimizer: str = "sgd"           # "sgd" (momentum, nesterov) | "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05    # linear warmup over this fraction of all iterations, then cosine to 0
    label_smoothing: float = 0.0     # single-label mode only
    freeze_bn_stats: bool = True     # BatchNorm layers use (and keep) their pretrained running statistics
    clip_grad_norm: float | None = None  # clip the gradient's total L2 norm to this before each step; None: off
    multilabel: bool = False         # BCEWithLogits on multi-hot targets (image-label-only baseline)
    seed: int = 0
    shuffle_window: int = 64         # images per shuffle window (EpochSampler); 0 = full shuffle
    device: str = "auto"
    amp: bool = True                 # float16 autocast + GradScaler, CUDA only
    workers: int = -1                # DataLoader workers; -1 = auto
    micro_batch: int = -1            # items per forward/backward (a batch's gradients summed over its micro-batches
                                     # before the step); 0 = the whole batch; -1 = auto (micro_batch_size)
    #: fields that do not change the result (micro_batch: up to rounding) and may differ when resuming
    RUNTIME_FIELDS = ("workers", "device", "micro_batch")

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def result_args(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME_FIELDS}


#: training items per forward/backward on a CPU with frozen BatchNorm (``TrainConfig.micro_batch=-1``): the
#: activations of a whole batch held the classifier stage's peak memory, and micro-batches train as fast
#: (docs/results.md, "Memory")
CPU_MICRO_BATCH = 8


def micro_batch_size(cfg: TrainConfig, device: torch.device, model: nn.Module) -> int:
    """Items per forward/backward of a training batch, 0 for the whole batch at once. Auto (``micro_batch=-1``):
    :data:`CPU_MICRO_BATCH` on a CPU when no BatchNorm layer trains its statistics (frozen, or none), the whole
    batch otherwise. Micro-batches give the batch's gradient up to rounding only when every sample's forward is
    independent of the others', so an explicit size with BatchNorm statistics in training is an error."""
    bn_training = not cfg.freeze_bn_stats and any(True for _ in batchnorm_layers(model))
    if cfg.micro_batch < 0:
        return CPU_MICRO_BATCH if device.type == "cpu" and not bn_training else 0
    if cfg.micro_batch and bn_training:
        raise ValueError("micro-batches need frozen BatchNorm statistics (freeze_bn_stats=True): BatchNorm in "
                         "training mode normalises each micro-batch by its own statistics")
    return int(cfg.micro_batch)


def auto_workers(device: torch.device) -> int:
    n = os.cpu_count() or 1
    return min(8, n) if device.type == "cuda" else min(2, n // 4)


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    if hasattr(model, "head_parameters") and hasattr(model, "backbone_parameters"):
        head = [p for p in model.head_parameters() if p.requires_grad]
        body = [p for p in model.backbone_parameters() if p.requires_grad]
    else:
        head, body = [], [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": body, "lr": cfg.lr, "name": "backbone"},
              {"params": head, "lr": cfg.lr * cfg.head_lr_mult, "name": "head"}]
    return [g for g in groups if g["params"]]


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(iteration: int, total: int, warmup_fraction: float) -> float:
    """Linear warmup from ~0 over ``warmup_fraction * total`` iterations, then cosine decay to 0 at ``total``."""
    warmup = int(round(warmup_fraction * total))
    if iteration < warmup:
        return (iteration + 1) / warmup
    t = (iteration - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _loss_fn(cfg: TrainConfig) -> nn.Module:
    if cfg.multilabel:
        return nn.BCEWithLogitsLoss()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def _hits(logits: torch.Tensor, target: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Correct predictions in a batch: top-1 class equals the label, or (multi-label) is one of the labels."""
    top = logits.argmax(1)
    if multilabel:
        return target.gather(1, top[:, None]).squeeze(1).gt(0.5).sum()
    return top.eq(target).sum()


# No cv2.setNumThreads() in DataLoader workers: in a forked child of a process that already used OpenCV's thread
# pool it deadlocks (seen here with opencv 5.0). torch sets its own threads to 1 in workers.
def _loader(dataset: Dataset, sampler: Sampler, cfg: TrainConfig, device: torch.device, drop_last: bool,
            workers: int, rank: int = 0, world: int = 1) -> DataLoader:
    """Batches of ``cfg.batch_size`` from ``sampler``'s order; with several processes, this rank's piece of each
    (:class:`pipeline.distributed.RankBatchSampler`; with one process the same batches as ``batch_size=``)."""
    batches = D.RankBatchSampler(sampler, cfg.batch_size, drop_last, rank, world)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


class _CropTask:
    """:func:`train_classifier`'s part of the engine's loop (:class:`pipeline.engine.TrainTask`): batches of crops
    from a DataLoader (built once, kept across epochs), logits, the loss, top-1 hits."""

    def __init__(self, model: nn.Module, dataset: CropDataset, cfg: TrainConfig, device: torch.device,
                 sampler: EpochSampler, drop_last: bool, workers: int, rank: int, world: int,
                 aux_loss: Callable | None = None):
        self.model, self.dataset, self.cfg, self.device, self.sampler = model, dataset, cfg, device, sampler
        self.aux_loss = aux_loss
        self.loader_args = (drop_last, workers, rank, world)
        self.loader: DataLoader | None = None
        self.criterion = _loss_fn(cfg).to(device)
        self.world = world
        self.hits = torch.zeros((), dtype=torch.int64, device=device)
        self.micro = micro_batch_size(cfg, device, model)

    def start_epoch(self, epoch: int) -> None:
        self.model.train()
        if self.cfg.freeze_bn_stats:
            freeze_batchnorm(self.model)
        self.sampler.set_epoch(epoch)
        self.hits = torch.zeros((), dtype=torch.int64, device=self.device)

    def batches(self, epoch: int) -> DataLoader:
        if self.loader is None:  # (workers persist across epochs; the sampler yields (index, epoch) keys)
            self.loader = _loader(self.dataset, self.sampler, self.cfg, self.device, *self.loader_args)
        return self.loader

    def micro_batches(self, batch) -> list[tuple[tuple[torch.Tensor, torch.Tensor], int]]:
        """The batch in pieces of :func:`micro_batch_size` items (the engine sums their gradients)."""
        x, y = batch
        m = self.micro or len(x)
        return [((x[i:i + m], y[i:i + m]), len(x[i:i + m])) for i in range(0, len(x), m)]

    def step(self, net: nn.Module, batch) -> Step:
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(self.device, non_blocking=True)
        logits = net(x)
        with torch.autocast(self.device.type, enabled=False):  # the loss in float32, outside autocast
            loss = self.criterion(logits.float(), y)
            if self.aux_loss is not None:
                loss = loss + self.aux_loss(net, x, logits)
        return Step(loss, x.shape[0], {"hits": _hits(logits.detach(), y, self.cfg.multilabel)})

    def record(self, step: Step, share: float) -> None:
        self.hits += step.logs["hits"]

    def describe(self, batch, step: Step) -> str:
        return ""

    def end_epoch(self, stats: EpochStats) -> dict:
        if self.world > 1:
            D.all_reduce_sum(self.hits)
        seen, seconds = stats.items, stats.seconds
        return {"epoch": stats.epoch + 1, "loss": stats.loss_sum / max(seen, 1),
                "accuracy": int(self.hits) / max(seen, 1), "lr": stats.lr_start.get("backbone", float("nan")),
                "head_lr": stats.lr_start.get("head", float("nan")), "crops": seen, "seconds": round(seconds, 3),
                "crops_per_s": round(seen / max(seconds, 1e-9), 2)}


def _check_training_set(dataset: CropDataset, cfg: TrainConfig, world: int) -> None:
    if cfg.multilabel != dataset.multilabel:
        raise ValueError(f"config.multilabel={cfg.multilabel} but the dataset's targets are "
                         f"{'multi-hot' if dataset.multilabel else 'class indices'}")
    if len(dataset) == 0:
        raise ValueError("train_classifier: the training set is empty")
    if world > 1 and cfg.batch_size < world:
        raise ValueError(f"batch size {cfg.batch_size} is smaller than the {world} training processes")
    if world > 1 and len(dataset) < world:
        raise ValueError(f"the training set ({len(dataset)} items) is smaller than the {world} training processes")


def train_classifier(model: nn.Module, dataset: CropDataset, out_dir: str | os.PathLike,
                     config: TrainConfig | None = None, *, resume: bool = True, progress: bool = True,
                     on_epoch_end: Callable[[int, dict], None] | None = None,
                     aux_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     ) -> pd.DataFrame:
    """Fine-tune ``model`` on ``dataset`` in place; returns the training log (one row per epoch).

    Writes ``out_dir/checkpoint.pt`` (``{model, optimizer, lr_scheduler, scaler, epoch, args, log}``, epoch
    0-based as in torchvision's references) and ``out_dir/train_log.csv`` (``epoch, loss, accuracy, lr, head_lr,
    crops, seconds, crops_per_s``; loss and accuracy are means over the epoch's training batches, accuracy is
    top-1, or for multi-label "top-1 class is one of the labels"; lr and head_lr at the epoch's start)
    atomically after every epoch. With ``resume``
    an existing checkpoint (same training arguments, else an error) is continued; the final weights equal an
    uninterrupted run's (exactly on CPU). Randomness comes only from ``config.seed``: the sampler and the
    augmentation draw from ``(seed, epoch, index)``, dropout from a generator re-seeded at every epoch.
    ``on_epoch_end(epoch, row)`` is called after each epoch's checkpoint is written. ``aux_loss(net, crops,
    logits)``, when given, is added to each step's loss (seed 002's CT mask loss, :class:`pipeline.bcct.CTLoss`;
    one process only). A NaN/inf loss raises
    :class:`NonFiniteLossError`; the checkpoint on disk is then the last good epoch's. The model is left in eval
    mode. The loop is :func:`pipeline.engine.fit`.

    Under torchrun (process group initialised, :func:`pipeline.distributed.init`) with several processes: each
    rank trains on ``cuda:LOCAL_RANK`` (or the CPU), the model wrapped in ``DistributedDataParallel``; each global
    batch of ``batch_size`` is split over the ranks, the loss of each rank weighted by its share so that the
    averaged gradient is the whole batch's; the logged loss/accuracy are the whole batches'; only rank 0 writes
    ``checkpoint.pt`` and ``train_log.csv``. Same optimizer steps as one process; the weights match one process's
    up to floating-point summation order (and, for networks with dropout, other dropout masks per rank).
    """
    cfg = config or TrainConfig()
    world, rank = D.world_size(), D.rank()
    _check_training_set(dataset, cfg, world)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = D.local_device(cfg.device)
    use_amp = bool(cfg.amp and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    drop_last = len(dataset) > cfg.batch_size
    iters_per_epoch = len(dataset) // cfg.batch_size if drop_last else 1
    optimizer = _make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch * cfg.epochs, cfg.warmup_fraction))
    workers = cfg.workers if cfg.workers >= 0 else auto_workers(device) // max(1, D.env_info().local_world_size)
    sampler = EpochSampler(dataset.image_ids, seed=cfg.seed, window=cfg.shuffle_window)
    if aux_loss is not None and world > 1:
        raise ValueError("train_classifier: an auxiliary loss trains in one process only")
    task = _CropTask(model, dataset, cfg, device, sampler, drop_last, workers, rank, world, aux_loss)
    log.info("training %s on %d %s for %d epochs (%d iterations/epoch, batch %d%s, %s, %d workers, amp=%s%s)",
             getattr(model, "name", type(model).__name__), len(dataset),
             "images" if dataset.multilabel else "crops", cfg.epochs, iters_per_epoch, cfg.batch_size,
             f" in micro-batches of {task.micro}" if task.micro and world == 1 else "", device,
             workers, use_amp, f", rank {rank} of {world}" if world > 1 else "")
    spec = FitSpec(model, optimizer, task, out_dir / CHECKPOINT_NAME, asdict(cfg), cfg.epochs, device,
                   scheduler=scheduler, scheduler_interval="iteration", amp=use_amp,
                   seed=lambda epoch, r: epoch_seed(cfg.seed, epoch) + r,  # dropout: each rank its own stream
                   runtime_args=TrainConfig.RUNTIME_FIELDS, log_csv=out_dir / LOG_NAME, name="classifier",
                   # frozen BatchNorm statistics never change: no need to send rank 0's buffers before each forward
                   broadcast_buffers=not cfg.freeze_bn_stats, clip_grad_norm=cfg.clip_grad_norm)
    return pd.DataFrame(fit(spec, resume=resume, progress=progress, on_epoch_end=on_epoch_end))


def _train_classifier_rank(model: nn.Module, dataset: CropDataset, out_dir: str, config: dict,
                           progress: bool = True) -> None:
    """What each torchrun process runs (:func:`train_classifier_distributed`)."""
    train_classifier(model, dataset, out_dir, TrainConfig(**config), resume=True, progress=progress)


def train_classifier_distributed(model: nn.Module, dataset: CropDataset, out_dir: str | os.PathLike,
                                 config: TrainConfig | None = None, *, nproc: int = 2, progress: bool = True,
                                 env: Mapping[str, str] | None = None) -> pd.DataFrame:
    """:func:`train_classifier` in ``nproc`` processes (torch DDP, one GPU each on CUDA, gloo on the CPU) started
    with ``torchrun --standalone`` (:func:`pipeline.distributed.launch`); resumable like it (the processes resume
    from ``out_dir/checkpoint.pt``). ``model`` and ``dataset`` are handed to the processes pickled in
    ``out_dir/ddp_job.pt`` (removed afterwards). Afterwards ``model`` holds the trained weights (read from the
    final checkpoint) and is in eval mode; returns the training log. ``nproc=1`` trains in this process."""
    cfg = config or TrainConfig()
    if nproc <= 1:
        return train_classifier(model, dataset, out_dir, cfg, resume=True, progress=progress)
    D.check_processes(nproc, resolve_device(cfg.device), cfg.batch_size)
    out_dir = Path(out_dir)
    model = model.cpu()
    D.launch("pipeline.classifier:_train_classifier_rank",
             {"model": model, "dataset": dataset, "out_dir": str(out_dir), "config": asdict(cfg),
              "progress": progress}, nproc, out_dir, device=cfg.device, env=env)
    # the processes finished every epoch: "resuming" from the last checkpoint loads the result without training
    return train_classifier(model, dataset, out_dir, cfg, resume=True, progress=False)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: CropDataset, *, batch_size: int = 64, device: str = "auto",
                        workers: int = 0) -> dict:
    """Mean loss and top-1 accuracy (multi-label: top-1 class among the labels) of ``model`` in eval mode on
    ``dataset`` (use a dataset without augmentation)."""
    dev = resolve_device(device)
    model.to(dev).eval()
    criterion = nn.BCEWithLogitsLoss(reduction="sum") if dataset.multilabel else nn.CrossEntropyLoss(reduction="sum")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    loss, hits, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        logits = model(x).float()
        per = criterion(logits, y).item()
        loss += per / (y.shape[1] if dataset.multilabel else 1)
        hits += int(_hits(logits, y, dataset.multilabel))
        n += x.shape[0]
    return {"loss": loss / max(n, 1), "accuracy": hits / max(n, 1), "n": n}


# ---------------------------------------------------------------------------------------------------------------
# the trained model file
# ---------------------------------------------------------------------------------------------------------------
def _jsonable(obj) -> object:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def save_classifier(path: str | os.PathLike, model: nn.Module, classes: Sequence[str],
                    meta: dict | None = None) -> Path:
    """Write ``model.pt``: ``{format, version, backbone, classes, input_size, mean, std, state_dict, meta}``
    (tensors on the CPU, ``meta`` made JSON-like), atomically; a network with a CAM-layer head
    (:func:`pipeline.pooling.with_cam_head`) adds ``cam_head: {pooling, layer}``."""
    classes = [str(c) for c in classes]
    n_out = getattr(model, "num_classes", None)
    if n_out is not None and n_out != len(classes):
        raise ValueError(f"save_classifier: the model has {n_out} outputs but {len(classes)} classes were given")
    payload = {
        "format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "backbone": model.name, "classes": classes,
        "input_size": int(model.input_size), "mean": list(model.mean), "std": list(model.std),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": _jsonable(meta or {}),
    }
    if hasattr(model, "pooling"):  # a CAM-layer head (pipeline.pooling.with_cam_head): rebuilt by load_classifier
        payload["cam_head"] = {"pooling": model.pooling, "layer": model.feature_layer}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "auto"):
    """The classifier saved by :func:`save_classifier`, in eval mode on ``device``, with ``.classes`` (tuple)
    and ``.meta`` (dict) attributes and ``input_size`` as trained."""
    from .backbones import build_backbone

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classifier file not found (written by the TrainClassifier stage)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable classifier file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a clickscale classifier file (no format={MODEL_FORMAT!r})")
    if payload.get("version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{path}: classifier file version {payload.get('version')} is not supported "
                         f"(this code reads version {MODEL_FORMAT_VERSION})")
    classes = tuple(payload["classes"])
    model = build_backbone(payload["backbone"], len(classes), weights="random")
    if "cam_head" in payload:  # seed 003's CAM layer + global pooling (pipeline.pooling)
        from .pooling import with_cam_head

        model = with_cam_head(model, payload["cam_head"]["pooling"], payload["cam_head"]["layer"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit backbone {payload['backbone']} "
                         f"with {len(classes)} classes: {e}") from None
    model.input_size = int(payload["input_size"])
    model.classes = classes
    model.meta = dict(payload.get("meta", {}))
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(dev).eval()


def stage_training_set(manifest, selected_path: str | os.PathLike | None, *, input_size: int,
                       mean: Sequence[float], std: Sequence[float], seed: int = 0,
                       max_crops_per_class: int | None = None) -> tuple[CropDataset, dict]:
    """The training set of a classifier stage and where it came from: the selected crops of every click at
    ``selected_path`` (a ``selected.parquet``; :func:`selection_dataset`), or with ``selected_path=None`` the
    manifest's trainval images with their image-level labels (:func:`image_label_dataset`). ``manifest`` is a
    :class:`pipeline.dataset.Manifest`."""
    trainval = manifest.split("trainval")
    common = dict(input_size=input_size, mean=mean, std=std, seed=seed)
    if selected_path is None:
        dataset = image_label_dataset(trainval, manifest.image_labels(), manifest.classes, **common)
        return dataset, {"labels": "objects of the trainval images (all, difficult included)"
                         if len(manifest.objects) else "classes clicked in each trainval image (no ground truth)"}
    selected = pd.read_parquet(selected_path)
    dataset = selection_dataset(selected, trainval, manifest.classes, source=str(selected_path),
                                max_crops_per_class=max_crops_per_class, **common)
    return dataset, {"selected": str(selected_path), "selected_crops": len(selected),
                     "fallback_crops": int(selected["fallback"].sum()) if "fallback" in selected else None}


def items_per_class(dataset: CropDataset, classes: Sequence[str]) -> dict[str, int]:
    """Training items per class: positives of each class (multi-label), or crops labelled with it."""
    if dataset.multilabel:
        return dict(zip(classes, dataset.targets.sum(0).astype(int).tolist()))
    return dict(zip(classes, pd.Series(dataset.targets).value_counts().reindex(
        range(len(classes)), fill_value=0).astype(int).tolist()))
