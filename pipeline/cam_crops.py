"""CAM crops and click fusion (paper Eq. 4).

:func:`extract_crops` cuts a click's crops out of the image on the pixels the classifier was trained on
(:func:`pixel_boxes`, the geometry of :func:`pipeline.geometry.crop_bounds`) and resizes them in one
``roi_align`` call. :func:`paste_and_fuse` resizes each crop's map back to the crop's box in the image (bilinear)
and sums the pasted maps into an image-sized map: the plain sum of Eq. 4 (``fusion="sum"``), or (``fusion="prob"``)
each crop's map weighted by the classifier's softmax probability of the click's class on that crop, so a crop the
classifier does not recognise as the class (background, a part, a neighbour) contributes less. What ``prob`` adds
over ``sum`` on voc07-sample: docs/experiments.md.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .geometry import crop_bounds

#: how a click's crop maps are fused (:func:`fusion_weights`): Eq. 4's plain sum, or weighted by class probability
FUSIONS = ("sum", "prob")


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
    crop geometry of :func:`pipeline.geometry.crop_bounds` (every pixel the box overlaps, clipped, >= 1 px), so
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


#: how :func:`paste_maps` puts a crop's map back onto its box: at the receptive fields' centres (``grid``,
#: :func:`layer_grid`) or resized like an image (``resize``)
PASTE_MODES = ("grid", "resize")


class MapGrid(NamedTuple):
    """Where a CAM layer's positions sit in its crop: position ``i``'s receptive field is centred on the continuous
    crop coordinate ``i * stride + c0`` (pixel ``k`` spans ``[k, k + 1)``) of a ``crop_px`` square crop
    (:func:`pipeline.extent.grid` of the convolutions up to the layer, :func:`layer_grid`)."""

    crop_px: int
    stride: float
    c0: float


def layer_grid(model, layer: str, crop_px: int) -> MapGrid | None:
    """The :class:`MapGrid` of ``model``'s CAM layer ``layer`` (a :class:`pipeline.backbones.ClassifierNet`): the
    convolutions and pooling windows of its body, in definition order, up to and including the layer's module.
    None when the model does not say where its layers are (then :func:`paste_maps` stretches each map over its
    box, as an image resize would)."""
    from .extent import grid
    from .pooling import conv_layers

    if not hasattr(model, "layer_module") or not hasattr(model, "body"):
        return None
    inside = {id(m) for m in model.layer_module(layer).modules()}
    passed, entered = nn.ModuleList(), False
    for m in model.body.modules():  # depth-first in definition order: the layer's subtree is one run
        if id(m) in inside:
            entered = True
        elif entered:
            break
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            passed.append(m)
    stride, c0 = grid(conv_layers(passed))
    return MapGrid(int(crop_px), float(stride), float(c0))


def _grid_coords(n_out: int, n_map: int, g: MapGrid) -> torch.Tensor:
    """grid_sample coordinates (align_corners=True) of the ``n_out`` pixels of a box side for a map of ``n_map``
    positions: pixel ``j``'s centre is the crop coordinate ``u = (j + 0.5) * crop_px / n_out``, at map position
    ``(u - c0) / stride``."""
    u = (torch.arange(n_out, dtype=torch.float32) + 0.5) * (g.crop_px / n_out)
    f = (u - g.c0) / g.stride
    return f / max(n_map - 1, 1) * 2 - 1


def paste_maps(maps: torch.Tensor, boxes, image_hw: tuple[int, int],
               weights: torch.Tensor | None = None, grid: MapGrid | None = None) -> torch.Tensor:
    """The unchecked core of :func:`paste_and_fuse`: the fused ``image_hw`` map as a tensor on the maps' device.

    ``grid``: where the map's positions sit in the crop (:func:`layer_grid`): each box pixel samples the map
    (bilinear, edge values beyond the outermost positions) at the position whose receptive field is centred on it.
    None: each map is resized to its box like an image (``align_corners=False``), which puts position ``i`` at the
    middle of stride cell ``i``; for convolutions padded by ``k // 2`` (EfficientNet, ResNet) that is half a cell
    (15.5 px of a 224 px crop at stride 32) right of and below its receptive field."""
    out = torch.zeros(image_hw, dtype=torch.float32, device=maps.device)
    if weights is not None:
        maps = maps * weights.to(maps.device, torch.float32)[:, None, None]
    for m, (x1, y1, x2, y2) in zip(maps, pixel_boxes(boxes, image_hw).tolist()):
        if grid is None:
            up = F.interpolate(m[None, None].float(), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
        else:
            h, w = m.shape
            gy, gx = torch.meshgrid(_grid_coords(y2 - y1, h, grid), _grid_coords(x2 - x1, w, grid), indexing="ij")
            up = F.grid_sample(m[None, None].float(), torch.stack([gx, gy], -1)[None].to(m.device), mode="bilinear",
                               padding_mode="border", align_corners=True)
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
                   weights: torch.Tensor | np.ndarray | None = None, grid: MapGrid | None = None) -> np.ndarray:
    """Eq. 4: upsample each crop's map ``(N, h, w)`` to its box's pixels (:func:`pixel_boxes`; bilinear, each
    position at its receptive field's centre when ``grid`` says where that is: :func:`paste_maps`), add it there
    into an ``image_hw`` map, sum over crops; ``weights`` ``(N,)``: a weighted sum instead (the ``"prob"`` fusion).
    Returns ``(H, W)`` float32 numpy (one device-to-host copy)."""
    maps = torch.as_tensor(maps)
    n = np.asarray(boxes).reshape(-1, 4).shape[0]
    if maps.ndim != 3 or maps.shape[0] != n:
        raise ValueError(f"{tuple(maps.shape)} maps do not match {n} boxes")
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (n,):
            raise ValueError(f"{tuple(weights.shape)} weights do not match {n} boxes")
    return paste_maps(maps, boxes, image_hw, weights, grid).cpu().numpy()
