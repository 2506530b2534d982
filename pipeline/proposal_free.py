"""Pseudo boxes from whole-image CAMs read in one forward pass per image, without region proposals (seeds 003, 004).

- :func:`image_label_boxes`: the image-label-only method of seeds 003 / 004: for every labelled class of an image,
  the boxes of :func:`pipeline.extent.extent_boxes` on the class's map (peaks, mountains, back-projection,
  contours); no box -> the whole image, flagged as a fallback (as :func:`pipeline.boxes.box_from_image_cam`'s).
- :func:`click_maps` + :func:`pipeline.boxes.pseudo_boxes_and_candidates`: the proposal-free click mode (``--proposals
  none``): each click takes the whole-image map of its class, on the image (:func:`upsample_map`), and stage 5's own
  steps (the partition against the image's other clicks, the threshold, the region holding the click, the
  symmetric box); a click without a box falls back to the whole image (:func:`whole_image_fallbacks`), there being no
  proposal to fall back to.

The maps come from :func:`pipeline.pooling.whole_image_maps`: an image-level network with seed 003's CAM layer
(SPAM / GMP pooling), or a GAP classifier's linear head applied at every position of its last conv layer.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from .boxes import PSEUDO_COLUMNS, cam_threshold
from .cam_crops import MapGrid, paste_maps
from .extent import extent_boxes, grid
from .pooling import conv_layers, feature_body, whole_image_maps


def upsample_map(cam: np.ndarray, width: int, height: int, layers: Sequence[tuple[int, int, int]],
                 input_px: int) -> np.ndarray:
    """A feature-resolution map on the ``width x height`` image: each map value placed at its position's receptive
    field centre (:func:`pipeline.extent.grid`; the ``input_px`` square covers the whole image), bilinear between
    them, the edge values beyond: the CAM stage's own paste (:func:`pipeline.cam_crops.paste_maps` with a
    :class:`pipeline.cam_crops.MapGrid`) with the whole image as the one crop."""
    stride, c0 = grid(layers)
    return paste_maps(torch.as_tensor(np.asarray(cam, np.float32))[None], [[0, 0, width, height]], (height, width),
                      grid=MapGrid(int(input_px), float(stride), float(c0))).numpy()


class LowResMaps:
    """Each image's feature-resolution maps (``C x h x w``, all classes), kept after the one pass: small, so the
    image-sized map of a click is made when asked (:meth:`click_map`, also the report's ``load_map``)."""

    def __init__(self, clicks: pd.DataFrame, images: pd.DataFrame, classes: Sequence[str],
                 layers: Sequence[tuple[int, int, int]], input_px: int):
        self.layers, self.input_px = list(layers), int(input_px)
        self.maps: dict[str, np.ndarray] = {}
        self.scores: dict[str, np.ndarray] = {}
        self.cindex = {c: i for i, c in enumerate(classes)}
        self.sizes = {str(r.image_id): (int(r.width), int(r.height)) for r in images.itertuples(index=False)}
        self.clicks = clicks.assign(image_id=clicks["image_id"].astype(str)).set_index("click_id")

    def add(self, image_id: str, scores: np.ndarray, maps: np.ndarray) -> None:
        self.maps[image_id], self.scores[image_id] = maps, scores

    def click_map(self, click_id: int) -> np.ndarray | None:
        """The click's class map on the image, shifted to a minimum of 0: the 1x1 convolution's maps are signed
        scores, and a click says its class is present, so the map's relative height locates it even where the
        network's score stays negative (stage 5 calls a map without a positive value empty)."""
        r = self.clicks.loc[click_id]
        maps = self.maps.get(r.image_id)
        if maps is None:
            return None
        w, h = self.sizes[r.image_id]
        cam = maps[self.cindex[r["class"]]]
        return upsample_map(cam - cam.min(), w, h, self.layers, self.input_px)


def click_maps(net, images: pd.DataFrame, clicks: pd.DataFrame, classes: Sequence[str], *, input_px: int | None = None,
               device="cpu", progress: bool = True, store: LowResMaps | None = None
               ) -> Iterator[tuple[int, np.ndarray, dict]]:
    """``(click_id, image-sized map of the click's class, meta)`` for every click, image by image (the items
    :func:`pipeline.boxes.pseudo_boxes_and_candidates` takes), from one forward pass per image of ``images`` that
    has clicks (:func:`upsample_map`). ``store`` keeps the feature-resolution maps (:class:`LowResMaps`; made here
    when None)."""
    input_px = int(input_px or net.input_size)
    if store is None:
        store = LowResMaps(clicks, images, classes, conv_layers(feature_body(net)), input_px)
    by_image = {str(k): g for k, g in clicks.groupby(clicks["image_id"].astype(str), sort=False)}
    todo = images[images["image_id"].astype(str).isin(set(by_image))]
    for image_id, scores, maps in whole_image_maps(net, todo, input_px=input_px, device=device, progress=progress):
        store.add(image_id, scores, maps)
        for r in by_image[image_id].to_dict("records"):
            yield int(r["click_id"]), store.click_map(int(r["click_id"])), {
                "image_id": image_id, "class": r["class"], "x": float(r["x"]), "y": float(r["y"]), "kind": "click"}


def whole_image_fallbacks(clicks: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Each click's fallback box, the whole image: indexed by ``click_id``, ``x1..y2`` (the form of
    :func:`pipeline.boxes.rank1_proposals`)."""
    sizes = images.drop_duplicates("image_id").assign(image_id=lambda t: t["image_id"].astype(str))
    t = clicks[["click_id", "image_id"]].assign(image_id=clicks["image_id"].astype(str)).merge(sizes, on="image_id")
    return pd.DataFrame({"x1": 0.0, "y1": 0.0, "x2": t["width"].astype(float).to_numpy(),
                         "y2": t["height"].astype(float).to_numpy()}, index=pd.Index(t["click_id"], name="click_id"))


def image_label_boxes(net, images: pd.DataFrame, labels: pd.DataFrame, classes: Sequence[str], *,
                      threshold_rule: str = "paper", threshold_value: float | None = None,
                      ratio: float | None = 0.0, input_px: int | None = None, device="cpu",
                      progress: bool = True) -> pd.DataFrame:
    """Seed 003's boxes for every (image, labelled class) of ``labels`` (``image_id, class``), from one forward pass
    per image of ``images`` (``image_id, width, height, path``): :data:`pipeline.boxes.PSEUDO_COLUMNS` plus
    ``threshold``, ``click_id`` -1. The threshold on the 0..255 scale follows stage 5's rules
    (:func:`pipeline.boxes.cam_threshold`; the paper's counts the image's labelled classes); ``ratio``: Algorithm
    1's ``r`` (0: the whole receptive field; None: :func:`pipeline.extent.auto_ratio`)."""
    cindex = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels["class"]) - set(cindex))
    if unknown:
        raise ValueError(f"labels: classes {unknown} are not among the dataset's classes {tuple(classes)}")
    want = labels.assign(image_id=labels["image_id"].astype(str)).drop_duplicates()
    per_image = {k: sorted(set(g["class"]), key=cindex.get) for k, g in want.groupby("image_id")}
    todo = images[images["image_id"].astype(str).isin(set(per_image))].drop_duplicates("image_id")
    sizes = {str(r.image_id): (int(r.width), int(r.height)) for r in todo.itertuples(index=False)}
    px = int(input_px or net.input_size)
    layers = conv_layers(feature_body(net))
    rows = []
    for image_id, _, maps in whole_image_maps(net, todo, input_px=px, device=device, progress=progress):
        w, h = sizes[image_id]
        t = cam_threshold(threshold_rule, threshold_value, len(per_image[image_id]))
        for cls in per_image[image_id]:
            found = extent_boxes(maps[cindex[cls]], layers, (px, px), (w, h), t, ratio)
            rows += [(image_id, cls, *b.box, b.score, -1, False, "ok", t) for b in found]
            if not found:
                rows.append((image_id, cls, 0.0, 0.0, float(w), float(h), 0.0, -1, True, "empty", t))
    df = pd.DataFrame(rows, columns=PSEUDO_COLUMNS + ["threshold"])
    df["fallback"] = df["fallback"].astype(bool)
    return df
