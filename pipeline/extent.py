"""Boxes from a class activation map without proposals, seed 003's way (Gudi et al., Sec. 3.1.1, Algorithm 1).

For one class's map at the network's feature resolution (``h x w``, e.g. :func:`pipeline.pooling.cam_forward`):

1. **peaks**: the local maxima of the map (a pixel equal to the maximum of its 3x3 neighbourhood; a plateau of such
   pixels is one peak, ``scipy.ndimage``), among the *activated* pixels (raw map value > ``floor``, 0: a positive
   CAM).
2. **mountains**: each activated pixel climbs to its highest 8-neighbour until it reaches a peak (steepest ascent,
   all pixels at once by pointer jumping in numpy): the pixels that climb to a peak are its "mountain", the flood
   fill of the paper's Fig. 4, pixels below the threshold included. (The discrete watershed of the negated map; the
   pixels that are not activated belong to no mountain.)
3. **threshold**: only the mountains whose peak reaches ``threshold`` on the map min-max scaled to 0..255
   (:func:`pipeline.boxes.normalize_map`, the scale of stage 5's T_cam) are kept. (The paper derives its threshold
   from the output layer's biases and weights without giving the rule; stage 5's threshold rules are used here.)
4. **fast back-projection** (Algorithm 1): each kept pixel ``x`` is mapped through the layers from the CAM back to
   the input, ``x0 <- x0 * s - p``, ``x1 <- x1 * s - p + k - 1`` (``x1`` inclusive: the receptive field), and, with
   the ratio ``r``, each side moves in by ``r / 2`` of the field's width ``x1 + 1 - x0``. (The paper's printed line 10
   *adds* that amount to ``x1`` as well, which would shift the field instead of resizing it; read as a typo.)
   ``r=0`` (the default; the paper's "no ratio") keeps the whole field; ``r=None`` (:func:`auto_ratio`) shrinks
   each field to one stride cell about its centre, ``1 - stride / width``. The paper tuned ``r`` on a validation
   set and gives no value.
   The union of the fields (clipped to the input) is the back-projection image.
5. **contours -> rectangles**: the outer contours of the back-projection (``cv2.findContours``) and the bounding
   rectangle of each (``cv2.boundingRect``), scaled from the network input to the image. A box's score is the
   highest kept peak whose back-projected centre lies in it (0..1 of the normalised map).

Coordinates follow docs/architecture.md: a network-input pixel ``(row r, column c)`` covers ``[c, c + 1) x
[r, r + 1)``; the input square of ``input_px`` covers the whole ``W x H`` image (squashed).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import cv2
import numpy as np
from scipy import ndimage

from .boxes import normalize_map


class ExtentBox(NamedTuple):
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels (continuous)
    score: float                            # the box's highest peak on the 0..1 scale


def mountains(cam: np.ndarray, floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(labels int32 h x w, peak value of each label)``: label ``i >= 1`` marks the pixels of peak ``i``'s
    mountain (steps 1-2); 0 the pixels that are not activated (``<= floor``). ``peaks[i - 1]`` is its peak's value."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"mountains: expected a 2-D map, got shape {cam.shape}")
    active = cam > floor
    h, w = cam.shape
    # each pixel's highest 8-neighbour, itself first (ties keep the pixel: it is a top, a plateau one label)
    vals = np.pad(np.where(active, cam, -np.inf), 1, constant_values=-np.inf)
    ids = np.pad(np.arange(h * w).reshape(h, w), 1, constant_values=-1)
    shifts = [(0, 0)] + [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    best = np.stack([vals[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in shifts]).argmax(0)
    parent = np.stack([ids[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in shifts])[
        best, np.arange(h)[:, None], np.arange(w)].ravel()
    tops = (parent == np.arange(h * w)).reshape(h, w) & active
    markers, n = ndimage.label(tops, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(cam.shape, np.int32), np.zeros(0, np.float32)
    for _ in range(int(np.ceil(np.log2(h * w))) + 1):  # pointer jumping: every pixel's top
        parent = parent[parent]
    labels = np.where(active, markers.ravel()[parent].reshape(h, w), 0).astype(np.int32)
    peaks = np.asarray(ndimage.maximum(cam, markers, index=np.arange(1, n + 1)), np.float32).reshape(-1)
    return labels, peaks


def receptive_field(coords: np.ndarray, layers: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1, lines 2-6: ``(x0, x1)`` input-pixel bounds (``x1`` inclusive) of feature-map positions
    ``coords`` through ``layers`` (``(kernel, stride, padding)`` from the input to the CAM layer)."""
    x0 = np.asarray(coords, dtype=np.float64).copy()
    x1 = x0.copy()
    for k, s, p in reversed(list(layers)):
        x0 = x0 * s - p
        x1 = x1 * s - p + k - 1
    return x0, x1


