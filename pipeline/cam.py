"""Class activation maps: Grad-CAM (paper Eq. 1-2) and SA-CAM (Eq. 3, = LayerCAM), click fusion (Eq. 4), and
the HDF5 CAM store.

CAM methods (pytorch-grad-cam style): one base class owns the hook machinery; each method is a tiny subclass
overriding one method. A CAM object is a context manager that removes its hook on exit::

    with SACAM(net, "conv5_2") as cam:
        maps = cam(crops, classes)       # (B, h, w) float32 raw maps, on the crops' device

All crops in ``crops`` go through ONE forward and ONE backward of the summed per-sample class scores (the model
must be in eval mode, so sample b's score depends only on sample b and the summed gradient is per-sample).
Efficient path (default): the layers below the CAM layer run without autograd (the hook cuts the graph there and
switches autograd on for the rest), and the backward runs only from the class scores down to the CAM layer,
computing no weight gradients. Common CAM libraries instead backpropagate one crop at a time through the whole
network to the input (``efficient=False`` keeps the graph below, for comparison).

Click fusion: :func:`paste_and_fuse` resizes each crop's map to the crop's box in the image (bilinear) and sums
the pasted maps into an image-sized map: the plain sum of Eq. 4 (``fusion="sum"``), or (``fusion="prob"``) each
crop's map weighted by the classifier's softmax probability of the click's class on that crop, so a crop the
classifier does not recognise as the class (background, a part, a neighbour) contributes less. What ``prob`` adds
over ``sum`` on voc07-sample: docs/experiments.md.

Storage: :func:`write_cam_store` computes the fused map of every entry (a click, or an image/class pair in the
image-label-only mode) and writes HDF5 part files of ``images_per_part`` images each, each part atomically, so a
killed run resumes by skipping finished parts. :class:`CamStore` reads them back.

Sharding: the parts of one global plan (all entries, sorted image ids, ``images_per_part``) are split into
contiguous ranges; ``write_cam_store(..., shard=(i, n))`` computes range ``i`` of ``n`` into a directory of its own
(a store of its entries), and :func:`merge_cam_stores` publishes the shards' parts as one store (hard links, an
index over all parts). A part holds the same maps whatever the number of shards (passes never span parts).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from tqdm import tqdm

from .classifier import crop_bounds
from .imageio import ImageReadError, read_image
from .io import atomic_path, read_json, write_csv, write_json
from .proposals import shard_bounds

log = logging.getLogger(__name__)

STORE_FORMAT = 1
#: how a click's crop maps are fused (:func:`fusion_weights`): Eq. 4's plain sum, or weighted by class probability
FUSIONS = ("sum", "prob")


# -- targets ------------------------------------------------------------------------------------------------
class ClassifierOutputTarget:
    """The score of one class: ``target(logits_row) -> scalar`` (as pytorch-grad-cam's target of that name)."""

    def __init__(self, category: int):
        self.category = int(category)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output[..., self.category]


def _target_scores(logits: torch.Tensor, targets) -> torch.Tensor:
    """Per-sample target scores ``(B,)``; ``targets`` are class indices (one per sample) or callables."""
    if isinstance(targets, torch.Tensor) or (len(targets) and not callable(targets[0])):
        idx = torch.as_tensor(targets, dtype=torch.long, device=logits.device).reshape(-1)
        if idx.numel() != logits.shape[0]:
            raise ValueError(f"{idx.numel()} targets for a batch of {logits.shape[0]}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= logits.shape[1]):
            raise ValueError(f"target class out of range 0..{logits.shape[1] - 1}: {idx.tolist()}")
        return logits.gather(1, idx[:, None])[:, 0]
    if len(targets) != logits.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]}")
    return torch.stack([t(row) for t, row in zip(targets, logits)])


def _n_targets(targets) -> int:
    return targets.numel() if isinstance(targets, torch.Tensor) else len(targets)


def _repeat_targets(targets):
    """``targets`` of a one-sample batch for the same sample twice."""
    if isinstance(targets, torch.Tensor):
        return targets.reshape(-1).repeat(2)
    return list(targets) * 2


# -- hooks --------------------------------------------------------------------------------------------------
class ActivationsAndGradients:
    """A forward hook on one module that keeps its output ``activations`` for a later ``autograd.grad``.

    With ``cut_below`` the output is replaced by a detached leaf that requires grad, and autograd is switched on
    from there: run the model under ``torch.no_grad()`` and only the layers above the hooked module build a graph.
    The hook acts only while ``active`` (set by the CAM for its own forward pass), so other uses of the model
    while a CAM object exists are untouched.
    """

    def __init__(self, module: nn.Module, cut_below: bool = True):
        self.cut_below = cut_below
        self.active = False
        self.activations: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor):
        if not self.active:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"CAM layer {type(module).__name__} returns {type(output).__name__}, not a tensor")
        if self.cut_below:
            if not (output.is_leaf and output.requires_grad):  # (else another CAM's hook on this layer cut it)
                output = output.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # restored by the caller's no_grad() on exit
        self.activations = output
        return output

    def release(self) -> None:
        self.handle.remove()
        self.activations = None


