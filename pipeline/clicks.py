"""Click files: read/validate (CSV, COCO, CVAT, Label Studio; :mod:`pipeline.pointformats`), write, and
simulate from ground-truth boxes; :func:`other_clicks` (an image's other clicks, used by stage 2's exclusion and
stage 5's partition).

The pipeline's own format (docs/method.md): CSV with header ``image_id,class,x,y[,annotator][,object_index]``;
one row per click; x/y are 0-based pixel coordinates of the original image (``0 <= x < width``).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .io import write_csv
from .pointformats import AmbiguousImageRef, ClickFileError, read_points, resolve_image_refs

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image_id", "class", "x", "y")
OPTIONAL_COLUMNS = ("annotator", "object_index")
CLICK_COLUMNS = list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
BAD_CLICK_POLICIES = ("error", "skip")


def read_clicks(path: str | os.PathLike, image_sizes: Mapping[str, tuple[int, int]],
                classes: Sequence[str] | None, on_bad: str = "error", fmt: str = "auto",
                split_of: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Read a click file of any :data:`pipeline.pointformats.POINT_FORMATS` (``fmt="auto"`` detects it) and
    validate it against a dataset.

    ``image_sizes`` maps image id -> (width, height) of the images clicks may be on; the file's image names are
    matched to these ids by :func:`pipeline.pointformats.resolve_image_refs`. ``classes=None`` leaves classes
    unchecked. ``split_of`` (optional) maps the dataset's other image ids to their split, so a click on one of
    them is reported as such rather than as an unknown image.

    Problems of a click (unknown image, image in another split, image size in the file differing from the
    dataset's, unknown class, non-numeric or non-finite coordinates, click outside the image, wrong field count)
    raise :class:`ClickFileError` ``"<file>:<where>: <problem>"`` (CSV: ``"<file>:<line>: <problem>"``) with
    ``on_bad="error"``; with ``on_bad="skip"`` the click is dropped and counted in the returned report. A
    malformed file (bad header, broken JSON/XML) or an image name matching several images is always an error.

    Returns ``(clicks, report)``; ``clicks`` has :data:`CLICK_COLUMNS` (``image_id`` the dataset id; annotator
    defaults to 1, object_index to -1). ``report`` has ``file, format, rows, kept, skipped, skipped_by_reason,
    examples`` and ``ignored`` (annotations that are not clicks, by reason) and ``multi_point_shapes``.
    """
    if on_bad not in BAD_CLICK_POLICIES:
        raise ValueError(f"on_bad must be one of {BAD_CLICK_POLICIES}, got {on_bad!r}")
    path = Path(path)
    points = read_points(path, fmt)
    split_of = dict(split_of or {})
    refs = list(dict.fromkeys(r for r in points.image_ref if r is not None))
    try:
        resolved = resolve_image_refs(refs, set(image_sizes) | set(split_of))
    except AmbiguousImageRef as e:
        where = points.loc[points.image_ref == e.ref, "where"].iloc[0]
        raise ClickFileError(f"{path}:{_location(where)}: {e}") from e
    class_set = None if classes is None else set(classes)
    rows, skipped, examples = [], Counter(), []
    for p in points.itertuples(index=False):
        image_id = resolved.get(p.image_ref)
        reason, problem, row = _check_click(p, image_id, image_sizes, split_of, class_set)
        if reason is None:
            rows.append(row)
            continue
        message = f"{path}:{_location(p.where)}: {problem}"
        if on_bad == "error":
            raise ClickFileError(message)
        skipped[reason] += 1
        if len(examples) < 20:
            examples.append(message)
    clicks = pd.DataFrame(rows, columns=CLICK_COLUMNS)
    clicks = clicks.astype({"image_id": str, "x": float, "y": float, "annotator": int, "object_index": int})
    report = {"file": str(path), "format": points.attrs["format"], "rows": len(rows) + sum(skipped.values()),
              "kept": len(rows), "skipped": sum(skipped.values()), "skipped_by_reason": dict(skipped),
              "examples": examples, "ignored": points.attrs["ignored"],
              "multi_point_shapes": points.attrs["multi_point_shapes"]}
    if skipped:
        log.warning("%s: skipped %d bad click rows (%s)", path, report["skipped"], dict(skipped))
    if report["ignored"]:
        log.info("%s: ignored annotations that are not clicks: %s", path, report["ignored"])
    return clicks, report


def _location(where: str) -> str:
    """``line 5`` -> ``5`` (CSV messages read ``file:5: ...``); other locations as they are."""
    return where[5:] if where.startswith("line ") else where


def _check_click(p, image_id, image_sizes, split_of, class_set):
    """``(reason, problem, None)`` for a bad click (``reason`` counts it under ``on_bad="skip"``), else
    ``(None, None, row)`` with ``row`` in :data:`CLICK_COLUMNS` order."""
    if p.problem is not None:
        return p.problem.split(":")[0], p.problem, None
    if image_id is None:
        return "unknown image", f"unknown image: {p.image_ref!r} is not in the dataset", None
    if image_id not in image_sizes:
        split = split_of.get(image_id, "another")
        return ("image in another split", f"image {image_id!r} is in the {split} split; clicks are read for "
                f"trainval images only", None)
    w, h = image_sizes[image_id]
    if not (np.isnan(p.width) or np.isnan(p.height)) and (p.width, p.height) != (w, h):
        return ("image size mismatch", f"image size mismatch: the file says {p.width:g}x{p.height:g} for "
                f"{p.image_ref!r}, the dataset's image {image_id} is {w}x{h}", None)
    cls = p[1]  # "class" is a keyword: not an attribute name
    if class_set is not None and cls not in class_set:
        return "unknown class", f"unknown class: {cls!r} (image {image_id})", None
    try:
        x, y = float(p.x), float(p.y)
    except (TypeError, ValueError):
        return "non-numeric coordinates", f"non-numeric coordinates: x={p.x!r} y={p.y!r}", None
    if not (np.isfinite(x) and np.isfinite(y)):
        return "non-numeric coordinates", f"non-numeric coordinates: x={x} y={y}", None
    if not (0 <= x < w and 0 <= y < h):
        return ("click outside the image",
                f"click outside the image: ({x:g}, {y:g}) not in the {w}x{h} image {image_id}", None)
    return None, None, (image_id, cls, x, y, int(p.annotator), int(p.object_index))


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
