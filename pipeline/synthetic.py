"""Embedded synthetic dataset: a small, deterministic miniature of the click-supervised detection problem.

:func:`generate_dataset` writes a PASCAL VOC2007-layout dataset (``JPEGImages``, ``Annotations``,
``ImageSets/Main``) plus simulated clicks (``clicks_trainval.csv``), byte-identical for a given seed.

What makes it a fair miniature rather than a toy
------------------------------------------------
* **Classes differ only by a small part.** Every object is a procedurally drawn "creature": a body (superellipse
  with a wobbly outline, optional legs, shading, a stripe/spot/plain texture, a dark outline) carrying one small
  *emblem*. Body shape, colour, texture, legs and rotation are drawn from the same distributions for every class;
  only the emblem's shape (:data:`SYNTH_CLASSES`: star, cross, ring, ...) identifies the class, and each class has
  a slightly different (heavily overlapping) mean body elongation, like real categories. The emblem covers a few
  percent of the object's box, so a classifier keys on it and a CAM lights up only that part of the object: the
  failure that click-centred proposals and fused SA-CAMs are meant to fix.
* **Scale.** The body's longest side is log-uniform in ``[0.055, 0.8] * image_size`` (about 18 to 256 px at the
  default 320 px), so object sizes span more than 8x.
* **Crowding.** 1 to 4 objects per image; half of the later objects are placed next to an earlier one, so boxes
  overlap and later objects occlude earlier ones; an optional foreground bar (a "branch") occludes objects too.
  Objects may extend beyond the border.
* **Clutter.** Backgrounds mix colour gradients, low-frequency noise, stripes, translucent blobs and line
  segments; distractors that are *not* objects are drawn on the background: bodies without an emblem, emblems
  without a body (at a scale of their own), and generic shapes.

Annotation rules
----------------
* The box is the tight box of the object's *visible* pixels (inside the image, not hidden by objects or bars
  drawn over it), as a VOC annotator draws it.
* ``truncated``: more than 15% of the object's drawn area lies outside the image and its box touches the border.
* ``difficult``: the object is hard to recognise: its visible box's longest side is under ``20 * image_size / 320``
  px, or more than 60% of its in-image area is hidden by things drawn over it, or less than 30% of its emblem is
  visible. Layouts in which an object would keep less than 15% of its area visible (or a new object would have
  less than 45% of its area inside the image) are re-drawn, so no annotated object is invisible.

Layout of the output directory ``out_dir``::

    VOC2007/JPEGImages/<id>.jpg, VOC2007/Annotations/<id>.xml, VOC2007/ImageSets/Main/{trainval,test,<cls>_*}.txt
    clicks_trainval.csv      clicks on trainval objects (pipeline.clicks format)
    synthetic_parts.csv      per object: class, box, emblem box and areas, visibility (drawing data, for analysis)
    synthetic.json           generation parameters; written last: present and matching = dataset complete

Everything is first written into a hidden ``.synthetic.*.partial`` directory inside ``out_dir`` and moved into
place at the end (``VOC2007`` last but one, ``synthetic.json`` last), so a killed generation never looks complete.
Image ``i`` of a split is drawn from its own random stream ``SeedSequence([seed, split, i])``.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import cv2
import numpy as np
import pandas as pd

from .clicks import simulate_clicks, write_clicks
from .io import atomic_path, read_json, write_csv, write_json
from .voc import OBJECT_COLUMNS, VOCObject, write_annotation, write_image_sets

log = logging.getLogger(__name__)

SYNTH_CLASSES: tuple[str, ...] = ("star", "cross", "ring", "triangle", "square", "crescent", "bars", "dots")
"""Class names; each class is identified by the shape of the small emblem its objects carry."""

DEFAULT_SEED = 0
GENERATOR_VERSION = 1  # bump when the drawing changes; stored in synthetic.json
JPEG_QUALITY = 92
INFO_FILE = "synthetic.json"
CLICKS_FILE = "clicks_trainval.csv"
PARTS_FILE = "synthetic_parts.csv"

# Mean body elongation (length / thickness) per class; per-object elongation is log-normal around it with
# sigma _ASPECT_SIGMA, so the classes' distributions overlap heavily.
_CLASS_ELONGATION = (1.35, 1.6, 1.9, 1.45, 1.75, 2.2, 1.5, 2.0)
_ASPECT_SIGMA = 0.25
_SIZE_RANGE = (0.055, 0.8)          # body length as a fraction of the image's longest side (log-uniform)
_N_OBJECTS_P = (0.3, 0.3, 0.22, 0.18)
_P_NEAR = 0.5                       # probability that a later object is placed next to an earlier one
_MIN_VISIBLE = 0.15                 # layout constraint: every object keeps this fraction of its area visible
_MIN_INSIDE = 0.45                  # layout constraint: a new object has this fraction inside the image
_TRUNCATED_OUTSIDE = 0.15           # truncated: more than this fraction of the object lies outside the image
_DIFFICULT_SIDE = 20.0              # difficult: visible box longest side < this * image_size / 320
_DIFFICULT_VISIBLE = 0.4            # difficult: visible / in-image area below this
_DIFFICULT_PART = 0.3               # difficult: visible fraction of the emblem below this
_SHIFT = 4                          # sub-pixel bits for cv2 drawing
_SCALE = 1 << _SHIFT


# ----------------------------------------------------------------------------------------------------------------
# Emblem shapes: lists of (polygon in unit radius, fill value) drawn in order (0 cuts a hole).

def _circle(r: float, cx: float = 0.0, cy: float = 0.0, n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _rect(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], float)


def _star(n: int = 5, inner: float = 0.45) -> np.ndarray:
    t = np.arange(2 * n) * np.pi / n - np.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _emblem_ops(cls_index: int) -> list[tuple[np.ndarray, int]]:
    name = SYNTH_CLASSES[cls_index]
    if name == "star":
        return [(_star(), 1)]
    if name == "cross":
        w = 0.32
        return [(_rect(-1, -w, 1, w), 1), (_rect(-w, -1, w, 1), 1)]
    if name == "ring":
        return [(_circle(1.0), 1), (_circle(0.55), 0)]
    if name == "triangle":
        t = np.array([-90, 30, 150]) * np.pi / 180
        return [(np.stack([np.cos(t), np.sin(t) + 0.15], 1) * 1.1, 1)]
    if name == "square":
        return [(_rect(-0.78, -0.78, 0.78, 0.78), 1)]
    if name == "crescent":
        return [(_circle(1.0), 1), (_circle(0.82, 0.5, -0.1), 0)]
    if name == "bars":
        h = 0.17
        return [(_rect(-0.9, y - h, 0.9, y + h), 1) for y in (-0.62, 0.0, 0.62)]
    if name == "dots":
        return [(_circle(0.36, x, y, 16), 1) for x in (-0.5, 0.5) for y in (-0.5, 0.5)]
    raise ValueError(f"no emblem for class {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# Drawing helpers

def _pts(xy: np.ndarray) -> np.ndarray:
    """Float points -> int32 points for cv2 drawing with ``shift=_SHIFT``."""
    return np.round(np.asarray(xy) * _SCALE).astype(np.int32).reshape(-1, 1, 2)


def _hsv_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (h in [0, 1)) -> RGB float in 0..255."""
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32) * 255.0


