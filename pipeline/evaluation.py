"""A trained detector evaluated (stage 6, ``EvaluateVOC07``): VOC2007 mAP on a test split and the detector's CorLoc
on trainval, with the files they are written to and the summary tables (docs/detector.md).
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from .detector import DetectionDataset, detect
from .io import write_csv
from .metrics import corloc
from .proposals import ProposalStore
from .voc_eval import evaluate_detections, plot_pr_curves, write_voc_results


def evaluate_split(model, images: pd.DataFrame, proposals: str | os.PathLike | None, objects: pd.DataFrame,
                   classes: Sequence[str], out_dir: str | os.PathLike, *, split: str = "test",
                   device: torch.device | str = "cpu", batch_size: int = 1) -> tuple[pd.DataFrame, dict]:
    """Detect on ``images`` (with the proposal store at ``proposals``; None for a detector proposing its own) and score by the VOC2007 rules. Writes
    ``detections_test.csv``, ``results/`` (devkit files), ``ap_per_class.csv`` and ``pr_curves.png`` into
    ``out_dir``; returns the per-class table and the metrics (mAP 11-point and all-point, per-class AP, counts, the
    detection speed)."""
    out = Path(out_dir)
    with _store(proposals) as store:
        dets, stats = detect(model, DetectionDataset(images, store, classes), device, batch_size)
    write_csv(dets, out / "detections_test.csv")
    write_voc_results(dets, out / "results", classes, image_set=split)
    ids = list(images.image_id)
    table, m_ap, curves = evaluate_detections(dets, objects, classes, image_ids=ids, return_curves=True)
    table_all, m_ap_all = evaluate_detections(dets, objects, classes, image_ids=ids, use_07_metric=False)
    table.insert(2, "ap_all_point", table_all["ap"])
    write_csv(table, out / "ap_per_class.csv")
    plot_pr_curves(curves, out / "pr_curves.png", title=f"VOC07 11-point mAP {100 * m_ap:.1f}")
    return table, {"mAP": m_ap, "mAP_all_point": m_ap_all, "ap": dict(zip(table["class"], table["ap"])),
                   "test_images": len(images), "detections": int(len(dets)), "test": stats}


def detector_corloc(model, images: pd.DataFrame, proposals: str | os.PathLike | None, objects: pd.DataFrame,
                    classes: Sequence[str], out_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                    batch_size: int = 1) -> dict:
    """The detector's CorLoc on ``images``: its top box of every class in every image, however low its score (no
    threshold, no cap), scored against ``objects`` of those images. Writes ``corloc_boxes.csv`` and
    ``corloc_per_class.csv``; returns ``corloc``, ``corloc_per_class`` and the detection speed (``trainval``)."""
    out = Path(out_dir)
    with _store(proposals) as store:
        top, stats = detect(model, DetectionDataset(images, store, classes), device, batch_size, top_per_class=True)
    write_csv(top, out / "corloc_boxes.csv")
    per_class, mean = corloc(top, objects[objects.image_id.isin(set(images.image_id))], classes=classes)
    write_csv(per_class.rename("corloc").rename_axis("class").reset_index(), out / "corloc_per_class.csv")
    return {"corloc": mean, "corloc_per_class": per_class.to_dict(), "trainval": stats}


def _store(path: str | os.PathLike | None):
    """The proposal store at ``path`` (a context manager), or None for a detector that proposes its own."""
    return ProposalStore(path) if path is not None else nullcontext(None)


def pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def summary_markdown(table: pd.DataFrame, metrics: dict) -> str:
    """``summary.md`` of an evaluation: mAP, CorLoc, speed and the per-class table."""
    tr = metrics.get("training", {})
    lines = [f"# VOC2007 evaluation ({tr.get('box_source')} boxes)", "",
             f"mAP (11-point, VOC2007): **{pct(metrics['mAP'])}**; all-point: {pct(metrics['mAP_all_point'])}; "
             f"CorLoc (trainval): {pct(metrics.get('corloc'))}", "",
             f"test: {metrics['test_images']} images, {metrics['test']['fps']:.2f} images/s "
             f"({metrics['test']['model_fps']:.2f} model only) on {metrics['test']['device']}; training: "
             f"{tr.get('seconds_training', float('nan')):.0f} s, {tr.get('s_per_iter', float('nan')):.3f} s/iteration",
             "", "| class | AP | AP all-point | GT | detections | CorLoc |", "|---|---:|---:|---:|---:|---:|"]
    if "train_images" in metrics:
        t = metrics["train_images"]
        lines[4:4] = [f"on its {t['test_images']} training images: mAP {pct(t['mAP'])} (11-point), "
                      f"{pct(t['mAP_all_point'])} (all-point)", ""]
    cl = metrics.get("corloc_per_class", {})
    for r in table.itertuples(index=False):
        lines.append(f"| {r[0]} | {pct(r.ap)} | {pct(r.ap_all_point)} | {r.n_gt} | {r.n_det} | "
                     f"{pct(cl.get(r[0]))} |")
    return "\n".join(lines) + "\n"
