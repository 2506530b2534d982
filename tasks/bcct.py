"""Seed 002 (BC-CT): the background set, the BC model and its per-click foreground gradient maps.

    SelectiveSearch + SelectProposals -> BackgroundSet -> TrainBC -> BCMaps -> FusePseudoBoxes (--box-bc-mask on)

``BackgroundSet`` cuts background crops from the trainval images' proposals that hold no click and overlap no
selected proposal (or takes the images of ``--bc-background-dir``); ``TrainBC`` trains the BC model (frozen ImageNet
backbone, one linear output, BCE: click crops against background crops); ``BCMaps`` stores each click's fused
gradient map (Eq. 1) as a CAM store with one layer, ``input``. The library is :mod:`pipeline.bcct`. Parameters
carry a ``bc_`` prefix; the background choice draws from ``--data-seed``, the BC training from ``--seed``.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path

import luigi
import pandas as pd

from pipeline.backbones import BACKBONES
from pipeline.bcct import (BC_CLASSES, CHECKPOINT_NAME, INPUT_LAYER, LOG_NAME, BackgroundParams, BCConfig,
                           background_boxes, bc_training_set, build_bc_model, click_entries_bc, contact_sheet,
                           folder_background, positive_crops, train_bc_model)
from pipeline.cam import CamStoreSettings, write_cam_store
from pipeline.classifier import load_classifier, save_classifier
from pipeline.device import resolve_device
from pipeline.io import write_csv, write_json, write_text
from pipeline.proposals import ProposalStore

from .base import StageTask, TrainingSeed, inherits
from .dataset import PrepareDataset
from .defaults import TUNED
from .proposals import SelectiveSearch, SelectProposals

log = logging.getLogger("clickscale")


@inherits(SelectProposals)
class BackgroundSet(StageTask):
    """Background crops: ``background.csv`` (:data:`pipeline.bcct.BACKGROUND_COLUMNS`), ``counts.csv`` (per image:
    proposals, click-free ones, candidates, chosen), ``report.json``, ``contact_sheet.png`` (a random sample) and
    ``index.html`` showing both."""

    bc_background_dir = luigi.Parameter(default="", description="a folder of background images (whole images, as "
                                                                "the paper's set) instead of crops from the clicks")
    bc_bg_per_image = luigi.IntParameter(default=4, description="background crops per trainval image, at most")
    bc_bg_total = luigi.IntParameter(default=400, description="background crops in all, at most (0: no cap)")
    bc_bg_overlap_max = luigi.FloatParameter(default=0.1, description="every selected proposal of its image covers "
                                                                      "less than this fraction of a background crop")
    bc_bg_min_px = luigi.FloatParameter(default=32.0, description="a background crop's shorter side, at least (px)")
    bc_bg_sheet = luigi.IntParameter(default=48, significant=False,
                                     description="crops drawn on the contact sheet")

    def requires(self):
        return {"proposals": self.clone(SelectiveSearch), "selected": self.clone(SelectProposals),
                "dataset": self.clone(PrepareDataset)}

    def params(self) -> BackgroundParams:
        return BackgroundParams(self.bc_bg_per_image, self.bc_bg_total, self.bc_bg_overlap_max, self.bc_bg_min_px,
                                self.data_seed)

    def run_stage(self, work: Path) -> None:
        manifest, p = self.manifest(), self.params()
        trainval = manifest.split("trainval")
        if self.bc_background_dir:
            crops, counts = folder_background(self.bc_background_dir, p.total, p.seed), pd.DataFrame()
        else:
            selected = pd.read_parquet(self.input_dir("selected") / "selected.parquet")
            with ProposalStore(self.input_dir("proposals") / "proposals_trainval.h5") as store:
                crops, counts = background_boxes(store, manifest.clicks, selected, trainval, p)
            write_csv(counts, work / "counts.csv")
        if crops.empty:
            raise ValueError("BackgroundSet: no background crop found (every proposal holds a click or overlaps a "
                             "selected one): raise --bc-bg-overlap-max or give --bc-background-dir")
        write_csv(crops, work / "background.csv")
        sheet = contact_sheet(crops, work / "contact_sheet.png", self.bc_bg_sheet, p.seed)
        per_image = counts.chosen.describe().round(2).to_dict() if len(counts) else {}
        report = {"source": "folder" if self.bc_background_dir else "proposals", "params": p.as_dict(),
                  "folder": self.bc_background_dir or None, "crops": len(crops),
                  "images_with_crops": int(crops.image_id.nunique()), "images": len(trainval),
                  "chosen_per_image": per_image, "contact_sheet": sheet.name if sheet else None}
        write_json(work / "report.json", report)
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in report.items() if k != "params")
        write_text(work / "index.html", f"<html><body><h1>Background set</h1><table>{rows}</table>"
                                        "<p>counts per image: counts.csv</p><img src='contact_sheet.png'></body></html>")
        log.info("BackgroundSet: %d crops from %d images", len(crops), report["images_with_crops"])


@inherits(BackgroundSet)
class TrainBC(TrainingSeed, StageTask):
    """The BC model (paper 002, 3.2): ``model.pt`` (:func:`pipeline.classifier.load_classifier`, one output,
    class ``foreground``), ``train_log.csv``, ``report.json``. Its checkpoint is kept in the work directory after
    every epoch, so a killed run resumes."""

    uses_gpu = True

    bc_backbone = luigi.ChoiceParameter(choices=list(BACKBONES), default=TUNED.classifier_backbone,
                                        description="frozen ImageNet backbone of the BC model")
    bc_weights = luigi.Parameter(default="imagenet", description="imagenet, a path to a state dict, or random "
                                                                 "(tests only)")
    bc_epochs = luigi.IntParameter(default=3, description="epochs of the BC model's linear output")
    bc_batch_size = luigi.IntParameter(default=32, description="crops per BC training step")
    bc_lr = luigi.FloatParameter(default=0.01, description="SGD learning rate of the linear output")
    bc_input_px = luigi.IntParameter(default=TUNED.classifier_input_px, description="crops resized to this square")
    bc_max_positives = luigi.IntParameter(default=800, description="seeded subsample of the selected click crops "
                                                                   "used as positives; 0: all")
    device = luigi.Parameter(default="auto", significant=False, description="auto, cpu or cuda")

    def requires(self):
        return {"background": self.clone(BackgroundSet), "selected": self.clone(SelectProposals)}

    def run_stage(self, work: Path) -> None:
        trainval = self.manifest().split("trainval")
        background = pd.read_csv(self.input_dir("background") / "background.csv", dtype={"image_id": str})
        selected = pd.read_parquet(self.input_dir("selected") / "selected.parquet")
        positives = positive_crops(selected, trainval, self.bc_max_positives, self.seed)
        model = build_bc_model(self.bc_backbone, self.bc_weights, self.seed)
        model.input_size = self.bc_input_px
        dataset = bc_training_set(positives, background, input_size=self.bc_input_px, mean=model.mean,
                                  std=model.std, seed=self.seed)
        cfg = BCConfig(epochs=self.bc_epochs, batch_size=self.bc_batch_size, lr=self.bc_lr, seed=self.seed,
                       device=str(resolve_device(self.device)))
        train_log = train_bc_model(model, dataset, work, cfg)
        final = train_log.iloc[-1].to_dict()
        save_classifier(work / "model.pt", model.cpu(), BC_CLASSES, {"bc": True, "final": final})
        (work / CHECKPOINT_NAME).unlink(missing_ok=True)
        write_json(work / "report.json", {"positives": len(positives), "background": len(background),
                                          "training_items": len(dataset), "train": cfg.__dict__, "final": final,
                                          "train_log": LOG_NAME})
        log.info("TrainBC: %d positives, %d backgrounds, final loss %.4f accuracy %.3f", len(positives),
                 len(background), final["loss"], final["accuracy"])


@inherits(TrainBC)
class BCMaps(StageTask):
    """Each click's BC gradient map (Eq. 1 on each selected crop, pasted and summed into an image-sized map): a
    :class:`pipeline.cam.CamStore` with the one layer ``input`` (``cams-NNNNN.h5``, ``index.csv``, ``plan.json``,
    ``summary.json``); finished parts are kept across kills."""

    uses_gpu = True

    bc_map_max_crops = luigi.IntParameter(default=0, description="the first n selected crops of a click; 0: all")
    bc_images_per_part = luigi.IntParameter(default=64, description="images per HDF5 part (the unit of resuming)")
    bc_map_batch_size = luigi.IntParameter(default=0, significant=False,
                                           description="crops per forward/backward pass; 0: by device")

    def requires(self):
        return {"bc": self.clone(TrainBC), "selection": self.clone(SelectProposals)}

    def run_stage(self, work: Path) -> None:
        device = resolve_device(self.device)
        model = load_classifier(self.input_dir("bc") / "model.pt", device)
        selected = pd.read_parquet(self.input_dir("selection") / "selected.parquet")
        trainval = self.manifest().split("trainval")
        settings = CamStoreSettings(method="input_gradient", layers=(INPUT_LAYER,), crop_size=model.input_size,
                                    batch_size=self.bc_map_batch_size, fusion="sum", paste="resize",
                                    images_per_part=self.bc_images_per_part, device=device, progress=True)
        store = write_cam_store(model, click_entries_bc(selected, self.bc_map_max_crops or None),
                                dict(zip(trainval.image_id, trainval.path)), work, settings)
        log.info("BCMaps: %d clicks", len(store))