def _random_colour(rng: np.random.Generator, s=(0.15, 0.9), v=(0.25, 0.95)) -> np.ndarray:
    return _hsv_rgb(rng.random(), rng.uniform(*s), rng.uniform(*v))


def _contrasting_colour(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A random colour whose brightness is far from ``base``'s (class-independent)."""
    bright = float(base.mean()) / 255.0
    v = rng.uniform(0.05, 0.3) if bright > 0.5 else rng.uniform(0.75, 1.0)
    return _hsv_rgb(rng.random(), rng.uniform(0.0, 0.9), v)


def _rot(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


@dataclass
class _Sprite:
    """An object or distractor drawn on a local canvas whose top-left corner sits at (x0, y0) in the image."""
    x0: int
    y0: int
    rgb: np.ndarray            # h x w x 3 float32
    mask: np.ndarray           # h x w bool: the object's pixels
    part: np.ndarray | None    # h x w bool: the emblem's pixels (None for distractors without one)

    def window(self, width: int, height: int):
        """(image slice, local slice) of the part of the canvas inside a ``width x height`` image, or None."""
        h, w = self.mask.shape
        ix1, iy1 = max(self.x0, 0), max(self.y0, 0)
        ix2, iy2 = min(self.x0 + w, width), min(self.y0 + h, height)
        if ix1 >= ix2 or iy1 >= iy2:
            return None
        return ((slice(iy1, iy2), slice(ix1, ix2)),
                (slice(iy1 - self.y0, iy2 - self.y0), slice(ix1 - self.x0, ix2 - self.x0)))

    def image_mask(self, width: int, height: int, which: str = "mask") -> np.ndarray:
        out = np.zeros((height, width), bool)
        win = self.window(width, height)
        if win is not None:
            out[win[0]] = getattr(self, which)[win[1]]
        return out

    def paste(self, image: np.ndarray) -> None:
        win = self.window(image.shape[1], image.shape[0])
        if win is None:
            return
        m = self.mask[win[1]]
        image[win[0]][m] = self.rgb[win[1]][m]


def _creature(rng: np.random.Generator, length: float, elongation: float, cls_index: int | None,
              cx: float, cy: float, theta: float) -> _Sprite:
    """Draw a creature (body, legs, texture, outline and, unless ``cls_index`` is None, its class emblem)."""
    a = length / 2.0
    b = max(a / elongation, 1.5)
    legs = rng.random() < 0.5
    leg_len = rng.uniform(0.25, 0.6) * b if legs else 0.0
    outline = max(1, int(round(b / 10)))
    radius = math.hypot(a * 1.15, (b + leg_len) * 1.15) + outline + 3
    x0, y0 = int(math.floor(cx - radius)), int(math.floor(cy - radius))
    size = int(math.ceil(2 * radius)) + 2
    lx, ly = cx - x0, cy - y0                     # object centre in local canvas coordinates
    R = _rot(theta)

    def to_local(p: np.ndarray) -> np.ndarray:
        return p @ R.T + (lx, ly)

    # body outline: superellipse with a low-frequency radial wobble
    n = 56
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    expo = rng.uniform(1.6, 5.0)
    c, s = np.cos(t), np.sin(t)
    wob = 1.0 + sum(rng.uniform(0, 0.06) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    body = np.stack([a * np.sign(c) * np.abs(c) ** (2 / expo), b * np.sign(s) * np.abs(s) ** (2 / expo)], 1)
    body = to_local(body * wob[:, None])

    mask = np.zeros((size, size), np.uint8)
    base = _random_colour(rng)
    dark = base * rng.uniform(0.3, 0.55)
    rgb = np.empty((size, size, 3), np.float32)

    # canonical coordinates of every canvas pixel (u along the body, v across it)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - lx, yy - ly
    u = dx * R[0, 0] + dy * R[1, 0]
    v = dx * R[0, 1] + dy * R[1, 1]
    shade = 1.0 + rng.uniform(0.1, 0.35) * (-v / b).clip(-1.5, 1.5)
    pattern = rng.integers(3)
    tex = np.ones_like(u)
    if pattern == 1:                                  # stripes across the body
        period = rng.uniform(0.25, 0.6) * b
        tex = np.where(np.sin(2 * np.pi * u / period + rng.uniform(0, 6.3)) > 0, 1.0, rng.uniform(0.6, 0.85))
    elif pattern == 2:                                # spots
        spots = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(3, 9))):
            p = to_local(np.array([[rng.uniform(-a, a) * 0.8, rng.uniform(-b, b) * 0.8]]))[0]
            cv2.circle(spots, tuple(_pts(p).ravel()), int(rng.uniform(0.1, 0.25) * b * _SCALE), 1, -1,
                       cv2.LINE_8, _SHIFT)
        tex = np.where(spots > 0, rng.uniform(0.55, 0.8), 1.0)
    rgb[:] = base[None, None, :] * (shade * tex)[..., None]

    if legs:
        k = int(rng.integers(2, 5))
        thick = max(1, int(round(0.14 * b)))
        for xk in np.linspace(-0.6 * a, 0.6 * a, k):
            p1 = to_local(np.array([[xk, 0.7 * b]]))[0]
            p2 = to_local(np.array([[xk + rng.uniform(-0.2, 0.2) * leg_len, b + leg_len]]))[0]
            cv2.line(mask, tuple(_pts(p1).ravel()), tuple(_pts(p2).ravel()), 2, thick, cv2.LINE_8, _SHIFT)
    cv2.fillPoly(mask, [_pts(body)], 1, cv2.LINE_8, _SHIFT)
    cv2.polylines(mask, [_pts(body)], True, 2, outline, cv2.LINE_8, _SHIFT)
    rgb[mask == 2] = dark                              # legs and outline

    part = None
    if cls_index is not None:
        r_e = min(rng.uniform(0.45, 0.65) * b, 0.38 * a)
        side = 1.0 if rng.random() < 0.5 else -1.0
        ex = side * rng.uniform(0.2, 0.65) * max(a - 1.15 * r_e, 0.0)
        er = _rot(rng.uniform(-0.3, 0.3))
        pm = np.zeros((size, size), np.uint8)
        for poly, val in _emblem_ops(cls_index):
            cv2.fillPoly(pm, [_pts(to_local((poly * r_e) @ er.T + (ex, 0.0)))], val, cv2.LINE_8, _SHIFT)
        part = (pm > 0) & (mask > 0)
        rgb[part] = _contrasting_colour(rng, base)
    return _Sprite(x0, y0, rgb, mask > 0, part)


def _emblem_alone(rng: np.random.Generator, radius: float, cx: float, cy: float) -> _Sprite:
    """A class emblem without a body (a distractor: the distinctive part out of context)."""
    size = int(math.ceil(2.4 * radius)) + 4
    x0, y0 = int(math.floor(cx - size / 2)), int(math.floor(cy - size / 2))
    er = _rot(rng.uniform(0, 2 * np.pi))
    pm = np.zeros((size, size), np.uint8)
    for poly, val in _emblem_ops(int(rng.integers(len(SYNTH_CLASSES)))):
        cv2.fillPoly(pm, [_pts((poly * radius) @ er.T + (cx - x0, cy - y0))], val, cv2.LINE_8, _SHIFT)
    rgb = np.empty((size, size, 3), np.float32)
    rgb[:] = _random_colour(rng)
    return _Sprite(x0, y0, rgb, pm > 0, None)


def _blob_shape(rng: np.random.Generator, radius: float, cx: float, cy: float) -> _Sprite:
    """A generic filled shape (ellipse, rectangle or random polygon) with shading: clutter."""
    size = int(math.ceil(2.2 * radius)) + 4
    x0, y0 = int(math.floor(cx - size / 2)), int(math.floor(cy - size / 2))
    lc = np.array([cx - x0, cy - y0])
    m = np.zeros((size, size), np.uint8)
    kind = rng.integers(3)
    if kind == 0:
        cv2.ellipse(m, (tuple(map(float, lc)), (2 * radius, 2 * radius * rng.uniform(0.3, 1.0)),
                        float(rng.uniform(0, 180))), 1, -1)
    elif kind == 1:
        poly = _rect(-1, -rng.uniform(0.2, 1.0), 1, rng.uniform(0.2, 1.0)) * radius
        cv2.fillPoly(m, [_pts(poly @ _rot(rng.uniform(0, np.pi)).T + lc)], 1, cv2.LINE_8, _SHIFT)
    else:
        k = int(rng.integers(3, 8))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = radius * rng.uniform(0.4, 1.0, k)
        cv2.fillPoly(m, [_pts(np.stack([r * np.cos(t), r * np.sin(t)], 1) + lc)], 1, cv2.LINE_8, _SHIFT)
    col = _random_colour(rng)
    yy = np.linspace(1.0 - rng.uniform(0, 0.3), 1.0 + rng.uniform(0, 0.3), size, dtype=np.float32)
    rgb = col[None, None, :] * yy[:, None, None] * np.ones((1, size, 1), np.float32)
    return _Sprite(x0, y0, rgb, m > 0, None)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Cluttered, textured background: gradient + low-frequency noise + stripes + blobs + line segments."""
    c0, c1 = _random_colour(rng, v=(0.2, 0.9)), _random_colour(rng, v=(0.2, 0.9))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    g = (xx * math.cos(ang) + yy * math.sin(ang))
    g = (g - g.min()) / max(float(g.max() - g.min()), 1.0)
    img = c0[None, None] * (1 - g[..., None]) + c1[None, None] * g[..., None]
    gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    low = rng.normal(0, rng.uniform(10, 30), (gh, gw, 3)).astype(np.float32)
    img += cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.6:
        period = rng.uniform(6, 40)
        ang = rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * (xx * math.cos(ang) + yy * math.sin(ang)) / period)
        if rng.random() < 0.5:
            wave = np.sign(wave)
        img += (rng.uniform(6, 22) * wave)[..., None] * rng.uniform(0.5, 1.0, 3).astype(np.float32)
    overlay = img.copy()
    for _ in range(int(rng.integers(3, 10))):
        centre = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
        axes = (float(rng.uniform(8, 0.4 * width)), float(rng.uniform(8, 0.4 * height)))
        cv2.ellipse(overlay, (centre, axes, float(rng.uniform(0, 180))), _random_colour(rng).tolist(), -1)
    alpha = rng.uniform(0.25, 0.6)
    img = img * (1 - alpha) + overlay * alpha
    for _ in range(int(rng.integers(2, 9))):
        p1 = _pts(np.array([rng.uniform(0, width), rng.uniform(0, height)])).ravel()
        p2 = _pts(np.array([rng.uniform(0, width), rng.uniform(0, height)])).ravel()
        cv2.line(img, tuple(p1), tuple(p2), _random_colour(rng).tolist(), int(rng.integers(1, 4)), cv2.LINE_AA,
                 _SHIFT)
    return img


# ----------------------------------------------------------------------------------------------------------------
# Scenes

@dataclass
class SynthObject:
    """One annotated object with the generator's drawing data (areas in pixels)."""
    cls: str
    x1: float
    y1: float
    x2: float
    y2: float
    difficult: bool
    truncated: bool
    area: int                  # object pixels drawn, inside and outside the image
    inside_area: int           # ... inside the image
    visible_area: int          # ... inside the image and not hidden
    part_area: int             # emblem pixels drawn, inside and outside the image
    part_visible_area: int     # ... inside the image and not hidden
    part_box: tuple[float, float, float, float] | None   # tight box of the visible emblem pixels

    @property
    def box_area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)


