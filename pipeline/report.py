"""An HTML report to judge pseudo boxes by eye: ``report/index.html`` plus PNGs (matplotlib, Agg).

* ``per_class.png``: per-class bars of CorLoc, box accuracy (box-CorLoc) and mean IoU (when ground truth exists);
* ``grid.png``: a seeded sample of clicks (at least one per class when possible): the image, the fused CAM as a
  heat map, the click (white cross), the pseudo box (green when IoU >= 0.5, red otherwise, dashed when it is a
  fallback proposal) and the ground-truth boxes of the class (cyan; the clicked object thicker);
* ``worst_<class>.png``: per class the boxes with the lowest IoU to a ground truth of their class;
* the summary metrics, fallback counts, per-class table and the stage parameters.

Only sampled images are read and drawn (downscaled to ``display_side`` px), so a report takes seconds.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .imageio import ImageReadError, read_image
from .io import atomic_path, write_text
from .metrics import IOU_THRESHOLD, clicked_iou, match_boxes

log = logging.getLogger(__name__)

_JET = colormaps["jet"]
MapLoader = Callable[[int], "np.ndarray | None"]


def _save(fig: Figure, path: Path, dpi: int = 80) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def _downscale(arr: np.ndarray, side: int) -> np.ndarray:
    import cv2

    h, w = arr.shape[:2]
    s = side / max(h, w)
    if s >= 1:
        return arr
    return cv2.resize(arr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def plot_per_class(per_class: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Grouped bars (percent) of ``corloc``, ``box_accuracy`` and ``mean_iou`` per class."""
    cols = [c for c in ("corloc", "box_accuracy", "mean_iou") if c in per_class.columns]
    pc = per_class.set_index("class")[cols].astype(float) * 100
    n = len(pc)
    fig = Figure(figsize=(max(6.0, 0.55 * n + 2), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(cols))
    x = np.arange(n)
    colors = {"corloc": "#1f77b4", "box_accuracy": "#2ca02c", "mean_iou": "#ff7f0e"}
    for k, c in enumerate(cols):
        vals = pc[c].to_numpy()
        mean = np.nanmean(vals) if np.isfinite(vals).any() else float("nan")
        ax.bar(x + (k - (len(cols) - 1) / 2) * width, np.nan_to_num(vals), width, color=colors[c],
               label=f"{c} (mean {mean:.1f})")
    ax.set_xticks(x)
    ax.set_xticklabels(pc.index, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.axhline(50, color="grey", lw=0.5, ls=":")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("pseudo boxes per class")
    fig.tight_layout()
    return _save(fig, Path(path), dpi=90)


def class_counts(boxes: pd.DataFrame) -> pd.DataFrame:
    """Per class: boxes, images, fallbacks and the mean score (no ground truth needed)."""
    b = boxes.assign(fallback=boxes["fallback"].astype(bool) if "fallback" in boxes.columns else False)
    g = b.groupby("class", sort=True)
    return pd.DataFrame({"boxes": g.size(), "images": g["image_id"].nunique(), "fallbacks": g["fallback"].sum(),
                         "mean_score": g["score"].mean().round(3)}).reset_index()


def plot_box_histograms(boxes: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Histograms of the pseudo boxes' size (the square root of box area / image area: a box's side relative to
    the image's) and of their scores. ``boxes`` needs ``x1..y2, width, height, score``."""
    side = np.sqrt((boxes.x2 - boxes.x1) * (boxes.y2 - boxes.y1) / (boxes.width * boxes.height)).to_numpy(float)
    fig = Figure(figsize=(8.0, 3.0))
    for k, (vals, label) in enumerate(((side, "box size: sqrt(box area / image area)"),
                                       (boxes["score"].to_numpy(float), "score"))):
        ax = fig.add_subplot(1, 2, k + 1)
        vals = vals[np.isfinite(vals)]
        ax.hist(vals, bins=20, range=(0.0, max(1.0, float(vals.max())) if len(vals) else 1.0), color="#1f77b4")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("boxes", fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path), dpi=90)


def _overlay(img: np.ndarray, cam: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """The image with the min-max normalised map blended over it as a jet heat map (same size as ``img``)."""
    if cam is None or not np.isfinite(cam).all() or not cam.max() > cam.min():
        return img
    import cv2

    c = (cam - cam.min()) / (cam.max() - cam.min())
    c = cv2.resize(c.astype(np.float32), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_AREA)
    heat = _JET(np.clip(c, 0, 1))[..., :3] * 255.0
    return (img * (1 - alpha) + heat * alpha).astype(np.uint8)


def _panel(ax, row: Mapping, image_path: str | None, cam: np.ndarray | None, gt: pd.DataFrame | None,
           display_side: int) -> None:
    """Draw one pseudo box panel on ``ax`` (coordinates in original image pixels)."""
    w, h = float(row["width"]), float(row["height"])
    img = None
    if image_path:
        try:
            img = _downscale(read_image(image_path), display_side)
        except ImageReadError as e:
            log.warning("report: %s", e)
    if img is None:
        img = np.full((max(2, round(display_side * h / max(w, h))), max(2, round(display_side * w / max(w, h))), 3),
                      200, np.uint8)
    ax.imshow(_overlay(img, cam), extent=(0, w, h, 0), interpolation="nearest")
    if gt is not None:
        for g in gt.itertuples(index=False):
            oi = row.get("object_index", -1)
            clicked = pd.notna(oi) and int(oi) >= 0 and int(oi) == int(g.object_index)
            ax.add_patch(Rectangle((g.x1, g.y1), g.x2 - g.x1, g.y2 - g.y1, fill=False, ec="cyan",
                                   lw=2.5 if clicked else 1.2))
    iou = row.get("iou", float("nan"))
    ok = bool(iou >= IOU_THRESHOLD) if np.isfinite(iou) else None
    color = "yellow" if ok is None else ("lime" if ok else "red")
    ax.add_patch(Rectangle((row["x1"], row["y1"]), row["x2"] - row["x1"], row["y2"] - row["y1"], fill=False,
                           ec=color, lw=2.0, ls="--" if row.get("fallback", False) else "-"))
    if np.isfinite(row.get("x", float("nan"))):
        ax.plot([row["x"]], [row["y"]], marker="x", color="white", ms=9, mew=2.5)
        ax.plot([row["x"]], [row["y"]], marker="x", color="black", ms=6, mew=1.2)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    title = f"{row['class']} {row['image_id']}"
    if np.isfinite(iou):
        title += f"\nIoU {iou:.2f}"
    title += f" s {row.get('score', float('nan')):.2f}"
    if row.get("fallback", False):
        title += f" FB:{row.get('status', '')}"
    ax.set_title(title, fontsize=7)


def plot_panels(rows: pd.DataFrame, path: str | os.PathLike, image_paths: Mapping[str, str],
                objects: pd.DataFrame | None = None, load_map: MapLoader | None = None, ncols: int = 6,
                display_side: int = 240, panel_inches: float = 2.4) -> Path:
    """A grid of panels, one per row of ``rows`` (boxes with ``width, height`` and optionally ``iou, x, y``)."""
    n = max(1, len(rows))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel_inches * ncols, panel_inches * nrows * 0.95))
    gt_groups = None
    if objects is not None and len(objects):
        o = objects.assign(image_id=objects["image_id"].astype(str))
        o = o[o["image_id"].isin(set(rows["image_id"].astype(str)))]
        gt_groups = {k: g for k, g in o.groupby(["image_id", "class"])}
    for k, (_, row) in enumerate(rows.iterrows()):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        cam = None
        if load_map is not None and int(row.get("click_id", -1)) >= 0:
            cam = load_map(int(row["click_id"]))
        gt = gt_groups.get((str(row["image_id"]), row["class"])) if gt_groups is not None else None
        _panel(ax, row, image_paths.get(str(row["image_id"])), cam, gt, display_side)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=1 - 0.42 / (panel_inches * nrows * 0.95),
                        wspace=0.04, hspace=0.3 * 2.4 / panel_inches)
    return _save(fig, Path(path))


