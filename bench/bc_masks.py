"""What seed 002's BC masks look like against the objects they should enlarge (issue #27): per click, the mask
component that ``--box-bc-mask on`` spreads the CAM over (:func:`pipeline.bcct.bc_mask` of the click's BC map, in its
Voronoi cell, exactly as stage 5 does), its size against the clicked object's ground-truth box, how much of it lies
inside the default pseudo box already, and a contact sheet of a seeded sample of large-object clicks.

Called by ``bench/quality.py --bcct-only --bc-mask-sheet N`` (the stages are those of its BC-CT rows), which writes
``bc_masks.csv`` (one row per click), ``bc_masks_summary.csv`` (medians by object size) and ``bc_masks.png`` to its
``--out`` folder. Sheet: the image with the ground-truth box (blue), the default pseudo box (red, wide: it shows as
a red rim where the masked box is the same), the box with the mask (yellow), the mask component (green, filled) and
the click (white); under each, the two boxes' IoU with the clicked object and the mask's area in % of its box.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.bcct import bc_mask, grid_png
from pipeline.boxes import click_cell
from pipeline.cam_store import CamStore
from pipeline.clicks import other_clicks
from pipeline.export import read_pseudo_labels, with_object_index
from pipeline.imageio import read_image
from pipeline.metrics import IOU_THRESHOLD, SIZE_BINS, SIZE_NAMES, clicked_iou, object_sizes
from pipeline.relocalize import paired_iou

BOX = ["x1", "y1", "x2", "y2"]
COLOURS = {"gt": (40, 90, 255), "default": (230, 30, 30), "masked": (250, 210, 0), "mask": (0, 200, 60)}


def mask_geometry(mask: np.ndarray, gt: np.ndarray, box: np.ndarray) -> dict:
    """For a boolean ``HxW`` mask: its pixels, its area over the ground-truth box's, the share of it inside the
    ground-truth box and inside the pseudo ``box`` (x1, y1, x2, y2), and its bounding box."""
    px = int(mask.sum())
    if not px:
        return {"mask_px": 0, "mask_over_gt": 0.0, "mask_in_gt": np.nan, "mask_in_box": np.nan,
                "mask_box": [np.nan] * 4}
    ys, xs = np.nonzero(mask)
    cx, cy = xs + 0.5, ys + 0.5

    def inside(b):
        return float(((cx >= b[0]) & (cx <= b[2]) & (cy >= b[1]) & (cy <= b[3])).mean())

    gt_area = max(float((gt[2] - gt[0]) * (gt[3] - gt[1])), 1e-12)
    return {"mask_px": px, "mask_over_gt": px / gt_area, "mask_in_gt": inside(gt), "mask_in_box": inside(box),
            "mask_box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]}


def click_mask(store: CamStore, click, by_image: dict, partition: str, delta: float, sigma: float) -> np.ndarray:
    """The BC mask stage 5 spreads the CAM over for ``click`` (a row with ``click_id, image_id, class, x, y``): the
    component of its BC map holding the click, inside its Voronoi cell (pipeline.bcct.with_bc_masks)."""
    gmap = store.load(int(click.click_id))[0]
    others = other_clicks(by_image.get(str(click.image_id)), int(click.click_id), click["class"], partition)
    return bc_mask(gmap, delta, sigma, point=(float(click.x), float(click.y)),
                   region=click_cell(gmap.shape, float(click.x), float(click.y), others))


def click_table(default_dir: Path, masked_dir: Path, bc_dir: Path, manifest, partition: str, delta: float,
                sigma: float) -> pd.DataFrame:
    """One row per click with a BC map: the clicked object's size, the default and masked boxes' IoU with it and
    :func:`mask_geometry` of the mask stage 5 used (:func:`click_mask`)."""
    clicks = manifest.clicks
    trainval = manifest.split("trainval")
    sizes = {r.image_id: (int(r.width), int(r.height)) for r in trainval.itertuples(index=False)}
    objects = manifest.objects[manifest.objects.image_id.isin(set(trainval.image_id))].assign(
        image_id=lambda o: o.image_id.astype(str))
    objects = objects.assign(size=object_sizes(objects, sizes).to_numpy())
    default, masked = (with_object_index(read_pseudo_labels(d / "pseudo_labels.csv"), clicks)
                       for d in (default_dir, masked_dir))
    default = default.assign(iou_default=clicked_iou(default, objects).to_numpy())
    masked = masked.assign(iou_masked=clicked_iou(masked, objects).to_numpy())
    t = default.merge(masked[["click_id", "iou_masked", *BOX]].rename(columns={k: f"masked_{k}" for k in BOX}),
                      on="click_id").rename(columns={k: f"default_{k}" for k in BOX})
    t = t[t.object_index.notna()].astype({"object_index": int})
    t = t.merge(objects[["image_id", "object_index", "size", *BOX]].rename(columns={k: f"gt_{k}" for k in BOX}),
                on=["image_id", "object_index"])
    t = t.merge(clicks[["click_id", "x", "y"]], on="click_id")
    by_image = {str(k): g for k, g in clicks.groupby(clicks.image_id.astype(str), sort=False)}
    geos = []
    with CamStore(bc_dir) as store:
        t = t[[cid in store for cid in t.click_id]].reset_index(drop=True)
        for _, r in t.iterrows():
            gt = r[[f"gt_{k}" for k in BOX]].to_numpy(float)
            geo = mask_geometry(click_mask(store, r, by_image, partition, delta, sigma), gt,
                                r[[f"default_{k}" for k in BOX]].to_numpy(float))
            geo["mask_box_iou_gt"] = float(paired_iou(np.asarray(geo.pop("mask_box"))[None], gt[None])[0]) \
                if geo["mask_px"] else 0.0
            geos.append(geo)
    t = pd.concat([t, pd.DataFrame(geos, index=t.index)], axis=1)
    if len(t):
        t["size_bin"] = pd.cut(t["size"], [0.0, *SIZE_BINS, np.inf], right=False, labels=list(SIZE_NAMES))
    return t


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """By object size (and over all clicks), in %: the median and 90th percentile of mask area / GT box area, the
    share of masks wholly inside the default box, the median IoU of the mask's bounding box with the GT; the % of
    default and masked boxes correct (IoU >= 0.5 with the clicked object) and the boxes the mask changed."""
    def row(name, t):
        return {"size": name, "clicks": len(t), "median mask px": float(t.mask_px.median()),
                "median mask / GT box area %": 100 * float(t.mask_over_gt.median()),
                "p90 mask / GT box area %": 100 * float(t.mask_over_gt.quantile(0.9)),
                "masks wholly in default box %": 100 * float((t.mask_in_box >= 1.0).mean()),
                "median IoU(mask bbox, GT) %": 100 * float(t.mask_box_iou_gt.median()),
                "default boxes correct %": 100 * float((t.iou_default >= IOU_THRESHOLD).mean()),
                "masked boxes correct %": 100 * float((t.iou_masked >= IOU_THRESHOLD).mean()),
                "boxes changed": int((t[[f"default_{k}" for k in BOX]].to_numpy()
                                      != t[[f"masked_{k}" for k in BOX]].to_numpy()).any(1).sum())}
    rows = [row(str(name), g) for name, g in table.groupby("size_bin", observed=True)]
    return pd.DataFrame(rows + [row("all", table)])


def sheet(table: pd.DataFrame, bc_dir: Path, manifest, path: Path, delta: float, sigma: float, partition: str,
          n: int = 24, seed: int = 0, tile: int = 240, columns: int = 6) -> Path | None:
    """The contact sheet of a seeded sample of ``n`` rows of ``table`` (module docstring for the colours)."""
    if not len(table) or n <= 0:
        return None
    take = table.iloc[np.sort(np.random.default_rng([seed, 27]).choice(len(table), min(n, len(table)),
                                                                       replace=False))]
    paths = dict(zip(manifest.images.image_id.astype(str), manifest.images.path))
    clicks = manifest.clicks
    by_image = {str(k): g for k, g in clicks.groupby(clicks.image_id.astype(str), sort=False)}
    tiles = []
    with CamStore(bc_dir) as store:
        for _, r in take.iterrows():
            img = read_image(paths[r.image_id]).copy()
            mask = click_mask(store, r, by_image, partition, delta, sigma)
            img[mask] = (0.45 * img[mask] + 0.55 * np.array(COLOURS["mask"])).astype(np.uint8)
            for key in ("gt", "default", "masked"):
                x1, y1, x2, y2 = (int(round(r[f"{key}_{k}"])) for k in BOX)
                cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), COLOURS[key], {"gt": 3, "default": 5, "masked": 2}[key])
            cv2.circle(img, (int(r.x), int(r.y)), 6, (255, 255, 255), -1)
            cv2.circle(img, (int(r.x), int(r.y)), 6, (0, 0, 0), 1)
            h, w = img.shape[:2]
            s = tile / max(h, w)
            small = cv2.resize(img, (max(1, int(w * s)), max(1, int(h * s))), interpolation=cv2.INTER_AREA)
            canvas = np.full((tile + 16, tile, 3), 255, np.uint8)
            canvas[:small.shape[0], :small.shape[1]] = small
            label = f"{r['class']} IoU {r.iou_default:.2f}->{r.iou_masked:.2f} mask {100 * r.mask_over_gt:.1f}% of GT"
            cv2.putText(canvas, label,
                        (2, tile + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 1, cv2.LINE_AA)
            tiles.append(canvas)
    return grid_png(tiles, path, columns, pad=4)