@dataclass
class Scene:
    image: np.ndarray                              # H x W x 3 uint8 RGB
    objects: list[SynthObject] = field(default_factory=list)
    distractors: int = 0

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]


def _tight_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if cols.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _layers_ok(masks: list[np.ndarray], areas: list[int], occluder: np.ndarray | None) -> bool:
    """Every object keeps >= _MIN_VISIBLE of its drawn area visible with ``masks`` painted in order."""
    covered = occluder.copy() if occluder is not None else np.zeros_like(masks[0])
    for m, area in zip(reversed(masks), reversed(areas)):
        vis = int(np.count_nonzero(m & ~covered))
        if vis < max(_MIN_VISIBLE * area, 6):
            return False
        covered |= m
    return True


def _paste_distractors(rng: np.random.Generator, img: np.ndarray, S: int) -> int:
    """Paste 1-3 distractors into ``img`` (background: they never hide objects' pixels from the annotation's point
    of view); how many."""
    height, width = img.shape[:2]
    n_distract = int(rng.integers(1, 4))
    for _ in range(n_distract):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        kind = rng.random()
        if kind < 0.45:        # a body without its emblem
            ln = S * math.exp(rng.uniform(*np.log(_SIZE_RANGE)))
            sp = _creature(rng, ln, max(1.05, math.exp(rng.normal(math.log(1.7), _ASPECT_SIGMA))), None, cx, cy,
                           rng.uniform(-np.pi, np.pi))
        elif kind < 0.75:      # an emblem without a body
            sp = _emblem_alone(rng, S * rng.uniform(0.02, 0.15), cx, cy)
        else:                  # a generic shape
            sp = _blob_shape(rng, S * rng.uniform(0.03, 0.2), cx, cy)
        sp.paste(img)
    return n_distract


