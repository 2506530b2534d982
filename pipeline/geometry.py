"""The one crop geometry: which pixels a continuous box covers (docs/architecture.md, boxes), and the crop cut on
them. The classifier is trained on these crops and the CAM stage cuts its crops, and pastes their maps back, on
exactly the same pixels (:func:`pipeline.cam_crops.pixel_boxes`)."""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np


def crop_bounds(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer pixel bounds ``(ix1, iy1, ix2, iy2)`` (exclusive end) of a continuous box, clipped to the image.

    Pixel ``i`` covers ``[i, i + 1)``; the crop holds every pixel the box overlaps, at least one pixel.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {tuple(box)} is not finite")
    ix1 = min(max(int(math.floor(x1)), 0), width - 1)
    iy1 = min(max(int(math.floor(y1)), 0), height - 1)
    ix2 = max(min(int(math.ceil(x2)), width), ix1 + 1)
    iy2 = max(min(int(math.ceil(y2)), height), iy1 + 1)
    return ix1, iy1, ix2, iy2


def crop_and_resize(image: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """The pixels of ``box`` (see :func:`crop_bounds`) resized to ``size x size`` (area interpolation when
    shrinking, bilinear when enlarging). ``image`` is ``HxWx3`` uint8; returns ``size x size x 3`` uint8."""
    h, w = image.shape[:2]
    ix1, iy1, ix2, iy2 = crop_bounds(box, w, h)
    crop = image[iy1:iy2, ix1:ix2]
    shrink = crop.shape[0] >= size and crop.shape[1] >= size
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
