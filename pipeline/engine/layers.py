"""Two small things every network here needs: frozen BatchNorm layers, and the input normalisation
``(rgb / 255 - mean) / std`` (``mean``/``std`` per channel, for RGB in 0..1, as ``ClassifierNet.mean``/``.std``)."""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn


def batchnorm_layers(module: nn.Module) -> Iterator[nn.Module]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm) inside ``module``, itself included."""
    return (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def freeze_batchnorm(module: nn.Module, *, stats: bool = True, affine: bool = False) -> nn.Module:
    """Freeze the BatchNorm layers of ``module``: ``stats`` puts them in eval mode (they normalise with, and keep,
    their running statistics; call again after each ``train()``), ``affine`` stops their weight and bias from
    learning (``requires_grad=False``). Returns ``module``."""
    for m in batchnorm_layers(module):
        if stats:
            m.eval()
        if affine:
            for p in m.parameters():
                p.requires_grad_(False)
    return module


@lru_cache(maxsize=32)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    # (x / 255 - mean) / std == x * scale + shift
    scale = (1.0 / (255.0 * np.array(std, dtype=np.float32))).astype(np.float32)
    shift = -np.array(mean, dtype=np.float32) / np.array(std, dtype=np.float32)
    return scale, shift


def normalize(x, mean: Sequence[float], std: Sequence[float]):
    """``(x / 255 - mean) / std`` of RGB values ``x`` in 0..255, as float32.

    * numpy ``(..., 3)`` (channels last, a decoded image or crop): ``x * scale + shift`` with float32 constants, in
      numpy (DataLoader workers never start torch's thread pool for it);
    * torch ``(..., 3, H, W)`` (channels first, on any device): ``(x - 255 mean) / (255 std)``.

    The two forms agree to float32 rounding, not bit for bit; each is the one its callers always used (crops for
    training: numpy; ``ClassifierNet.normalize`` and CAM crops: torch), so results stay bit-identical."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if isinstance(x, np.ndarray):
        scale, shift = _affine(mean, std)
        return x * scale + shift
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255.0
    return (x.float() - m) / s