class _Placed(NamedTuple):
    sprite: _Sprite
    mask: np.ndarray       # the sprite's pixels in the image
    area: int              # the sprite's whole drawn area (inside the image or not)
    class_index: int
    length: float
    centre: tuple[float, float]


def _place_objects(rng: np.random.Generator, S: int, width: int, height: int) -> list[_Placed]:
    """Sample the objects, then place each with retries so that the layout constraints hold (enough of it inside
    the image and visible; some near another object)."""
    n_obj = int(rng.choice(len(_N_OBJECTS_P), p=_N_OBJECTS_P)) + 1
    placed: list[_Placed] = []
    attempts = 12
    for _ in range(n_obj):
        ci = int(rng.integers(len(SYNTH_CLASSES)))
        length = S * math.exp(rng.uniform(*np.log(_SIZE_RANGE)))
        elong = max(1.05, math.exp(rng.normal(math.log(_CLASS_ELONGATION[ci]), _ASPECT_SIGMA)))
        theta = rng.uniform(-np.pi / 6, np.pi / 6) + (np.pi / 2 if rng.random() < 0.3 else 0.0)
        theta += np.pi if rng.random() < 0.5 else 0.0
        draw_seed = int(rng.integers(2**63))
        for attempt in range(attempts):
            if not placed and attempt == attempts - 1:
                cx, cy = width / 2, height / 2      # the image always gets at least one object
            elif placed and rng.random() < _P_NEAR:
                near = placed[int(rng.integers(len(placed)))]
                d = rng.uniform(0.25, 0.8) * (near.length + length) / 2
                phi = rng.uniform(0, 2 * np.pi)
                cx, cy = near.centre[0] + d * math.cos(phi), near.centre[1] + d * math.sin(phi)
            else:
                cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            sp = _creature(np.random.default_rng(draw_seed), length, elong, ci, cx, cy, theta)
            area = int(np.count_nonzero(sp.mask))
            m = sp.image_mask(width, height)
            if np.count_nonzero(m) < _MIN_INSIDE * area:
                continue
            if not _layers_ok([p.mask for p in placed] + [m], [p.area for p in placed] + [area], None):
                continue
            placed.append(_Placed(sp, m, area, ci, length, (cx, cy)))
            break
    if not placed:
        raise AssertionError("no object could be placed")  # unreachable: a centred object always fits
    return placed


