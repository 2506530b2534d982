"""A trained detector on a folder of new images (the ``Detect`` stage): detections as COCO results, VOC XML with
scores and an HTML page of overlays.

Images are found as a dataset folder's are (:func:`pipeline.dataset.scan_images`: recursively, image id = the path
relative to the folder without its extension) and read in their stored pixel frame (:func:`pipeline.imageio.
read_image`). A ``fast_rcnn`` detector needs selective-search proposals, computed here with the given parameters
(those its training used, to match); a ``faster_rcnn`` one proposes its own.

Files written into ``out_dir``:

* ``detections.csv``: ``image_id, class, score, x1, y1, x2, y2`` (0-based continuous pixels);
* ``coco_results.json``: the COCO results list ``[{image_id, category_id, bbox: [x, y, w, h], score}]``, and
  ``coco_images.json``, the COCO file of the ``images`` (``id``, ``file_name``, ``width``, ``height`` and our
  ``image_key``) and ``categories`` (``id`` = class index + 1) it refers to, with no annotations: together they
  load with pycocotools / faster-coco-eval (``COCO("coco_images.json").loadRes("coco_results.json")``);
* ``Annotations/<image_id>.xml``: one VOC file per image (every image, also without detections), each object
  with its ``<score>``;
* ``index.html`` and ``overlays/*.png``: the images with their detections above a display threshold;
* ``report.json``: counts, the model, images/s (whole loop with image reading and proposals, and the network
  alone).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd

from .dataset import header_sizes, scan_images
from .detector import DetectionDataset, detect
from .export import to_coco, write_voc_annotations
from .io import write_csv, write_json
from .proposals import SelectiveSearchParams, compute_proposals
from .report import write_detection_page

log = logging.getLogger(__name__)

#: the fields of a COCO results entry
COCO_RESULT_FIELDS = ("image_id", "category_id", "bbox", "score")


def model_file(path: str | os.PathLike) -> Path:
    """The checkpoint of ``path``: a file, or a trained detector's output directory holding ``model.pth``."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.pth"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no detector checkpoint (give a model.pth file or a TrainFastRCNN output "
                                "directory holding one)")
    return p


def folder_images(images_dir: str | os.PathLike) -> pd.DataFrame:
    """``image_id, path, width, height`` of the images below ``images_dir`` (sizes from the file headers)."""
    return header_sizes(scan_images(images_dir))


def coco_results(dets: pd.DataFrame, images: pd.DataFrame, classes) -> tuple[list[dict], dict]:
    """``(results, images_file)``: the COCO results list of ``dets`` and the COCO dict of ``images`` and the
    categories they refer to (no annotations), both from :func:`pipeline.export.to_coco`."""
    coco = to_coco(dets, images, classes, description="clickscale detections")
    results = [{k: a[k] for k in COCO_RESULT_FIELDS} for a in coco.pop("annotations")]
    return results, {**coco, "annotations": []}


def detect_folder(model, images_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  ss_params: SelectiveSearchParams | None = None, device="cpu", batch_size: int = 1,
                  score_min: float | None = None, show_score: float = 0.5, report_images: int = 100,
                  ss_workers: int = 1, progress: bool = True, info: dict | None = None) -> dict:
    """Run ``model`` on every image below ``images_dir`` and write the files of the module docstring into
    ``out_dir``. ``score_min`` replaces the model's test-time score threshold; ``show_score`` and
    ``report_images`` shape the HTML page only. Returns the report (also ``report.json``)."""
    out = Path(out_dir)
    images = folder_images(images_dir)
    t0 = time.perf_counter()
    proposals = None
    if model.config.arch == "fast_rcnn":
        boxes = compute_proposals(list(images.path), ss_params or SelectiveSearchParams(), workers=ss_workers,
                                  progress=progress)
        proposals = dict(zip(images.image_id, boxes))
    ss_seconds = time.perf_counter() - t0
    heads = model.roi_heads
    saved = heads.score_thresh
    if score_min is not None:
        heads.score_thresh = float(score_min)
    try:
        dets, stats = detect(model, DetectionDataset(images, proposals, model.classes), device, batch_size,
                             progress=progress)
    finally:
        heads.score_thresh = saved
    if dets.empty and len(images):
        log.warning("Detect: no detection in %d images (score threshold %s)", len(images), heads.score_thresh)
    seconds = ss_seconds + stats["seconds"]
    report = {"images_dir": str(Path(images_dir).resolve()), "images": int(len(images)),
              "detections": int(len(dets)), "arch": model.config.arch, "backbone": model.config.backbone,
              "classes": list(model.classes), "score_min": float(score_min if score_min is not None else saved),
              "images_per_s": len(images) / seconds if seconds > 0 else float("nan"),
              "proposal_seconds": round(ss_seconds, 3), "detect": stats, **(info or {})}
    write_csv(dets, out / "detections.csv")
    results, images_file = coco_results(dets, images, model.classes)
    write_json(out / "coco_results.json", results)
    write_json(out / "coco_images.json", images_file)
    write_voc_annotations(dets, images, out / "Annotations", folder=Path(images_dir).name, include_empty=True,
                          with_scores=True)
    summary = {k: report[k] for k in ("images", "detections", "arch", "backbone", "score_min")}
    summary["images/s"] = f"{report['images_per_s']:.2f} (network alone {stats['model_fps']:.2f})"
    write_detection_page(out, dets, images, show_score=show_score, max_images=report_images,
                         title=f"Detections in {Path(images_dir).name}", summary=summary)
    write_json(out / "report.json", report)
    return report
