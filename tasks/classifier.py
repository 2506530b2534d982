"""Stage 3: fine-tune the classifier on the selected proposals (or, for the paper's Table IV baseline, on whole
images with image-level labels).

    SelectProposals -> TrainClassifier          (classifier_mode=crops, the default)
    PrepareDataset  -> TrainClassifier          (classifier_mode=image_labels)

The classifier's parameters carry a ``classifier_`` prefix: luigi's ``@inherits``/``clone`` hand every parameter
down the chain by name (the detector has ``det_epochs``, ``det_lr``, ``det_backbone`` of its own). ``seed`` seeds the
training (head initialisation, crop subsample, order, augmentation); the dataset has its own ``data_seed``, so a
reseeded classifier reuses the dataset and the proposals.

Several GPUs: ``--classifier-nproc N`` trains with torch DDP in N processes (``torchrun --standalone``, one GPU
each; gloo processes on a CPU-only machine), started from the stage's run() and writing into its work directory;
the batch size stays the global one, so N does not change the output's identity (not in the hash).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import luigi
import luigi.configuration

from pipeline.backbones import BACKBONES, build_backbone
from pipeline.bcct import CTLoss, CTNet
from pipeline.classifier import (CHECKPOINT_NAME, LOG_NAME, TrainConfig, items_per_class, load_classifier,
                                 save_classifier, stage_training_set, train_classifier, train_classifier_distributed)
from pipeline.device import resolve_device
from pipeline.io import write_json
from pipeline.pooling import POOLINGS, with_cam_head

from .base import StageTask, TrainingSeed, inherits
from .bcct import TrainBC
from .dataset import PrepareDataset
from .defaults import TUNED
from .proposals import SelectProposals

log = logging.getLogger("clickscale")

MODES = ("crops", "image_labels")


@inherits(SelectProposals, TrainBC)  # TrainBC: the BC model of --classifier-ct-weight (its parameters)
class TrainClassifier(TrainingSeed, StageTask):
    """Fine-tuned classifier: ``model.pt`` (:func:`pipeline.classifier.load_classifier`), ``train_log.csv`` (per
    epoch: loss, accuracy, lr, seconds, crops/s) and ``report.json``.

    ``crops``: every selected proposal of every click, labelled with the click's class. ``image_labels``: whole
    trainval images, multi-hot targets of the classes of their annotated objects (BCE loss per class), through GAP
    and a linear head, or seed 003's CAM layer and GMP / SPAM pooling (``--classifier-image-pooling``). Training keeps
    ``checkpoint.pt`` in the stage's work directory after every epoch, so a killed run resumes where it stopped.
    """

    uses_gpu = True  # luigi resource gpu_<host>: one GPU stage per machine at a time (tasks/base.py)
    # the network trained before these parameters existed
    unhashed_values = {"classifier_image_pooling": "gap", "classifier_ct_weight": "0.0", "classifier_ct_layer": "",
                       "classifier_ct_delta": "0.8", "classifier_ct_sigma": "0.01"}

    classifier_mode = luigi.ChoiceParameter(choices=list(MODES), default="crops",
                                            description="crops: selected proposals labelled with their click's "
                                                        "class; image_labels: whole images, multi-label")
    classifier_image_pooling = luigi.ChoiceParameter(
        choices=list(POOLINGS), default="gap",
        description="classifier_mode=image_labels only: gap: global average pooling and a linear head; gmp / spam: "
                    "seed 003's CAM layer (1x1 conv, one map per class) after the last conv layer, then global max / "
                    "SPAM pooling (pipeline/pooling.py)")
    classifier_backbone = luigi.ChoiceParameter(choices=list(BACKBONES), default=TUNED.classifier_backbone)
    classifier_weights = luigi.Parameter(default="imagenet",
                                         description="imagenet, a path to a state dict, or random (tests only)")
    # the CPU budget bench/quality.py runs with (tasks/defaults.py)
    classifier_epochs = luigi.IntParameter(
        default=0, description="training epochs; 0: the mode's default (tasks/defaults.py: classifier_epochs for "
                               "crops, classifier_image_epochs for image_labels)")
    classifier_batch_size = luigi.IntParameter(default=32)
    classifier_optimizer = luigi.ChoiceParameter(choices=["sgd", "adamw"], default=TUNED.classifier_optimizer)
    classifier_lr = luigi.FloatParameter(default=TUNED.classifier_lr,
                                         description="backbone learning rate; the new head gets 10x")
    classifier_freeze_bn = luigi.BoolParameter(default=TUNED.classifier_freeze_bn,
                                               parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                               description="keep the pretrained BatchNorm statistics while "
                                                           "fine-tuning (efficientnet_lite0; VGG16 has none)")
    classifier_clip_grad_norm = luigi.FloatParameter(default=TUNED.classifier_clip_grad_norm,
                                                     description="clip the gradient's total L2 norm to this before "
                                                                 "each step; 0: no clipping")
    classifier_input_px = luigi.IntParameter(default=TUNED.classifier_input_px,
                                             description="crops are resized to this square (px)")
    classifier_max_crops_per_class = luigi.IntParameter(default=TUNED.classifier_max_crops_per_class,
                                                        description="seeded subsample of the training crops per "
                                                                    "class; 0 = all")
    classifier_ct_weight = luigi.FloatParameter(
        default=0.0, description="seed 002's CT training: weight of a mask loss beside the classification loss, a "
                                 "mask branch on --classifier-ct-layer against the BC model's mask of each crop "
                                 "(TrainBC; docs/method.md); 0: off")
    classifier_ct_layer = luigi.Parameter(default="", description="layer the CT mask branch reads; empty: the "
                                                                  "backbone's default CAM layer")
    classifier_ct_delta = luigi.FloatParameter(default=0.8, description="Eq. 2's delta of the CT masks")
    classifier_ct_sigma = luigi.FloatParameter(default=0.01, description="Gaussian smoothing of the crop's BC "
                                                                         "gradient map before Eq. 2, a fraction of "
                                                                         "the crop side")
    device = luigi.Parameter(default="auto", significant=False, description="auto, cpu or cuda")
    classifier_workers = luigi.IntParameter(default=-1, significant=False,
                                            description="DataLoader workers; -1 = auto")
    classifier_nproc = luigi.IntParameter(default=1, significant=False,
                                          description="training processes (torch DDP via torchrun, one GPU each); "
                                                      "1: train in the luigi worker")

    @property
    def resources(self) -> dict:
        """One unit of the machine's GPU resource; a DDP run of N processes takes N units, at most as many as
        luigi.cfg's ``[resources] gpu_<host>`` gives the machine (1 when unset), so it never waits forever."""
        return self.gpu_units(self.classifier_nproc)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.classifier_image_pooling != "gap" and self.classifier_mode != "image_labels":
            raise ValueError(f"--classifier-image-pooling {self.classifier_image_pooling} needs "
                             "--classifier-mode image_labels (the crop classifier keeps its GAP head)")
        if self.classifier_ct_weight and (self.classifier_mode != "crops" or self.classifier_nproc > 1):
            raise ValueError("--classifier-ct-weight trains the crop classifier in one process "
                             "(--classifier-mode crops, --classifier-nproc 1)")

    @property
    def epochs(self) -> int:
        """``--classifier-epochs``, 0 resolved to the mode's default."""
        if self.classifier_epochs:
            return self.classifier_epochs
        return TUNED.classifier_image_epochs if self.classifier_mode == "image_labels" else TUNED.classifier_epochs

    def significant_params(self) -> dict:
        """The epochs enter the hash as resolved (0 and the mode's default number are the same training)."""
        return {**super().significant_params(), "classifier_epochs": str(self.epochs)}

    def requires(self):
        if self.classifier_mode == "image_labels":
            return self.clone(PrepareDataset)
        if self.classifier_ct_weight:
            return {"selection": self.clone(SelectProposals), "bc": self.clone(TrainBC)}
        return self.clone(SelectProposals)

    def ct_loss(self, model):
        """``(model to train, auxiliary loss)``: with ``--classifier-ct-weight``, the CT model (the classifier and a
        mask branch, :class:`pipeline.bcct.CTNet`) and its mask loss; else ``(model, None)``."""
        if not self.classifier_ct_weight:
            return model, None
        bc = load_classifier(self.input_dir("bc") / "model.pt", resolve_device(self.device))
        ct = CTNet(model, self.classifier_ct_layer or model.default_cam_layer, seed=self.seed)
        return ct, CTLoss(bc, self.classifier_ct_weight, self.classifier_ct_delta, self.classifier_ct_sigma,
                          (model.mean, model.std))

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.classifier_batch_size,
                           lr=self.classifier_lr, optimizer=self.classifier_optimizer,
                           freeze_bn_stats=self.classifier_freeze_bn,
                           clip_grad_norm=self.classifier_clip_grad_norm or None,
                           multilabel=self.classifier_mode == "image_labels", seed=self.seed, device=self.device,
                           workers=self.classifier_workers)

    def run_stage(self, work: Path) -> None:
        manifest = self.manifest()
        classes = manifest.classes
        model = build_backbone(self.classifier_backbone, len(classes), self.classifier_weights, seed=self.seed)
        if self.classifier_image_pooling != "gap":
            model = with_cam_head(model, self.classifier_image_pooling, seed=self.seed)
        model.input_size = self.classifier_input_px
        selected = None if self.classifier_mode == "image_labels" else Path(
            self.clone(SelectProposals).output().path) / "selected.parquet"
        dataset, source = stage_training_set(manifest, selected, input_size=self.classifier_input_px,
                                             mean=model.mean, std=model.std, seed=self.seed,
                                             max_crops_per_class=self.classifier_max_crops_per_class or None)
        cfg = self.train_config()
        if self.classifier_nproc < 1:
            raise ValueError(f"--classifier-nproc must be >= 1, got {self.classifier_nproc}")
        t0 = time.time()
        trained, aux = self.ct_loss(model)
        train_log = (train_classifier(trained, dataset, work, cfg, aux_loss=aux) if aux is not None
                     else train_classifier_distributed(model, dataset, work, cfg, nproc=self.classifier_nproc))
        final = train_log.iloc[-1].to_dict()
        meta = {"mode": self.classifier_mode, "pooling": self.classifier_image_pooling,
                **({"ct_weight": self.classifier_ct_weight} if aux is not None else {}),
                "weights": self.classifier_weights, "train": cfg.result_args(),
                "final": final, "stage": self.stage_ref}
        save_classifier(work / "model.pt", model, classes, meta)
        (work / CHECKPOINT_NAME).unlink(missing_ok=True)  # model.pt is the product; the checkpoint only resumes
        write_json(work / "report.json", {
            "mode": self.classifier_mode, "pooling": self.classifier_image_pooling,
            "backbone": self.classifier_backbone, "weights": self.classifier_weights,
            "classes": len(classes), "input_size": self.classifier_input_px, "training_items": len(dataset),
            "items_per_class": items_per_class(dataset, classes),
            "max_crops_per_class": self.classifier_max_crops_per_class or None, **source,
            "device": str(resolve_device(self.device)), "processes": self.classifier_nproc,
            "train": cfg.result_args(), "final": final, "seconds_this_run": round(time.time() - t0, 1),
            "train_log": LOG_NAME})
        log.info("TrainClassifier: %d %s, %d epochs, final loss %.4f accuracy %.3f, %.1f crops/s", len(dataset),
                 "images" if dataset.multilabel else "crops", len(train_log), final["loss"], final["accuracy"],
                 final["crops_per_s"])
