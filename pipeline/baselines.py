"""Click-only baselines ("floors") the CAM pipeline must beat (bench/selection_floor.py, bench/quality.py)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd


def median_size_boxes(clicks: pd.DataFrame, objects: pd.DataFrame,
                      sizes: Mapping[str, tuple[int, int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(boxes, medians): per click, a box centred on the click with its class's median ground-truth width and
    height (medians over ``objects``), clipped into the image. ``sizes`` maps image id -> (width, height)."""
    wh = objects.assign(w=objects.x2 - objects.x1, h=objects.y2 - objects.y1)
    medians = wh.groupby("class")[["w", "h"]].median()
    m = medians.reindex(clicks["class"]).to_numpy()
    W = clicks.image_id.map(lambda i: sizes[i][0]).to_numpy(float)
    H = clicks.image_id.map(lambda i: sizes[i][1]).to_numpy(float)
    x, y = clicks.x.to_numpy(float), clicks.y.to_numpy(float)
    boxes = clicks[["click_id", "image_id", "class"]].copy()
    boxes["x1"] = np.clip(x - m[:, 0] / 2, 0, W)
    boxes["y1"] = np.clip(y - m[:, 1] / 2, 0, H)
    boxes["x2"] = np.clip(x + m[:, 0] / 2, 0, W)
    boxes["y2"] = np.clip(y + m[:, 1] / 2, 0, H)
    boxes["score"] = 1.0
    return boxes.reset_index(drop=True), medians
