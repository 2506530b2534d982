"""A trained detector on a folder of new images: ``Detect`` (``make detect IMAGES=<dir> [MODEL=<path>]``).

    luigi --module tasks Detect --detect-images DIR --detect-model outputs/TrainFastRCNN/<hash> --local-scheduler
    luigi --module tasks Detect --detect-images DIR --local-scheduler    # the detector of the default chain

Without ``--detect-model`` the detector is the chain's ``TrainFastRCNN``, configured by the same parameters as
``EvaluateVOC07`` (``--voc-root``, ``--det-*``, ...): the one ``make evaluate`` trained with those arguments, trained
here first when it is not there yet. Parameters carry ``detect_``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import luigi

from pipeline.detector import load_detector
from pipeline.device import resolve_device
from pipeline.inference import detect_folder, model_file
from pipeline.io import write_text
from pipeline.proposals import SelectiveSearchParams

from .base import StageTask, inherits
from .detector import TrainFastRCNN

log = logging.getLogger("clickscale")


@inherits(TrainFastRCNN)
class Detect(StageTask):
    """Detections of a trained detector on every image below ``--detect-images`` (pipeline/inference.py: COCO
    results JSON with its images/categories file, VOC XML per image with scores, an HTML page of overlays,
    ``report.json`` with images/s, ``summary.md``)."""

    uses_gpu = True  # luigi resource gpu_<host>: one GPU stage per machine at a time (tasks/base.py)

    detect_images = luigi.Parameter(description="folder of images to detect on (searched recursively)")
    detect_model = luigi.Parameter(default="", description="a trained detector: a model.pth or the TrainFastRCNN "
                                                           "output directory holding it; empty: the chain's "
                                                           "TrainFastRCNN (trained first when missing)")
    detect_score_min = luigi.FloatParameter(default=0.05, description="keep detections scoring at least this")
    detect_show_score = luigi.FloatParameter(default=0.5, description="HTML overlays: draw boxes scoring at least "
                                                                      "this")
    detect_report_images = luigi.IntParameter(default=100, description="HTML overlays for the first this many "
                                                                       "images (all are listed)")
    detect_batch = luigi.IntParameter(default=1, significant=False, description="images per forward pass")

    def requires(self):
        return {} if self.detect_model else {"detector": self.clone(TrainFastRCNN)}

    def model_path(self) -> Path:
        return model_file(self.detect_model or self.input_dir("detector"))

    def hash_refs(self) -> list[str]:
        """The upstream detector, or the given checkpoint file's identity (path, size, modification time), and the
        image folder's content (each image's id, size and modification time): another model file or changed
        images give a new output."""
        refs = super().hash_refs()
        files = []
        root = Path(self.detect_images)
        if root.is_dir():
            files = sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                           for p in root.rglob("*") if p.is_file())
        refs.append("images:" + hashlib.md5(json.dumps(files).encode()).hexdigest())
        if self.detect_model:
            p = model_file(self.detect_model)
            refs.append(f"model:{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}")
        return refs

    def run_stage(self, work: Path) -> None:
        device = resolve_device(self.device)
        path = self.model_path()
        model = load_detector(path, device)
        ss = SelectiveSearchParams(self.ss_mode, self.ss_image_max_px, self.ss_box_min_px, self.ss_max_boxes,
                                   self.data_seed)  # the chain's (SelectiveSearch's) settings
        r = detect_folder(model, self.detect_images, work, ss_params=ss, device=device, batch_size=self.detect_batch,
                          score_min=self.detect_score_min, show_score=self.detect_show_score,
                          report_images=self.detect_report_images, info={"model": str(path.resolve())})
        line = (f"Detect: {r['images']} images, {r['detections']} detections ({r['arch']}, {r['backbone']}), "
                f"{r['images_per_s']:.2f} images/s ({r['detect']['model_fps']:.2f} network alone) on {device}")
        log.info(line)
        print(line)
        write_text(work / "summary.md", f"# Detections in {self.detect_images}\n\n{line}\n\nModel: {path.resolve()}"
                   "\n\nFiles: coco_results.json (+ coco_images.json), Annotations/*.xml, index.html, detections.csv, "
                   "report.json\n")
