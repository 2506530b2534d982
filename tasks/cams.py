"""Stage 4: class activation maps of every click's crops, fused per click (paper Eq. 1-4).

    TrainClassifier + SelectProposals -> GenerateCAMs           (classifier_mode=crops, the default)
    TrainClassifier (image_labels)    -> GenerateCAMs           (whole-image CAM per image and class present)

Parameters carry a ``cam_`` prefix (luigi's ``@inherits``/``clone`` pass every parameter down the chain by name).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import luigi
import pandas as pd
from luigi.util import inherits

from pipeline.cam import CAM_METHODS, click_entries, image_entries, write_cam_store
from pipeline.classifier import load_classifier
from pipeline.device import resolve_device
from pipeline.io import read_json, write_json, write_text

from .base import StageTask
from .classifier import TrainClassifier
from .proposals import SelectProposals

log = logging.getLogger("clickscale")


@inherits(TrainClassifier)
class GenerateCAMs(StageTask):
    """Fused CAM per click (or per image and class in the image-label-only mode), in a
    :class:`pipeline.cam.CamStore`: ``cams-NNNNN.h5`` parts (float16, gzip, one chunk per map, with image id,
    click, class and the crops used), ``index.csv``, ``summary.json`` and ``summary.md``.

    Resumable: parts of ``cam_images_per_part`` images are written atomically into the work directory and a
    rerun after a kill skips the finished ones. Runs on CUDA when present (``--device``).
    """

    uses_gpu = True  # luigi resource gpu_<host>: one GPU stage per machine at a time (tasks/base.py)

    cam_method = luigi.ChoiceParameter(choices=list(CAM_METHODS), default="sacam",
                                       description="sacam (Eq. 3, = LayerCAM) or gradcam (Eq. 1-2)")
    cam_layer = luigi.Parameter(default="", description="layer the CAM is taken at; empty: the backbone's "
                                                        "default (vgg16 conv5_2, efficientnet_lite0 stage6)")
    cam_crop_size = luigi.IntParameter(default=0, description="crops resized to this square (px); 0: the "
                                                              "classifier's input size")
    cam_max_crops = luigi.IntParameter(default=0, description="use the first n selected crops of a click; 0: all")
    cam_inspect_images = luigi.IntParameter(default=0, description="also store each crop's map for the first n "
                                                                   "images (inspection)")
    cam_batch_size = luigi.IntParameter(default=64, significant=False,
                                        description="crops per forward/backward pass (an image's crops together)")
    cam_images_per_part = luigi.IntParameter(default=64, significant=False,
                                             description="images per HDF5 part (the unit of resuming)")
    cam_workers = luigi.IntParameter(default=-1, significant=False,
                                     description="image-decoding DataLoader workers; -1: auto (0 on CPU)")

    def image_label_mode(self) -> bool:
        return self.classifier_mode == "image_labels"

    def requires(self):
        reqs = {"classifier": self.clone(TrainClassifier)}
        if not self.image_label_mode():
            reqs["selection"] = self.clone(SelectProposals)
        return reqs

    def decode_workers(self, device) -> int:
        if self.cam_workers >= 0:
            return self.cam_workers
        return min(8, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0

    def run_stage(self, work: Path) -> None:
        device = resolve_device(self.device)
        model = load_classifier(self.input_dir("classifier") / "model.pt", device)
        classes = tuple(model.classes)
        layer = self.cam_layer or model.default_cam_layer
        if layer not in model.layers or model.layers[layer].stride == 0:
            raise ValueError(f"--cam-layer {layer!r} is not a convolutional layer of {model.name}; choose one of "
                             f"{model.cam_layers} (or {tuple(k for k, v in model.layers.items() if v.stride)})")
        manifest = self.manifest()
        trainval = manifest.split("trainval")
        paths = dict(zip(trainval.image_id, trainval.path))
        if self.image_label_mode():
            labels = manifest.objects[manifest.objects.image_id.isin(set(trainval.image_id))]
            sizes = {r.image_id: (int(r.width), int(r.height)) for r in trainval.itertuples(index=False)}
            entries = image_entries(labels, sizes, classes)
            source = {"labels": "classes of the objects of each trainval image"}
        else:
            path = self.input_dir("selection") / "selected.parquet"
            selected = pd.read_parquet(path)
            entries = click_entries(selected, classes, self.cam_max_crops or None)
            missing = set(manifest.clicks.click_id) - {e.entry_id for e in entries}
            source = {"selected": str(path), "clicks_without_crops": len(missing)}
        if not entries:
            raise ValueError("GenerateCAMs: nothing to compute (no clicks with crops / no labelled images)")
        write_cam_store(model, entries, paths, work, method=self.cam_method, layer=layer,
                        crop_size=self.cam_crop_size or model.input_size, batch_size=self.cam_batch_size,
                        device=device, images_per_part=self.cam_images_per_part,
                        inspect_images=self.cam_inspect_images, num_workers=self.decode_workers(device), progress=True)
        summary = {**read_json(work / "summary.json"), **source, "classifier": str(self.input_dir("classifier")),
                   "mode": "image_labels" if self.image_label_mode() else "clicks"}
        write_json(work / "summary.json", summary)
        write_text(work / "summary.md", (
            f"# GenerateCAMs\n\n- method: {self.cam_method}, layer: {layer} of {model.name}, crops "
            f"{summary['crop_size']} px\n- entries: {summary['entries']} ({summary['mode']}) over "
            f"{summary['images']} images, {summary['crops']} crops\n- this run: {summary['computed_crops']} crops "
            f"in {summary['seconds']} s ({summary['crops_per_s']} crops/s) on {summary['device']}\n"))
        log.info("GenerateCAMs: %d %s entries, %d crops, %s crops/s on %s", summary["entries"], summary["mode"],
                 summary["crops"], summary["crops_per_s"], summary["device"])