def sample_rows(boxes: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` rows, seeded: first one per class (classes in sorted order), then uniformly from the rest."""
    if len(boxes) <= n:
        return boxes
    rng = np.random.default_rng(seed)
    perm = boxes.iloc[rng.permutation(len(boxes))]
    first = perm.drop_duplicates("class").sort_values("class", kind="mergesort").iloc[:n]
    rest = perm.drop(index=first.index).iloc[:n - len(first)]
    return pd.concat([first, rest])


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(d: Mapping) -> str:
    def cell(v) -> str:
        return html.escape(json.dumps(v, default=str)) if isinstance(v, (dict, list)) else _fmt(v)

    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{cell(v)}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def write_report(out_dir: str | os.PathLike, boxes: pd.DataFrame, images: pd.DataFrame,
                 objects: pd.DataFrame | None = None, clicks: pd.DataFrame | None = None,
                 summary: Mapping | None = None, per_class: pd.DataFrame | None = None,
                 params: Mapping | None = None, load_map: MapLoader | None = None, n_grid: int = 24,
                 n_worst: int = 3, seed: int = 0, title: str = "clickscale pseudo boxes",
                 display_side: int = 240) -> Path:
    """Write ``out_dir/index.html`` and its PNGs; returns the HTML path.

    ``boxes``: the pseudo label table (``image_id, class, x1..y2, score, click_id, fallback, status``);
    ``images``: ``image_id, width, height, path``; ``objects`` (ground truth, optional) enables IoU colours,
    ground-truth boxes and the worst-failure pages; ``clicks`` (``click_id, x, y[, object_index]``) adds the click
    marks; ``load_map(click_id)`` returns a click's fused map (or None) for the heat maps.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    imgs = images.drop_duplicates("image_id").assign(image_id=lambda d: d["image_id"].astype(str))
    b = boxes.assign(image_id=boxes["image_id"].astype(str)).reset_index(drop=True)
    b = b.merge(imgs[["image_id", "width", "height"]], on="image_id", how="left")
    if clicks is not None and "click_id" in b.columns:
        cols = ["click_id"] + [c for c in ("x", "y", "object_index") if c in clicks.columns and c not in b.columns]
        b = b.merge(clicks[cols], on="click_id", how="left")
    have_gt = objects is not None and len(objects) > 0
    if have_gt:
        b["iou"] = match_boxes(b, objects)["iou"].to_numpy()
        if "object_index" in b.columns:
            b["clicked_iou"] = clicked_iou(b, objects).to_numpy()
    paths = dict(zip(imgs["image_id"], imgs["path"])) if "path" in imgs.columns else {}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts.append(
        "<p>Legend: image with the fused CAM as a heat map (blue low, red high); white cross: the click; "
        "pseudo box green when IoU &ge; 0.5 with a ground truth of its class, red otherwise, yellow without "
        "ground truth, dashed when it is a fallback proposal (FB: why); cyan: ground-truth boxes of the class "
        "(thick: the clicked object). Titles: class, image, IoU, score.</p>")
    if summary:
        pct = {k: (f"{100 * v:.1f}" if isinstance(v, float) and k in ("box_accuracy", "box_accuracy_all", "corloc",
                                                                        "mean_iou", "mean_iou_all", "clicked_iou",
                                                                        "fallback_rate") else v)
               for k, v in summary.items()}
        parts.append("<h2>Summary (percent)</h2>" + _table(pct))
    if per_class is not None and len(per_class):
        plot_per_class(per_class, out_dir / "per_class.png")
        pc = per_class.copy()
        for c in ("box_accuracy", "corloc", "mean_iou", "clicked_iou"):
            if c in pc.columns:
                pc[c] = (pc[c] * 100).round(1)
        parts.append('<h2>Per class</h2><img src="per_class.png" alt="per-class bars">')
        parts.append(pc.to_html(index=False, na_rep="-", border=0))
    if len(b):
        plot_box_histograms(b, out_dir / "histograms.png")
        parts.append("<h2>Boxes per class</h2>" + class_counts(b).to_html(index=False, border=0))
        parts.append('<h2>Box sizes and scores</h2><img src="histograms.png" alt="box size and score histograms">')
        grid = sample_rows(b, n_grid, seed)
        plot_panels(grid, out_dir / "grid.png", paths, objects, load_map, display_side=display_side)
        parts.append(f'<h2>Sample of {len(grid)} of {len(b)} pseudo boxes (seed {seed})</h2>'
                     '<img src="grid.png" alt="sample grid">')
    if have_gt and n_worst > 0 and len(b):
        parts.append(f"<h2>Worst {n_worst} per class (lowest IoU)</h2>")
        worst = b.sort_values(["class", "iou"], kind="mergesort").groupby("class", sort=True).head(n_worst)
        for cls, g in worst.groupby("class", sort=True):
            name = f"worst_{''.join(ch if ch.isalnum() else '_' for ch in str(cls))}.png"
            plot_panels(g, out_dir / name, paths, objects, load_map, ncols=n_worst, display_side=display_side)
            parts.append(f'<h3>{html.escape(str(cls))}</h3><img src="{name}" alt="worst {html.escape(str(cls))}">')
    if params:
        parts.append("<h2>Parameters</h2>" + _table(params))
    style = ("<style>body{font-family:sans-serif;margin:1em 2em}table{border-collapse:collapse;margin:0.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right;font-size:90%}"
             "img{max-width:100%}</style>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{style}</head>"
            f"<body>{''.join(parts)}</body></html>\n")
    return write_text(out_dir / "index.html", page)


def _safe_name(image_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(image_id))


def plot_detections(image_path: str, dets: pd.DataFrame, path: str | os.PathLike, display_side: int = 640,
                    inches: float = 6.4) -> Path:
    """One image (stored pixel frame, :func:`read_image`) with its detections drawn: box, class and score."""
    img = read_image(image_path)
    h, w = img.shape[:2]
    fig = Figure(figsize=(inches, inches * h / w))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(_downscale(img, display_side), extent=(0, w, h, 0), interpolation="nearest")
    colors = colormaps["tab20"]
    for d in dets.itertuples(index=False):
        color = colors(zlib.crc32(str(d[1]).encode()) % 20)  # a class's colour, the same every run
        ax.add_patch(Rectangle((d.x1, d.y1), d.x2 - d.x1, d.y2 - d.y1, fill=False, ec=color, lw=2.0))
        ax.text(d.x1, d.y1, f"{d[1]} {d.score:.2f}", fontsize=8, color="black", va="bottom",
                bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    return _save(fig, Path(path), dpi=100)


def write_detection_page(out_dir: str | os.PathLike, dets: pd.DataFrame, images: pd.DataFrame,
                         show_score: float = 0.5, max_images: int = 100, title: str = "clickscale detections",
                         summary: Mapping | None = None) -> Path:
    """``out_dir/index.html``: per image (``images``: ``image_id, path``, in order) its name, detection counts and,
    for the first ``max_images``, an overlay PNG (``overlays/``) of its detections scoring ``>= show_score``;
    ``summary`` (speed, counts, model) as a table on top. Returns the HTML path."""
    out_dir = Path(out_dir)
    d = dets.assign(image_id=dets["image_id"].astype(str))
    groups = {k: g for k, g in d.groupby("image_id", sort=False)}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if summary:
        parts.append(_table(summary))
    parts.append(f"<p>Boxes drawn: score &ge; {show_score:g}; the detection files hold every detection.</p>")
    for k, r in enumerate(images.drop_duplicates("image_id").itertuples(index=False)):
        g = groups.get(str(r.image_id), d.iloc[:0])
        shown = g[g.score >= show_score]
        parts.append(f"<h3>{html.escape(str(r.image_id))} <small>({html.escape(Path(r.path).name)}: "
                     f"{len(g)} detections, {len(shown)} shown)</small></h3>")
        if k < max_images:
            name = f"overlays/{_safe_name(r.image_id)}.png"
            plot_detections(r.path, shown, out_dir / name)
            parts.append(f'<img src="{html.escape(name)}" alt="{html.escape(str(r.image_id))}">')
    style = "<style>body{font-family:sans-serif;margin:1em 2em}img{max-width:100%}td,th{padding:2px 8px}</style>"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{style}</head>"
            f"<body>{''.join(parts)}</body></html>\n")
    return write_text(out_dir / "index.html", page)