def _occluder(rng: np.random.Generator, S: int, width: int, height: int, placed: list[_Placed]) -> np.ndarray | None:
    """An optional foreground bar (a branch, a pole) over everything, leaving every object visible enough."""
    if not (rng.random() < 0.2 and placed):
        return None
    for _attempt in range(4):
        bar = np.zeros((height, width), np.uint8)
        p1 = _pts(np.array([rng.uniform(0, width), -5.0])).ravel()
        p2 = _pts(np.array([rng.uniform(0, width), height + 5.0])).ravel()
        if rng.random() < 0.5:
            p1 = _pts(np.array([-5.0, rng.uniform(0, height)])).ravel()
            p2 = _pts(np.array([width + 5.0, rng.uniform(0, height)])).ravel()
        cv2.line(bar, tuple(p1), tuple(p2), 1, int(rng.uniform(0.015, 0.05) * S), cv2.LINE_8, _SHIFT)
        if _layers_ok([p.mask for p in placed], [p.area for p in placed], bar > 0):
            return bar > 0
    return None


def _annotate(placed: list[_Placed], occluder: np.ndarray | None, S: int, width: int,
              height: int) -> list[SynthObject]:
    """The objects' annotations from their visible masks (later objects and the occluder cover earlier ones)."""
    covered = occluder.copy() if occluder is not None else np.zeros((height, width), bool)
    objs: list[SynthObject] = []
    for sp, m, area, ci, _, _ in reversed(placed):
        vis = m & ~covered
        covered |= m
        pm = sp.image_mask(width, height, "part")
        pvis = pm & vis
        x1, y1, x2, y2 = _tight_box(vis)
        inside, nvis = int(np.count_nonzero(m)), int(np.count_nonzero(vis))
        p_full, p_vis = int(np.count_nonzero(sp.part)), int(np.count_nonzero(pvis))
        difficult = (max(x2 - x1, y2 - y1) < _DIFFICULT_SIDE * S / 320.0
                     or nvis < _DIFFICULT_VISIBLE * inside
                     or p_vis < _DIFFICULT_PART * p_full)
        at_border = x1 == 0 or y1 == 0 or x2 == width or y2 == height
        truncated = area - inside > _TRUNCATED_OUTSIDE * area and at_border
        objs.append(SynthObject(SYNTH_CLASSES[ci], x1, y1, x2, y2, bool(difficult), bool(truncated), area, inside,
                                nvis, p_full, p_vis, _tight_box(pvis)))
    objs.reverse()
    return objs


