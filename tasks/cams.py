"""Stage 4: class activation maps of every click's crops, fused per click (paper Eq. 1-4), in shards.

    TrainClassifier + SelectProposals -> GenerateCAMsShard (x cam_shards) -> GenerateCAMs   (classifier_mode=crops)
    TrainClassifier (image_labels)    -> GenerateCAMsShard (x cam_shards) -> GenerateCAMs   (whole-image CAMs)

The work is one global plan of HDF5 parts (``cam_images_per_part`` images each, in sorted image-id order);
``GenerateCAMsShard`` computes a contiguous range of those parts (never one task per image), so several luigi
workers, on one machine or several, share the stage; each shard holds the GPU resource while it runs. A killed
shard reruns alone and resumes from its finished parts; finished shards are kept. ``GenerateCAMs`` publishes the
shards' parts as one :class:`pipeline.cam.CamStore` (hard links, one index) and needs no GPU. A part holds the
same maps whatever the shard count; the shard count is part of the output's identity all the same (as
``SelectiveSearch``'s ``ss_shards``).

Parameters carry a ``cam_`` prefix (luigi's ``@inherits``/``clone`` pass every parameter down the chain by name).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import luigi
import pandas as pd

from pipeline.cam import (CAM_METHODS, FUSIONS, PASTE_MODES, CamStoreSettings, click_entries, image_entries, merge_cam_stores,
                          write_cam_store)
from pipeline.classifier import load_classifier
from pipeline.device import resolve_device
from pipeline.io import read_json, write_json, write_text

from .base import StageTask, inherits
from .classifier import TrainClassifier
from .defaults import TUNED
from .proposals import SelectProposals

log = logging.getLogger("clickscale")


class _CamParams:
    """Parameters shared by the CAM tasks (a mixin: luigi finds parameters on base classes)."""

    cam_method = luigi.ChoiceParameter(choices=list(CAM_METHODS), default=TUNED.cam_method,
                                       description="sacam (Eq. 3, = LayerCAM) or gradcam (Eq. 1-2)")
    cam_layers = luigi.Parameter(default="", description="comma-separated layers the CAMs are taken at, all in one "
                                                         "forward/backward pass and stored per layer; "
                                                         "FusePseudoBoxes averages their maps. Empty: the backbone's "
                                                         "TUNED.cam_layers (tasks/defaults.py)")
    cam_fusion = luigi.ChoiceParameter(choices=list(FUSIONS), default=TUNED.cam_fusion,
                                       description="how a click's crop maps are summed: sum (the paper's Eq. 4) or "
                                                   "prob (each weighted by the classifier's probability of the "
                                                   "click's class on that crop; measured: docs/experiments.md)")
    cam_paste = luigi.ChoiceParameter(choices=list(PASTE_MODES), default="grid",
                                      description="how a crop's map goes back onto its box: grid (each map position "
                                                  "at its receptive field's centre, from the layer's convolutions) "
                                                  "or resize (the map resized like an image: half a stride cell "
                                                  "off for convolutions padded by k // 2; the stage before this "
                                                  "parameter existed)")
    #: CAM stores computed before --cam-paste existed keep their directories
    unhashed_values = {"cam_paste": "resize"}
    cam_crop_px = luigi.IntParameter(default=0, description="crops resized to this square (px); 0: the "
                                                            "classifier's input size")
    cam_max_crops = luigi.IntParameter(default=0, description="use the first n selected crops of a click; 0: all")
    cam_inspect_images = luigi.IntParameter(default=0, description="also store each crop's map for the first n "
                                                                   "images (inspection)")
    cam_images_per_part = luigi.IntParameter(default=64,
                                             description="images per HDF5 part: the unit of resuming and of "
                                                         "sharding (shards are ranges of parts, so it is part of "
                                                         "the output's identity)")
    cam_shards = luigi.IntParameter(default=4, description="GenerateCAMsShard tasks (ranges of parts) the stage is "
                                                           "split into")
    cam_batch_size = luigi.IntParameter(default=0, significant=False,
                                        description="crops per forward/backward pass (cut across images); 0: by "
                                                    "device (pipeline.cam_writer.AUTO_BATCH_SIZE)")
    cam_workers = luigi.IntParameter(default=-1, significant=False,
                                     description="image-decoding DataLoader workers; -1: auto (0 on CPU)")

    def image_label_mode(self) -> bool:
        return self.classifier_mode == "image_labels"


@inherits(TrainClassifier)
class GenerateCAMsShard(_CamParams, StageTask):
    """Shard ``cam_shard`` of ``cam_shards`` of the CAM stage: the parts :func:`pipeline.cam.shard_parts` of the
    global plan, written as ``cams-NNNNN.h5`` (global part numbers) with ``plan.json``, ``index.csv`` and
    ``summary.json`` (a :class:`pipeline.cam.CamStore` of this shard's entries; empty when there are fewer parts
    than shards). Resumable: finished parts in the work directory are kept across kills. Runs on CUDA when present
    (``--device``) and holds the machine's GPU resource.
    """

    uses_gpu = True  # luigi resource gpu_<host>: one GPU stage per machine at a time (tasks/base.py)

    cam_shard = luigi.IntParameter(default=0, description="index of this shard, 0..cam_shards-1")

    def requires(self):
        reqs = {"classifier": self.clone(TrainClassifier)}
        if not self.image_label_mode():
            reqs["selection"] = self.clone(SelectProposals)
        return reqs

    def decode_workers(self, device) -> int:
        if self.cam_workers >= 0:
            return self.cam_workers
        return min(8, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0

    def cam_layers_of(self, model) -> list[str]:
        """``--cam-layers`` (or the backbone's tuned layers, or the model's default layer), each checked to be a
        convolutional layer of the model."""
        layers = [x.strip() for x in self.cam_layers.split(",") if x.strip()] or [
            x for x in TUNED.cam_layers.get(self.classifier_backbone, ()) if x] or [model.default_cam_layer]
        if len(set(layers)) != len(layers):
            raise ValueError(f"--cam-layers {self.cam_layers!r}: each layer once")
        for layer in layers:
            if layer not in model.layers or model.layers[layer].stride == 0:
                raise ValueError(f"--cam-layers: {layer!r} is not a convolutional layer of {model.name}; choose "
                                 f"from {model.cam_layers} (or {tuple(k for k, v in model.layers.items() if v.stride)})")
        return layers

    def entries(self, manifest, classes: tuple[str, ...]) -> list:
        """What to compute: every click's crops, or each trainval image's labelled classes (image_labels)."""
        trainval = manifest.split("trainval")
        if self.image_label_mode():
            labels = manifest.image_labels()
            sizes = {r.image_id: (int(r.width), int(r.height)) for r in trainval.itertuples(index=False)}
            entries = image_entries(labels, sizes, classes)
        else:
            selected = pd.read_parquet(self.input_dir("selection") / "selected.parquet")
            entries = click_entries(selected, classes, self.cam_max_crops or None)
        if not entries:
            raise ValueError("GenerateCAMs: nothing to compute (no clicks with crops / no labelled images)")
        return entries

    def run_stage(self, work: Path) -> None:
        if not 0 <= self.cam_shard < self.cam_shards:
            raise ValueError(f"--cam-shard {self.cam_shard} is not in [0, --cam-shards {self.cam_shards})")
        device = resolve_device(self.device)
        model = load_classifier(self.input_dir("classifier") / "model.pt", device)
        settings = CamStoreSettings(
            method=self.cam_method, layers=self.cam_layers_of(model), crop_size=self.cam_crop_px or model.input_size,
            batch_size=self.cam_batch_size, fusion=self.cam_fusion, paste=self.cam_paste,
            inspect_images=self.cam_inspect_images,
            images_per_part=self.cam_images_per_part, shard=(self.cam_shard, self.cam_shards), device=device,
            num_workers=self.decode_workers(device), progress=True)
        manifest = self.manifest()
        trainval = manifest.split("trainval")
        # every shard plans all entries (the same global parts) and computes its own range of them
        store = write_cam_store(model, self.entries(manifest, tuple(model.classes)),
                                dict(zip(trainval.image_id, trainval.path)), work, settings)
        summary = read_json(work / "summary.json")
        log.info("GenerateCAMsShard %d/%d: parts %s, %d entries, %d crops, %s crops/s on %s", self.cam_shard,
                 self.cam_shards, summary.get("part_range"), len(store), summary["crops"], summary["crops_per_s"],
                 summary["device"])


@inherits(TrainClassifier)
class GenerateCAMs(_CamParams, StageTask):
    """Fused CAM per click (or per image and class in the image-label-only mode) at each of ``--cam-layers`` (all
    from one forward/backward pass per batch), in a :class:`pipeline.cam.CamStore`: ``cams-NNNNN.h5`` parts
    (float16, gzip, one chunk per map and layer, with image id, click, class and the crops used), ``index.csv``,
    ``plan.json``, ``summary.json`` and ``summary.md``.

    The maps are computed by ``cam_shards`` :class:`GenerateCAMsShard` tasks; this task links their parts into
    one store (:func:`pipeline.cam.merge_cam_stores`; no map is recomputed or rewritten) and needs no GPU.
    """

    def requires(self):
        reqs = {"classifier": self.clone(TrainClassifier),
                "shards": [self.clone(GenerateCAMsShard, cam_shard=i) for i in range(self.cam_shards)]}
        if not self.image_label_mode():
            reqs["selection"] = self.clone(SelectProposals)
        return reqs

    def run_stage(self, work: Path) -> None:
        if self.cam_shards < 1:
            raise ValueError(f"--cam-shards must be >= 1, got {self.cam_shards}")
        shards = sorted(self.requires()["shards"], key=lambda t: t.cam_shard)
        store = merge_cam_stores([Path(t.output().path) for t in shards], work)
        if self.image_label_mode():
            source = {"labels": "classes of the objects of each trainval image"}
        else:
            path = self.input_dir("selection") / "selected.parquet"
            missing = set(self.manifest().clicks.click_id) - set(store.click_ids())
            source = {"selected": str(path), "clicks_without_crops": len(missing)}
        summary = {**read_json(work / "summary.json"), **source, "classifier": str(self.input_dir("classifier")),
                   "mode": "image_labels" if self.image_label_mode() else "clicks"}
        write_json(work / "summary.json", summary)
        write_text(work / "summary.md", (
            f"# GenerateCAMs\n\n- method: {self.cam_method}, layers: {', '.join(summary['layers'])} of "
            f"{summary['backbone']} (one pass), "
            f"crops {summary['crop_size']} px, fusion {self.cam_fusion}\n"
            f"- entries: {summary['entries']} ({summary['mode']}) over "
            f"{summary['images']} images, {summary['crops']} crops, {summary['parts']} parts in "
            f"{summary['shards']} shards\n- this run: {summary['computed_crops']} crops in {summary['seconds']} s "
            f"of shard time ({summary['crops_per_s']} crops/s) on {summary['device']}\n"))
        log.info("GenerateCAMs: %d %s entries, %d crops from %d shards, %s crops/s on %s", summary["entries"],
                 summary["mode"], summary["crops"], summary["shards"], summary["crops_per_s"], summary["device"])
