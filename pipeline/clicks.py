"""Click files: read/validate, write, and simulate from ground-truth boxes; :func:`other_clicks` (an image's
other clicks, used by stage 2's exclusion and stage 5's partition).

Format (docs/method.md): CSV with header ``image_id,class,x,y[,annotator][,object_index]``; one row per click;
x/y are 0-based pixel coordinates of the original image (``0 <= x < width``).
"""
from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .io import write_csv

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image_id", "class", "x", "y")
OPTIONAL_COLUMNS = ("annotator", "object_index")
CLICK_COLUMNS = list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
BAD_CLICK_POLICIES = ("error", "skip")


class ClickFileError(ValueError):
    """A click file is malformed or disagrees with the dataset; the message names file, line and problem."""


def read_clicks(path: str | os.PathLike, image_sizes: Mapping[str, tuple[int, int]], classes: Sequence[str],
                on_bad: str = "error") -> tuple[pd.DataFrame, dict]:
    """Read and validate a click file against a dataset.

    ``image_sizes`` maps image id -> (width, height). Problems (unknown image, unknown class, non-numeric or
    non-finite coordinates, click outside the image, wrong field count) raise :class:`ClickFileError`
    ``"<file>:<line>: <problem>"`` with ``on_bad="error"``; with ``on_bad="skip"`` the row is dropped and counted
    in the returned report. A bad header is always an error.

    Returns ``(clicks, report)``; ``clicks`` has :data:`CLICK_COLUMNS` (annotator defaults to 1, object_index to -1).
    """
    if on_bad not in BAD_CLICK_POLICIES:
        raise ValueError(f"on_bad must be one of {BAD_CLICK_POLICIES}, got {on_bad!r}")
    path = Path(path)
    if not path.is_file():
        raise ClickFileError(f"{path}: click file not found")
    class_set = set(classes)
    rows, skipped, examples = [], Counter(), []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ClickFileError(f"{path}:1: empty file, expected header {','.join(REQUIRED_COLUMNS)}[,annotator][,object_index]")
        header = [h.strip() for h in header]
        if tuple(header[:4]) != REQUIRED_COLUMNS or any(h not in OPTIONAL_COLUMNS for h in header[4:]) \
                or len(set(header)) != len(header):
            raise ClickFileError(
                f"{path}:1: bad header {','.join(header)!r}; expected image_id,class,x,y[,annotator][,object_index]")
        col = {h: i for i, h in enumerate(header)}
        for lineno, fields in enumerate(reader, start=2):
            if not fields or all(not s.strip() for s in fields):
                continue
            problem, row = _check_row(fields, col, image_sizes, class_set)
            if problem is None:
                rows.append(row)
                continue
            message = f"{path}:{lineno}: {problem}"
            if on_bad == "error":
                raise ClickFileError(message)
            skipped[problem.split(":")[0]] += 1
            if len(examples) < 20:
                examples.append(message)
    clicks = pd.DataFrame(rows, columns=CLICK_COLUMNS)
    clicks = clicks.astype({"x": float, "y": float, "annotator": int, "object_index": int})
    report = {"file": str(path), "rows": len(rows) + sum(skipped.values()), "kept": len(rows),
              "skipped": sum(skipped.values()), "skipped_by_reason": dict(skipped), "examples": examples}
    if skipped:
        log.warning("%s: skipped %d bad click rows (%s)", path, report["skipped"], dict(skipped))
    return clicks, report


def _check_row(fields, col, image_sizes, class_set):
    if len(fields) != len(col):
        return f"wrong number of fields: {len(fields)} instead of {len(col)}", None
    image_id = fields[col["image_id"]].strip()
    cls = fields[col["class"]].strip()
    if image_id not in image_sizes:
        return f"unknown image: {image_id!r} is not in the dataset", None
    if cls not in class_set:
        return f"unknown class: {cls!r} (image {image_id})", None
    try:
        x, y = float(fields[col["x"]]), float(fields[col["y"]])
    except ValueError:
        return f"non-numeric coordinates: x={fields[col['x']]!r} y={fields[col['y']]!r}", None
    if not (np.isfinite(x) and np.isfinite(y)):
        return f"non-numeric coordinates: x={x} y={y}", None
    w, h = image_sizes[image_id]
    if not (0 <= x < w and 0 <= y < h):
        return f"click outside the image: ({x:g}, {y:g}) not in the {w}x{h} image {image_id}", None
    annotator, object_index = 1, -1
    try:
        if "annotator" in col:
            annotator = int(fields[col["annotator"]])
        if "object_index" in col and fields[col["object_index"]].strip() != "":
            object_index = int(fields[col["object_index"]])
    except ValueError:
        return "non-numeric annotator/object_index", None
    return None, (image_id, cls, x, y, annotator, object_index)


def write_clicks(clicks: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write clicks in the CSV format of :func:`read_clicks` (atomically)."""
    cols = [c for c in CLICK_COLUMNS if c in clicks.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in clicks.columns]
    if missing:
        raise ValueError(f"clicks table lacks columns {missing}")
    return write_csv(clicks[cols], path, float_format="%.2f")


def simulate_clicks(objects: pd.DataFrame, sigma: float = 0.08, annotators: int = 1, seed: int = 0,
                    include_difficult: bool = True) -> pd.DataFrame:
    """Simulated center clicks: box center + per-axis Gaussian error with std ``sigma * box side``, clipped into
    the box (docs/method.md). ``objects`` has ``image_id, object_index, class, x1, y1, x2, y2[, difficult]``.

    Annotators draw independently; the result is deterministic given ``seed`` and sorted by
    (annotator, image_id, object_index).
    """
    objs = objects
    if not include_difficult and "difficult" in objs:
        objs = objs[~objs.difficult.astype(bool)]
    objs = objs.sort_values(["image_id", "object_index"]).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    x1, y1, x2, y2 = (objs[c].to_numpy(float) for c in ("x1", "y1", "x2", "y2"))
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    out = []
    for a in range(1, annotators + 1):
        ex, ey = rng.standard_normal((2, len(objs)))
        # clicks are pixel positions: keep them inside the box and strictly inside the image's last pixel
        x = np.clip(cx + sigma * w * ex, x1, np.maximum(x1, x2 - 0.01))
        y = np.clip(cy + sigma * h * ey, y1, np.maximum(y1, y2 - 0.01))
        out.append(pd.DataFrame({"image_id": objs.image_id, "class": objs["class"], "x": x, "y": y,
                                 "annotator": a, "object_index": objs.object_index.astype(int)}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=CLICK_COLUMNS)


def other_clicks(image_clicks: pd.DataFrame | None, click_id: int, cls: str, which: str = "same_class"
                 ) -> np.ndarray | None:
    """``(K, 2)`` x, y of the clicks of an image (``image_clicks``: ``click_id, class, x, y``) other than
    ``click_id``: those of class ``cls`` (``which="same_class"``), all (``"all"``), or None (``"none"``, or no
    table)."""
    if image_clicks is None or which == "none":
        return None
    keep = (image_clicks["click_id"] != click_id).to_numpy()
    if which == "same_class":
        keep = keep & (image_clicks["class"] == cls).to_numpy()
    return image_clicks.loc[keep, ["x", "y"]].to_numpy(np.float64)