class BaseCAM:
    """Shared machinery: hook, one batched forward/backward, per-method map from (activations, gradients).

    ``model``: a :class:`pipeline.backbones.ClassifierNet` (``layer`` by name, default its default CAM layer)
    or any ``nn.Module`` with ``target_layer`` given as a module. Maps are raw (unnormalised) and float32.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, *, target_layer: nn.Module | None = None,
                 efficient: bool = True):
        self.model = model
        if target_layer is None:
            if not hasattr(model, "layer_module"):
                raise TypeError("pass target_layer= for a model that is not a ClassifierNet")
            self.layer = layer or model.default_cam_layer
            target_layer = model.layer_module(self.layer)
        else:
            self.layer = layer or type(target_layer).__name__
        self.efficient = efficient
        self._hook = ActivationsAndGradients(target_layer, cut_below=efficient)
        self.outputs: torch.Tensor | None = None  # the model's logits of the last call (pytorch-grad-cam's name)

    # the one method a CAM variant overrides (either of them) ----------------------------------------------
    def get_cam_weights(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cam_image(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """``(B, K, h, w)`` activations and gradients -> ``(B, h, w)`` map: ReLU(sum_k w_k A_k)."""
        weights = self.get_cam_weights(activations, grads)
        return F.relu((weights * activations).sum(1))

    # ---------------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, targets) -> torch.Tensor:
        return self.forward(x, targets)

    def forward(self, x: torch.Tensor, targets) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] == 1 and _n_targets(targets) == 1:
            # a pass of ONE crop runs as two copies of it: on a CPU, oneDNN's batch-1 kernels (with several
            # threads) round differently from the batched ones, and where that flips a ReLU6 gate the map moves by
            # up to ~1% of its maximum, so a crop's map would depend on the size of the pass it lands in (the
            # last pass of a part, --cam-batch-size 1). Batches of 2 and more take the batched kernels.
            maps = self.forward(torch.cat([x, x]), _repeat_targets(targets))
            self.outputs = self.outputs[:1]
            return maps[:1]
        if self.model.training:
            raise RuntimeError("CAMs need the model in eval mode (batch norm in train mode mixes the samples of a "
                               "batch); call model.eval() first")
        self._hook.activations = None
        grad_ctx = torch.no_grad() if self.efficient else torch.enable_grad()
        try:
            with grad_ctx:
                self._hook.active = True
                logits = self.model(x)
                self.outputs = logits.detach()
                self._hook.active = False
                acts = self._hook.activations
                if acts is None:
                    raise RuntimeError(f"the CAM layer {self.layer} was not reached in the forward pass")
                scores = _target_scores(logits, targets)
                (grads,) = torch.autograd.grad(scores.sum(), acts)
        finally:
            self._hook.active = False
            self._hook.activations = None
        with torch.no_grad():
            return self.cam_image(acts.detach().float(), grads.float()).float()

    def release(self) -> None:
        self._hook.release()

    def __enter__(self) -> "BaseCAM":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class GradCAM(BaseCAM):
    """Eq. 1-2: ``w_k = mean_ij dy_c/dA_k[i,j]``; ``M = ReLU(sum_k w_k A_k)``."""

    def get_cam_weights(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads.mean(dim=(2, 3), keepdim=True)


class SACAM(BaseCAM):
    """Eq. 3 (spatial-aware CAM, = LayerCAM): ``M[i,j] = ReLU(sum_k ReLU(dy_c/dA_k[i,j]) * A_k[i,j])``.

    The outer ReLU is LayerCAM's (pytorch-grad-cam applies it to every method); it changes nothing where the
    activations are non-negative (VGG16's post-ReLU layers, where this is exactly Eq. 3) and keeps the map
    non-negative at layers with signed activations (efficientnet_lite0's stage outputs)."""

    def cam_image(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return F.relu((F.relu(grads) * activations).sum(1))


LayerCAM = SACAM
CAM_METHODS: dict[str, type[BaseCAM]] = {"sacam": SACAM, "gradcam": GradCAM}


def make_cam(method: str, model: nn.Module, layer: str | None = None, **kwargs) -> BaseCAM:
    try:
        cls = CAM_METHODS[method.lower()]
    except KeyError:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {tuple(CAM_METHODS)}") from None
    return cls(model, layer, **kwargs)


# -- crops and fusion ---------------------------------------------------------------------------------------
def image_tensor(image: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """``HxWx3`` uint8 RGB array -> ``(1, 3, H, W)`` float32 tensor (0..255) on ``device``."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.ndim == 3:
        image = image[None]
    return image.to(device, non_blocking=True).float()


def pixel_boxes(boxes, image_hw: tuple[int, int]) -> np.ndarray:
    """Integer pixel bounds ``(ix1, iy1, ix2, iy2)`` (exclusive end) of continuous boxes, ``(K, 4)`` int64: the
    crop geometry of :func:`pipeline.classifier.crop_bounds` (every pixel the box overlaps, clipped, >= 1 px), so
    CAM crops are cut, and maps pasted back, on exactly the pixels the classifier was trained on."""
    h, w = image_hw
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.array([crop_bounds(box, w, h) for box in b], dtype=np.int64).reshape(-1, 4)


def extract_crops(image: np.ndarray | torch.Tensor, boxes, size: int, mean: Sequence[float],
                  std: Sequence[float]) -> torch.Tensor:
    """Cut ``boxes`` (K, 4) ``(x1, y1, x2, y2)`` (0-based continuous pixel coordinates) out of ``image`` and resize
    each to ``size x size``, all in one ``roi_align`` call on the image's device. Each crop covers the pixels of
    :func:`pixel_boxes`; sampling matches ``cv2.resize`` (pixel centres aligned; bilinear when enlarging, the
    mean of ``ceil(scale)^2`` bilinear samples per output pixel when shrinking, close to ``INTER_AREA``).
    Returns the normalised network input ``(K, 3, size, size)`` float32.

    ``image``: ``HxWx3`` uint8 array or a ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in 0..255.
    ``mean``/``std``: per-channel, for RGB in 0..1 (``ClassifierNet.mean``/``.std``).
    """
    img = image_tensor(image) if isinstance(image, np.ndarray) else (image[None] if image.ndim == 3 else image)
    img = img.float()
    m = torch.tensor(mean, device=img.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=img.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    img = (img - m) / s
    pb = pixel_boxes(boxes, tuple(img.shape[-2:]))
    if len(pb) == 0:
        return img.new_zeros((0, 3, size, size))
    b = torch.as_tensor(pb, dtype=torch.float32, device=img.device)
    return roi_align(img, [b], output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _paste(maps: torch.Tensor, boxes, image_hw: tuple[int, int], weights: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.zeros(image_hw, dtype=torch.float32, device=maps.device)
    if weights is not None:
        maps = maps * weights.to(maps.device, torch.float32)[:, None, None]
    for m, (x1, y1, x2, y2) in zip(maps, pixel_boxes(boxes, image_hw).tolist()):
        up = F.interpolate(m[None, None].float(), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
        out[y1:y2, x1:x2] += up[0, 0]
    return out


def fusion_weights(fusion: str, probs: torch.Tensor) -> torch.Tensor | None:
    """Per-crop weights of a fusion rule (:data:`FUSIONS`) from the crops' class probabilities ``(N,)``; None for
    the plain sum."""
    if fusion == "sum":
        return None
    if fusion == "prob":
        return probs
    raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")


def paste_and_fuse(maps: torch.Tensor | np.ndarray, boxes, image_hw: tuple[int, int],
                   weights: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Eq. 4: upsample each crop's map ``(N, h, w)`` to its box's pixels (:func:`pixel_boxes`; bilinear), add it
    there into an ``image_hw`` map, sum over crops; ``weights`` ``(N,)``: a weighted sum instead (the ``"prob"``
    fusion). Returns ``(H, W)`` float32 numpy (one device-to-host copy)."""
    maps = torch.as_tensor(maps)
    n = np.asarray(boxes).reshape(-1, 4).shape[0]
    if maps.ndim != 3 or maps.shape[0] != n:
        raise ValueError(f"{tuple(maps.shape)} maps do not match {n} boxes")
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (n,):
            raise ValueError(f"{tuple(weights.shape)} weights do not match {n} boxes")
    return _paste(maps, boxes, image_hw, weights).cpu().numpy()


# -- entries: what to compute ---------------------------------------------------------------------------------
@dataclass
class CamEntry:
    """One fused map to compute: a click (``kind="click"``, ``entry_id`` = click_id) or, in the image-label-only
    mode, one class present in an image (``kind="image"``, x = y = NaN, one crop = the whole image)."""

    entry_id: int
    image_id: str
    cls: str
    class_index: int
    x: float
    y: float
    crops: np.ndarray  # (N, 4) float32
    kind: str = "click"


def click_entries(selected: pd.DataFrame, classes: Sequence[str], max_crops: int | None = None) -> list[CamEntry]:
    """Entries from SelectProposals' table (``click_id, image_id, class, x, y, rank, x1, y1, x2, y2``): the
    click's crops in rank order (the first ``max_crops`` when given)."""
    need = {"click_id", "image_id", "class", "x", "y", "rank", "x1", "y1", "x2", "y2"}
    missing = need - set(selected.columns)
    if missing:
        raise ValueError(f"selected-proposals table lacks columns {sorted(missing)}")
    cindex = {c: i for i, c in enumerate(classes)}
    unknown = set(selected["class"]) - set(cindex)
    if unknown:
        raise ValueError(f"selected proposals have classes {sorted(unknown)} the classifier does not know "
                         f"({list(classes)})")
    out = []
    df = selected.sort_values(["image_id", "click_id", "rank"], kind="mergesort")
    for cid, g in df.groupby("click_id", sort=False):
        crops = g[["x1", "y1", "x2", "y2"]].to_numpy(np.float32)
        if max_crops:
            crops = crops[:max_crops]
        r = g.iloc[0]
        out.append(CamEntry(int(cid), str(r.image_id), str(r["class"]), cindex[r["class"]], float(r.x), float(r.y),
                            crops, "click"))
    return out


def image_entries(labels: pd.DataFrame, image_sizes: dict[str, tuple[int, int]],
                  classes: Sequence[str]) -> list[CamEntry]:
    """Image-label-only mode: one entry per (image_id, class present); ``labels`` has ``image_id, class`` (e.g.
    the objects table; duplicates are dropped). ``image_sizes``: image_id -> (width, height). Entry ids number
    the (image_id, class index) pairs in sorted order from 0."""
    cindex = {c: i for i, c in enumerate(classes)}
    pairs = sorted({(str(i), cindex[c]) for i, c in zip(labels.image_id, labels["class"]) if c in cindex})
    out = []
    for k, (image_id, ci) in enumerate(pairs):
        if image_id not in image_sizes:
            raise ValueError(f"image {image_id} has labels but no known size")
        w, h = image_sizes[image_id]
        out.append(CamEntry(k, image_id, classes[ci], ci, math.nan, math.nan,
                            np.array([[0, 0, w, h]], np.float32), "image"))
    return out


# -- the store --------------------------------------------------------------------------------------------------
INDEX_COLUMNS = ["entry_id", "kind", "image_id", "class", "class_index", "x", "y", "n_crops", "height", "width",
                 "part"]


def _plan(entries: Sequence[CamEntry], images_per_part: int) -> list[list[str]]:
    images = sorted({e.image_id for e in entries})
    return [images[i:i + images_per_part] for i in range(0, len(images), images_per_part)]


def _partition_digest(entries: Sequence[CamEntry], images_per_part: int) -> str:
    """What the global plan's parts hold: the entries (ids, images, classes, clicks, crops) and the part size."""
    h = hashlib.md5(json.dumps({"ipp": images_per_part}).encode())
    for e in sorted(entries, key=lambda e: (e.image_id, e.entry_id)):
        h.update(f"{e.entry_id}|{e.kind}|{e.image_id}|{e.class_index}|{e.x!r}|{e.y!r}|".encode())
        h.update(np.ascontiguousarray(e.crops, np.float32).tobytes())
    return h.hexdigest()


def _plan_digest(partition: str, settings: dict, shard: tuple[int, int]) -> str:
    blob = json.dumps({"partition": partition, "settings": settings, "shard": list(shard)}, sort_keys=True)
    return hashlib.md5(blob.encode()).hexdigest()


def shard_parts(n_parts: int, shard: int, n_shards: int) -> range:
    """The global part indices of shard ``shard`` of ``n_shards``: contiguous, near-equal ranges (an empty range
    when there are fewer parts than shards)."""
    start, stop = shard_bounds(n_parts, shard, n_shards)
    return range(start, stop)


def _part_name(i: int) -> str:
    return f"cams-{i:05d}.h5"


class _ImageSource(torch.utils.data.Dataset):
    def __init__(self, image_ids: Sequence[str], paths: dict[str, str]):
        self.image_ids = list(image_ids)
        self.paths = paths

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int):
        image_id = self.image_ids[i]
        path = self.paths.get(image_id)
        if path is None:
            raise ImageReadError(f"no image path known for image {image_id}")
        return image_id, str(path), torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous()


def _iter_images(image_ids: Sequence[str], paths: dict[str, str], num_workers: int,
                 pin: bool) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Decoded images in order; with ``num_workers`` DataLoader worker processes started now (forkserver where
    available: a forked worker would inherit the HDF5 files open in this process, and its copies of their locks
    make later opens of those files fail)."""
    ds = _ImageSource(image_ids, paths)
    if num_workers <= 0 or len(ds) == 0:
        return (ds[i] for i in range(len(ds)))
    import multiprocessing

    ctx = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=pin, prefetch_factor=4, multiprocessing_context=ctx)
    return iter(loader)


def _store_map(group: h5py.Group, name: str, arr: np.ndarray, compression: str, level: int | None) -> float:
    """Store a raw float32 map as float16 of ``arr / scale`` (scale = max |arr|, kept as an attribute) so that no
    value overflows or underflows float16; returns scale."""
    arr = np.asarray(arr, dtype=np.float32)
    scale = float(np.abs(arr).max()) if arr.size else 0.0
    data = (arr / scale if scale > 0 else arr).astype(np.float16)
    chunks = data.shape if data.ndim == 2 else (1,) + data.shape[1:]
    opts = {"compression": compression, "compression_opts": level} if compression == "gzip" else (
        {"compression": compression} if compression else {})
    ds = group.create_dataset(name, data=data, chunks=chunks, shuffle=bool(compression), track_times=False, **opts)
    ds.attrs["scale"] = np.float32(scale)
    return scale


def prefer_channels_last(model: nn.Module, device: torch.device | str) -> bool:
    """Whether to run ``model`` in channels-last memory format: on CUDA (cuDNN's NHWC kernels), and on a CPU for
    networks with depthwise/grouped convolutions (efficientnet_lite0's batched forward runs faster channels-last
    there, VGG16's does not; docs/experiments.md)."""
    if torch.device(device).type == "cuda":
        return True
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def write_cam_store(model: nn.Module, entries: Sequence[CamEntry], image_paths: dict[str, str],
                    out_dir: str | os.PathLike, *, method: str = "sacam", layer: str | None = None,
                    crop_size: int | None = None, batch_size: int = 32, device: torch.device | str = "cpu",
                    images_per_part: int = 64, inspect_images: int = 0, num_workers: int = 0,
                    compression: str = "gzip", compression_level: int = 1, progress: bool = True,
                    channels_last: bool | None = None, stop_after_parts: int | None = None,
                    shard: tuple[int, int] | None = None, fusion: str = "sum") -> "CamStore":
    """Compute and store the fused CAM of every entry; resumable.

    Images are processed in sorted id order, in parts of ``images_per_part`` images; each part is one HDF5 file
    ``cams-NNNNN.h5`` written atomically into ``out_dir``, and a part whose file exists is skipped, so a killed run
    resumes where it stopped and gives the same content as an uninterrupted one (passes never span parts). A
    ``plan.json`` records the work; stale parts from a different plan are removed.

    Per pass up to ``batch_size`` crops, always all crops of an image together unless one image alone has more
    (then in chunks of ``batch_size``): one forward and one backward per pass. ``inspect_images``: the first that
    many images also store each crop's raw map (``crop_maps``). ``stop_after_parts`` (tests) stops after writing
    that many new parts, as a kill would. Writes ``index.csv`` and ``summary.json`` when all parts exist.
    ``channels_last``: memory format of the model and crops (None: :func:`prefer_channels_last`). ``fusion``:
    one of :data:`FUSIONS`; every entry also stores its crops' class probabilities (``crop_probs``).

    ``shard=(i, n)``: compute only the parts :func:`shard_parts` ``(n_parts, i, n)`` of the global plan of
    ``entries`` (which are all entries, in every shard), under their global part names; the directory is then a
    store of that shard's entries, and :func:`merge_cam_stores` joins the shards. A part's content does not depend
    on ``n`` (the same images, the same passes).
    """
    shard = (0, 1) if shard is None else (int(shard[0]), int(shard[1]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model = model.to(device).eval()
    if channels_last is None:
        channels_last = prefer_channels_last(model, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    layer = layer or getattr(model, "default_cam_layer", None)
    crop_size = int(crop_size or getattr(model, "input_size", 224))
    mean, std = model.mean, model.std
    batch_size = max(1, int(batch_size))
    if fusion not in FUSIONS:  # before any work
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")
    settings = {"method": method, "layer": layer, "crop_size": crop_size, "batch_size": batch_size, "fusion": fusion,
                "inspect_images": inspect_images, "backbone": getattr(model, "name", type(model).__name__)}
    plan = _plan(entries, images_per_part)
    mine = shard_parts(len(plan), *shard)
    partition = _partition_digest(entries, images_per_part)
    digest = _plan_digest(partition, settings, shard)
    plan_path = out_dir / "plan.json"
    if plan_path.exists() and read_json(plan_path).get("digest") != digest:
        log.warning("%s: CAM parts from a different plan found; recomputing", out_dir)
        for p in out_dir.glob("cams-*.h5"):
            p.unlink()
    write_json(plan_path, {"digest": digest, "partition": partition, "parts": len(plan), "entries": len(entries),
                           "images_per_part": int(images_per_part), "shard": shard[0], "n_shards": shard[1],
                           "part_range": [mine.start, mine.stop], **settings})

    by_image: dict[str, list[CamEntry]] = {}
    for e in entries:
        by_image.setdefault(e.image_id, []).append(e)
    inspect_set = set(sorted(by_image)[:inspect_images])
    todo = [i for i in mine if not (out_dir / _part_name(i)).exists()]
    total_crops = sum(len(e.crops) for i in todo for img in plan[i] for e in by_image[img])
    if len(todo) < len(mine):
        log.info("%s: %d of %d CAM parts already done; resuming", out_dir, len(mine) - len(todo), len(mine))

    t0, n_crops, written = time.time(), 0, 0
    with make_cam(method, model, layer) as cam, tqdm(total=total_crops, unit="crop", desc=f"{method} CAMs",
                                                      disable=not progress, smoothing=0.1) as bar:
        images = _iter_images([img for i in todo for img in plan[i]], image_paths, num_workers,
                              pin=device.type == "cuda")
        for part in todo:
            with atomic_path(out_dir / _part_name(part)) as tmp, h5py.File(tmp, "w", track_order=True) as f:
                f.attrs.update({"format": STORE_FORMAT, **{k: str(v) for k, v in settings.items()}})
                pending: list[tuple[str, torch.Tensor, list[CamEntry]]] = []
                pending_crops = 0
                for _ in plan[part]:
                    image_id, path, img = next(images)
                    ents = by_image[image_id]
                    k = sum(len(e.crops) for e in ents)
                    if pending and pending_crops + k > batch_size:
                        _run_pass(cam, pending, f, crop_size, mean, std, batch_size, inspect_set, device,
                                  compression, compression_level, memory_format, fusion)
                        bar.update(pending_crops)
                        n_crops += pending_crops
                        pending, pending_crops = [], 0
                    _check_size(img, ents, path)
                    pending.append((image_id, img, ents))
                    pending_crops += k
                if pending:
                    _run_pass(cam, pending, f, crop_size, mean, std, batch_size, inspect_set, device,
                              compression, compression_level, memory_format, fusion)
                    bar.update(pending_crops)
                    n_crops += pending_crops
            written += 1
            if stop_after_parts is not None and written >= stop_after_parts and part != todo[-1]:
                log.info("%s: stopping after %d parts (stop_after_parts)", out_dir, written)
                return CamStore(out_dir)
    secs = time.time() - t0
    index = _build_index(out_dir / _part_name(i) for i in mine)
    write_csv(index, out_dir / "index.csv")
    summary = {**settings, "entries": len(index), "images": int(index.image_id.nunique()) if len(index) else 0,
               "crops": int(index.n_crops.sum()) if len(index) else 0, "parts": len(mine),
               "computed_crops": n_crops, "seconds": round(secs, 3),
               "crops_per_s": round(n_crops / secs, 2) if secs > 0 and n_crops else None,
               "device": str(device), "channels_last": bool(channels_last)}
    if shard != (0, 1):
        summary.update({"shard": shard[0], "n_shards": shard[1], "part_range": [mine.start, mine.stop],
                        "plan_parts": len(plan)})
    write_json(out_dir / "summary.json", summary)
    return CamStore(out_dir)


def _link_or_copy(src: Path, dst: Path) -> str:
    """Make ``dst`` a hard link of ``src`` (a copy, written atomically, where the filesystem has no hard links
    between the two); returns "link", "copy" or "kept" (already the same file)."""
    if dst.exists():
        if os.path.samefile(src, dst):
            return "kept"
        dst.unlink()
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return "copy"


#: settings every shard of one store must share (``batch_size`` may differ: it only changes how many crops go
#: through the network at once, not what is computed)
_SHARED_SETTINGS = ("method", "layer", "crop_size", "fusion", "inspect_images", "backbone")


def merge_cam_stores(shard_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> "CamStore":
    """Publish the shards written by ``write_cam_store(..., shard=(i, n))`` as one store in ``out_dir``.

    Each shard's parts are hard-linked into ``out_dir`` under their global names (copied where hard links are not
    possible; the maps are never rewritten), ``index.csv`` is the shards' indexes in part order and
    ``summary.json`` adds up their counts and timings, so the result reads exactly like a store written in one go.
    Raises ``ValueError`` naming the shard directory when a shard is unfinished, comes from another plan (other
    entries, part size or CAM settings) or the shards do not cover every part of the plan exactly once.
    """
    out_dir = Path(out_dir)
    dirs = [Path(d) for d in shard_dirs]
    if not dirs:
        raise ValueError("merge_cam_stores: no shard directories given")
    plans = []
    for d in dirs:
        for name in ("plan.json", "index.csv", "summary.json"):
            if not (d / name).is_file():
                raise ValueError(f"{d}: not a finished CAM shard (no {name})")
        plans.append(read_json(d / "plan.json"))
    ref, ref_dir = plans[0], dirs[0]
    for d, p in zip(dirs, plans):
        if p.get("partition") != ref.get("partition") or p.get("parts") != ref.get("parts"):
            raise ValueError(f"{d}: CAM shard from another plan than {ref_dir} (other entries or images per part); "
                             "recompute that shard")
        diff = {k: (p.get(k), ref.get(k)) for k in _SHARED_SETTINGS if p.get(k) != ref.get(k)}
        if diff:
            raise ValueError(f"{d}: CAM shard computed with other settings than {ref_dir}: {diff}")
    order = sorted(range(len(dirs)), key=lambda k: (plans[k]["part_range"][0], plans[k]["part_range"][1]))
    covered = [i for k in order for i in range(*plans[k]["part_range"])]
    if covered != list(range(int(ref["parts"]))):
        raise ValueError(f"CAM shards {[str(dirs[k]) for k in order]} cover parts {covered}, not each of the plan's "
                         f"{ref['parts']} parts exactly once")
    out_dir.mkdir(parents=True, exist_ok=True)
    indexes, summaries, how = [], [], {"link": 0, "copy": 0, "kept": 0}
    for k in order:
        d, p = dirs[k], plans[k]
        for i in range(*p["part_range"]):
            src = d / _part_name(i)
            if not src.is_file():
                raise ValueError(f"{d}: CAM shard lacks its part {src.name}")
            how[_link_or_copy(src, out_dir / src.name)] += 1
        idx = pd.read_csv(d / "index.csv", dtype={"image_id": str, "part": str})
        if len(idx) and not set(idx.part) <= {_part_name(i) for i in range(*p["part_range"])}:
            raise ValueError(f"{d}/index.csv names parts outside the shard's range {p['part_range']}")
        indexes.append(idx)
        summaries.append(read_json(d / "summary.json"))
    indexes = [i for i in indexes if len(i)]  # (empty shards: fewer parts than shards)
    index = pd.concat(indexes, ignore_index=True) if indexes else pd.DataFrame(columns=INDEX_COLUMNS)
    dup = index.entry_id[index.entry_id.duplicated()]
    if len(dup):
        raise ValueError(f"CAM shards {[str(d) for d in dirs]} both hold entries {sorted(set(dup))[:10]}")
    if len(index) != int(ref["entries"]):
        raise ValueError(f"CAM shards hold {len(index)} entries, the plan has {ref['entries']}")
    write_csv(index, out_dir / "index.csv")
    batch_sizes = sorted({int(p["batch_size"]) for p in plans})
    settings = {k: ref[k] for k in _SHARED_SETTINGS if k in ref}
    settings["batch_size"] = batch_sizes[0] if len(batch_sizes) == 1 else batch_sizes
    write_json(out_dir / "plan.json", {
        "digest": _plan_digest(ref["partition"], settings, (0, 1)), "partition": ref["partition"],
        "parts": ref["parts"], "entries": ref["entries"], "images_per_part": ref.get("images_per_part"),
        "shard": 0, "n_shards": 1, "part_range": [0, ref["parts"]], "merged_from": len(dirs), **settings})
    computed = sum(int(s.get("computed_crops") or 0) for s in summaries)
    secs = sum(float(s.get("seconds") or 0.0) for s in summaries)
    write_json(out_dir / "summary.json", {
        **settings, "entries": len(index), "images": int(index.image_id.nunique()) if len(index) else 0,
        "crops": int(index.n_crops.sum()) if len(index) else 0, "parts": int(ref["parts"]),
        "computed_crops": computed, "seconds": round(secs, 3),
        "crops_per_s": round(computed / secs, 2) if secs > 0 and computed else None,
        "device": ",".join(sorted({str(s.get("device")) for s in summaries})),
        "channels_last": all(bool(s.get("channels_last")) for s in summaries),
        "shards": len(dirs), "parts_linked": how["link"] + how["kept"], "parts_copied": how["copy"]})
    log.info("%s: merged %d CAM shards, %d parts (%d linked, %d copied), %d entries", out_dir, len(dirs),
             ref["parts"], how["link"] + how["kept"], how["copy"], len(index))
    return CamStore(out_dir)


def _check_size(img: torch.Tensor, ents: list[CamEntry], path: str) -> None:
    h, w = img.shape[-2:]
    for e in ents:
        if len(e.crops) == 0:
            raise ValueError(f"{e.kind} {e.entry_id} of image {e.image_id} has no crops")
        c = e.crops
        if (c[:, 0] < -1).any() or (c[:, 1] < -1).any() or (c[:, 2] > w + 1).any() or (c[:, 3] > h + 1).any():
            raise ValueError(f"{path}: image is {w}x{h} but {e.kind} {e.entry_id} has a crop outside it: "
                             f"{c.tolist()}")


def _run_pass(cam: BaseCAM, pending, f: h5py.File, crop_size: int, mean, std, batch_size: int,
              inspect_set: set, device: torch.device, compression: str, level: int,
              memory_format: torch.memory_format = torch.contiguous_format, fusion: str = "sum") -> None:
    """One batched forward/backward over all crops of the pending images (in chunks of ``batch_size`` only when
    one image alone has more crops), then per entry: paste, fuse (``fusion``), store."""
    # global crop list: (image position, box, target)
    gpu_imgs = [img.to(device, non_blocking=True) for _, img, _ in pending]
    owner, boxes, targets = [], [], []
    for j, (_, _, ents) in enumerate(pending):
        for e in ents:
            owner += [j] * len(e.crops)
            boxes.append(np.asarray(e.crops, np.float32))
            targets += [e.class_index] * len(e.crops)
    owner_a, boxes_a = np.asarray(owner), np.concatenate(boxes)
    t = torch.tensor(targets, dtype=torch.long, device=device)
    maps, probs = [], []
    for i in range(0, len(owner_a), batch_size):
        sl = slice(i, i + batch_size)
        x = torch.cat([extract_crops(gpu_imgs[j], boxes_a[sl][owner_a[sl] == j], crop_size, mean, std)
                       for j in np.unique(owner_a[sl])]).contiguous(memory_format=memory_format)
        maps.append(cam(x, t[sl]))
        probs.append(torch.softmax(cam.outputs.float(), 1).gather(1, t[sl, None])[:, 0])
    maps, probs = torch.cat(maps), torch.cat(probs)
    k = 0
    for (image_id, _, ents), gimg in zip(pending, gpu_imgs):
        hw = tuple(gimg.shape[-2:])
        for e in ents:
            m, p = maps[k:k + len(e.crops)], probs[k:k + len(e.crops)]
            k += len(e.crops)
            fused = _paste(m, e.crops, hw, fusion_weights(fusion, p)).cpu().numpy()
            g = f.create_group(str(e.entry_id))
            _store_map(g, "map", fused, compression, level)
            g.create_dataset("crops", data=np.asarray(e.crops, np.float32), track_times=False)
            g.create_dataset("crop_probs", data=p.cpu().numpy().astype(np.float32), track_times=False)
            g.attrs.update({"kind": e.kind, "image_id": e.image_id, "class": e.cls,
                            "class_index": int(e.class_index), "x": float(e.x), "y": float(e.y)})
            if image_id in inspect_set:
                _store_map(g, "crop_maps", m.cpu().numpy(), compression, level)


def _build_index(parts: Iterable[Path]) -> pd.DataFrame:
    rows = []
    for path in parts:
        with h5py.File(path, "r") as f:
            for key, g in f.items():
                a = g.attrs
                h, w = g["map"].shape
                rows.append((int(key), str(a["kind"]), str(a["image_id"]), str(a["class"]), int(a["class_index"]),
                             float(a["x"]), float(a["y"]), int(g["crops"].shape[0]), h, w, path.name))
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


class CamStore:
    """Reader of a CAM store directory (``index.csv`` + ``cams-*.h5``); HDF5 files are opened lazily on first
    access (and not pickled, so a store can be handed to DataLoader workers).

    ``load(entry_id) -> (fused map float32 (H, W), meta)`` with meta keys ``entry_id, kind, image_id, class,
    class_index, x, y, crops (N, 4), crop_probs (N,)`` (the classifier's probability of the class on each crop;
    NaN in stores written before it was kept); in click mode entry ids are click ids.
    """

    def __init__(self, stage_dir: str | os.PathLike):
        self.dir = Path(stage_dir)
        self._files: dict[str, h5py.File] = {}
        self._index: pd.DataFrame | None = None

    @property
    def index(self) -> pd.DataFrame:
        if self._index is None:
            path = self.dir / "index.csv"
            if path.is_file():
                self._index = pd.read_csv(path, dtype={"image_id": str, "part": str})
            else:  # an unfinished store (work dir): list the parts present
                parts = sorted(self.dir.glob("cams-*.h5"))
                if not parts:
                    raise FileNotFoundError(f"{self.dir}: no CAM store here (no index.csv, no cams-*.h5)")
                self._index = _build_index(parts)
            self._index = self._index.set_index("entry_id", drop=False)
        return self._index

    def click_ids(self) -> list[int]:
        """All entry ids (click ids in click mode), in storage order."""
        return [int(i) for i in self.index.entry_id]

    entry_ids = click_ids

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, entry_id: int) -> bool:
        return int(entry_id) in self.index.index

    def _group(self, entry_id: int) -> h5py.Group:
        try:
            part = self.index.at[int(entry_id), "part"]
        except KeyError:
            raise KeyError(f"{self.dir}: no CAM entry {entry_id}") from None
        f = self._files.get(part)
        if f is None:
            f = self._files[part] = h5py.File(self.dir / part, "r")
        return f[str(int(entry_id))]

    @staticmethod
    def _read_map(ds: h5py.Dataset) -> np.ndarray:
        return ds[()].astype(np.float32) * np.float32(ds.attrs["scale"] or 1.0)

    def load(self, entry_id: int) -> tuple[np.ndarray, dict]:
        g = self._group(entry_id)
        a = g.attrs
        crops = g["crops"][()]
        probs = g["crop_probs"][()] if "crop_probs" in g else np.full(len(crops), np.nan, np.float32)
        meta = {"entry_id": int(entry_id), "kind": str(a["kind"]), "image_id": str(a["image_id"]),
                "class": str(a["class"]), "class_index": int(a["class_index"]), "x": float(a["x"]),
                "y": float(a["y"]), "crops": crops, "crop_probs": probs}
        return self._read_map(g["map"]), meta

    def load_crop_maps(self, entry_id: int) -> np.ndarray | None:
        """Each crop's raw map ``(N, h, w)`` for entries of inspected images, else None."""
        g = self._group(entry_id)
        return self._read_map(g["crop_maps"]) if "crop_maps" in g else None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "CamStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"dir": self.dir, "_files": {}, "_index": self._index}

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