def render_scene(seed: int | Sequence[int] | np.random.SeedSequence, image_size: int = 320) -> Scene:
    """Draw one image with its objects; a pure function of ``seed`` and ``image_size``."""
    rng = np.random.default_rng(seed)
    S = int(image_size)
    if S < 64:
        raise ValueError(f"image_size {S} is too small (>= 64 px)")
    short = int(round(S * rng.uniform(0.7, 1.0)))
    width, height = (S, short) if rng.random() < 0.7 else (short, S)
    img = _background(rng, width, height)
    n_distract = _paste_distractors(rng, img, S)
    placed = _place_objects(rng, S, width, height)
    occluder = _occluder(rng, S, width, height, placed)
    for p in placed:
        p.sprite.paste(img)
    if occluder is not None:
        img[occluder] = _random_colour(rng, v=(0.1, 0.5)) * rng.uniform(0.9, 1.1, (int(occluder.sum()), 1))

    # camera: slight blur and sensor noise
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 0.9))
    img += rng.normal(0, rng.uniform(2, 6), img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return Scene(image, _annotate(placed, occluder, S, width, height), n_distract)


# ----------------------------------------------------------------------------------------------------------------
# Dataset

def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The random stream of image ``index`` of ``split`` ('trainval' or 'test')."""
    codes = {"trainval": 1, "test": 2}
    if split not in codes:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(codes)}")
    return np.random.SeedSequence([int(seed), codes[split], int(index)])


def _params(n_trainval: int, n_test: int, image_size: int, seed: int, click_sigma: float,
            annotators: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "n_trainval": int(n_trainval), "n_test": int(n_test),
            "image_size": int(image_size), "seed": int(seed), "click_sigma": float(click_sigma),
            "annotators": int(annotators), "classes": list(SYNTH_CLASSES), "jpeg_quality": JPEG_QUALITY}


def dataset_complete(out_dir: str | os.PathLike, n_trainval: int = 300, n_test: int = 200, image_size: int = 320,
                     seed: int = DEFAULT_SEED, click_sigma: float = 0.08, annotators: int = 2) -> bool:
    """True when ``out_dir`` holds a finished generation with exactly these parameters."""
    out_dir = Path(out_dir)
    info = out_dir / INFO_FILE
    if not (info.is_file() and (out_dir / "VOC2007").is_dir() and (out_dir / CLICKS_FILE).is_file()):
        return False
    try:
        stored = read_json(info)
    except ValueError:
        return False
    want = _params(n_trainval, n_test, image_size, seed, click_sigma, annotators)
    return {k: stored.get(k) for k in want} == want


def ensure_dataset(out_dir: str | os.PathLike, **params) -> Path:
    """Generate into ``out_dir`` unless a complete generation with the same parameters is already there."""
    if dataset_complete(out_dir, **params):
        return Path(out_dir) / "VOC2007"
    return generate_dataset(out_dir, **params)


def generate_dataset(out_dir: str | os.PathLike, n_trainval: int = 300, n_test: int = 200,
                     image_size: int = 320, seed: int = DEFAULT_SEED, click_sigma: float = 0.08,
                     annotators: int = 2) -> Path:
    """Write the synthetic dataset and its clicks under ``out_dir``; returns the VOC root ``out_dir/VOC2007``.

    Same arguments -> byte-identical files. Replaces a previous generation in ``out_dir``.
    """
    if n_trainval < 1 or n_test < 0:
        raise ValueError(f"need n_trainval >= 1 and n_test >= 0, got {n_trainval}, {n_test}")
    if annotators < 1:
        raise ValueError(f"annotators must be >= 1, got {annotators}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".synthetic.*.partial"):      # left by a killed generation
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".synthetic.", suffix=".partial", dir=out_dir))
    try:
        root = work / "VOC2007"
        jpeg_dir, ann_dir = root / "JPEGImages", root / "Annotations"
        jpeg_dir.mkdir(parents=True)
        ann_dir.mkdir()
        splits: dict[str, list[str]] = {"trainval": [], "test": []}
        obj_rows, part_rows = [], []
        number = 0
        for split, count in (("trainval", n_trainval), ("test", n_test)):
            for i in range(count):
                number += 1
                image_id = f"{number:06d}"
                scene = render_scene(image_seed(seed, split, i), image_size)
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_OPTIMIZE, 0,
                                        cv2.IMWRITE_JPEG_PROGRESSIVE, 0])
                if not ok:
                    raise RuntimeError(f"{jpeg_dir / image_id}.jpg: JPEG encoding failed")
                with atomic_path(jpeg_dir / f"{image_id}.jpg") as tmp:
                    tmp.write_bytes(buf.tobytes())
                write_annotation(ann_dir / f"{image_id}.xml", image_id, scene.width, scene.height,
                                 [VOCObject(o.cls, o.x1, o.y1, o.x2, o.y2, o.difficult, o.truncated)
                                  for o in scene.objects])
                splits[split].append(image_id)
                for j, o in enumerate(scene.objects):
                    obj_rows.append((image_id, j, o.cls, o.x1, o.y1, o.x2, o.y2, o.difficult, o.truncated))
                    pb = o.part_box or (np.nan,) * 4
                    part_rows.append((image_id, split, j, o.cls, o.x1, o.y1, o.x2, o.y2, o.difficult,
                                      o.truncated, o.area, o.inside_area, o.visible_area, o.part_area,
                                      o.part_visible_area, *pb))
        objects = pd.DataFrame(obj_rows, columns=OBJECT_COLUMNS)
        write_image_sets(root, splits, objects, SYNTH_CLASSES)
        parts = pd.DataFrame(part_rows, columns=[
            "image_id", "split", "object_index", "class", "x1", "y1", "x2", "y2", "difficult", "truncated",
            "area", "inside_area", "visible_area", "part_area", "part_visible_area",
            "part_x1", "part_y1", "part_x2", "part_y2"])
        write_csv(parts, work / PARTS_FILE, float_format="%.1f")
        trainval_objects = objects[objects.image_id.isin(set(splits["trainval"]))].reset_index(drop=True)
        clicks = simulate_clicks(trainval_objects, sigma=click_sigma, annotators=annotators, seed=seed)
        write_clicks(clicks, work / CLICKS_FILE)

        # publish: drop the old marker and dataset, move the clicks and parts, then VOC2007, then the marker
        (out_dir / INFO_FILE).unlink(missing_ok=True)
        if (out_dir / "VOC2007").exists():
            shutil.rmtree(out_dir / "VOC2007")
        os.replace(work / CLICKS_FILE, out_dir / CLICKS_FILE)
        os.replace(work / PARTS_FILE, out_dir / PARTS_FILE)
        os.replace(root, out_dir / "VOC2007")
        info = _params(n_trainval, n_test, image_size, seed, click_sigma, annotators)
        info.update(images=number, objects=len(objects), clicks=len(clicks))
        write_json(out_dir / INFO_FILE, info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("synthetic dataset: %d images, %d objects, %d clicks in %s (%.1f s)", number, len(objects),
             len(clicks), out_dir, time.perf_counter() - t0)
    return out_dir / "VOC2007"