def field_size(layers: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
    """``(width of one position's receptive field, its stride)`` in input pixels."""
    x0, x1 = receptive_field(np.zeros(1), layers)
    return int(x1[0] - x0[0] + 1), int(np.prod([s for _, s, _ in layers])) if layers else 1


def grid(layers: Sequence[tuple[int, int, int]]) -> tuple[int, float]:
    """``(stride, c0)``: feature position ``x``'s receptive field is centred on the continuous input coordinate
    ``x * stride + c0`` (e.g. ``c0 = 0.5`` for convolutions padded by ``k // 2``: the grid is anchored at the first
    pixel, not at the middle of a stride cell)."""
    x0, x1 = receptive_field(np.zeros(1), layers)
    return int(np.prod([s for _, s, _ in layers])) if layers else 1, float(x0[0] + x1[0] + 1) / 2


def auto_ratio(layers: Sequence[tuple[int, int, int]]) -> float:
    """The ratio ``r`` that shrinks a receptive field to one stride cell: ``1 - stride / width`` (0 when the field
    is not wider than the stride)."""
    width, stride = field_size(layers)
    return max(0.0, 1.0 - stride / width)


def backproject(pixels: np.ndarray, layers: Sequence[tuple[int, int, int]], input_hw: tuple[int, int],
                ratio: float | None = 0.0) -> np.ndarray:
    """Algorithm 1: the ``uint8`` back-projection image (``input_hw``) of feature-map ``pixels`` (``(N, 2)`` rows,
    columns), 1 on every input pixel whose centre lies in a kept pixel's (ratio-corrected) receptive field."""
    if ratio is None:
        ratio = auto_ratio(layers)
    if not 0 <= ratio < 1:
        raise ValueError(f"backproject: ratio r must be in [0, 1), got {ratio}")
    h, w = input_hw
    out = np.zeros((h + 1, w + 1), np.int32)
    pixels = np.asarray(pixels, dtype=np.int64).reshape(-1, 2)
    if len(pixels) == 0:
        return np.zeros((h, w), np.uint8)
    bounds = []
    for coords, size in ((pixels[:, 0], h), (pixels[:, 1], w)):
        lo, hi = receptive_field(coords, layers)
        hi = hi + 1                       # continuous: the field covers [lo, hi)
        cut = (hi - lo) * ratio / 2       # lines 7-10 (see the module docstring)
        lo, hi = lo + cut, hi - cut
        first = np.clip(np.ceil(lo - 0.5), 0, size).astype(np.int64)   # pixels whose centre is in [lo, hi)
        stop = np.clip(np.ceil(hi - 0.5), 0, size).astype(np.int64)
        bounds.append((first, np.maximum(stop, first)))
    (r0, r1), (c0, c1) = bounds
    # all rectangles at once: +1/-1 at their corners, then cumulative sums (a summed-area fill)
    np.add.at(out, (r0, c0), 1)
    np.add.at(out, (r0, c1), -1)
    np.add.at(out, (r1, c0), -1)
    np.add.at(out, (r1, c1), 1)
    return (out.cumsum(0).cumsum(1)[:h, :w] > 0).astype(np.uint8)


def extent_boxes(cam: np.ndarray, layers: Sequence[tuple[int, int, int]], input_hw: tuple[int, int],
                 image_wh: tuple[int, int], threshold: float, ratio: float | None = 0.0,
                 floor: float = 0.0) -> list[ExtentBox]:
    """Boxes of one class from its feature-resolution map ``cam`` (steps 1-5 of the module docstring), best score
    first; ``threshold`` on the 0..255 scale; ``input_hw`` the network input's size, ``image_wh`` the image's."""
    cam = np.asarray(cam, dtype=np.float32)
    norm, status = normalize_map(cam)
    if norm is None:
        return []
    labels, peaks = mountains(cam, floor)
    peak_norm = (peaks - float(np.min(cam))) * (255.0 / max(float(np.max(cam)) - float(np.min(cam)), 1e-12))
    keep = np.flatnonzero(peak_norm >= threshold) + 1
    if len(keep) == 0:
        return []
    rows, cols = np.nonzero(np.isin(labels, keep))
    bp = backproject(np.stack([rows, cols], 1), layers, input_hw, ratio)
    contours, _ = cv2.findContours(bp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    # which contour holds each kept peak's back-projected centre: the filled contours drawn with their index
    region = np.zeros(bp.shape, np.int32)
    for i, c in enumerate(contours):
        cv2.drawContours(region, [c], -1, i + 1, thickness=cv2.FILLED)
    score = np.zeros(len(contours), np.float64)
    h, w = input_hw
    for lab, (pr, pc) in zip(keep, ndimage.maximum_position(cam, labels, keep)):
        (y0, y1), (x0, x1) = (receptive_field(np.array([v]), layers) for v in (pr, pc))
        cy = int(np.clip((y0[0] + y1[0] + 1) / 2, 0, h - 1))
        cx = int(np.clip((x0[0] + x1[0] + 1) / 2, 0, w - 1))
        i = region[cy, cx] - 1
        if i >= 0:
            score[i] = max(score[i], min(1.0, peak_norm[lab - 1] / 255.0))
    sx, sy = image_wh[0] / w, image_wh[1] / h
    out = []
    for i, c in enumerate(contours):
        x, y, bw, bh = cv2.boundingRect(c)
        out.append(ExtentBox((x * sx, y * sy, (x + bw) * sx, (y + bh) * sy), float(score[i])))
    return sorted(out, key=lambda b: (-b.score, b.box))
