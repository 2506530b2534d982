"""Stage 6: Fast R-CNN on the pseudo boxes (or ground truth / external labels) and its VOC2007 evaluation.

    FusePseudoBoxes + SelectiveSearch -> TrainFastRCNN -> EvaluateVOC07 ;  CompareDetectors (several of them)

The detector's parameters are ``--det-*`` (a preset plus optional overrides); everything upstream (dataset,
proposals, classifier, CAMs, pseudo boxes) is inherited, so one command line configures the whole chain:

    luigi --module tasks EvaluateVOC07 --local-scheduler                       # embedded synthetic dataset
    luigi --module tasks EvaluateVOC07 --voc-root .../VOC2007 --local-scheduler  # the paper's protocol (vgg16)
    luigi --module tasks EvaluateVOC07 --det-box-source gt --local-scheduler   # fully supervised upper bound

As every stage's, the output hash of these stages covers their own parameters and their upstream stages' refs (not
the inherited parameters themselves, tasks/base.py), so e.g. the ground-truth detector does not change when a CAM
parameter does. Evaluation's parameters carry ``eval_``, the comparison's ``compare_``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import luigi
import numpy as np
import pandas as pd

from pipeline.dataset import HOLDOUT_SPLIT
from pipeline.detector import (ARCHS, BOX_SOURCES, PRESETS, DetectionDataset, DetectorConfig, build_detector,
                               load_detector, load_training_boxes, preset, strip_checkpoint, train_detector_distributed)
from pipeline.device import resolve_device
from pipeline.evaluation import detector_corloc, evaluate_split, pct, summary_markdown
from pipeline.io import read_json, write_csv, write_json, write_text
from pipeline.proposals import ProposalStore

from .base import StageTask, TrainingSeed, inherits
from .dataset import PrepareDataset
from .proposals import SelectiveSearch
from .proposal_free import ImageExtentBoxes
from .pseudo import FusePseudoBoxes

log = logging.getLogger("clickscale")

#: the det_box_source values that train on a pseudo-box stage's pseudo_labels.csv, and that stage
PSEUDO_STAGES = {"pseudo": FusePseudoBoxes, "image_extent": ImageExtentBoxes}


@inherits(FusePseudoBoxes, ImageExtentBoxes)
class TrainFastRCNN(TrainingSeed, StageTask):
    """Fast R-CNN trained on ``det_box_source`` boxes of the trainval images with the selective-search proposals,
    or (``--det-arch faster_rcnn``) a Faster R-CNN proposing its own RoIs, which needs no selective search.

    Output: ``model.pth`` (checkpoint dict: model, epoch, args, classes, log), ``train_log.csv``,
    ``train_boxes.csv`` (the boxes trained on), ``report.json``. A killed run resumes from its last epoch.
    """

    uses_gpu = True  # luigi resource gpu_<host>: one GPU stage per machine at a time (tasks/base.py)

    det_box_source = luigi.ChoiceParameter(choices=list(BOX_SOURCES) + ["image_extent"], default="pseudo",
                                           description="pseudo: FusePseudoBoxes' pseudo_labels.csv; gt: ground "
                                                       "truth (upper bound); voc_dir / coco: external labels at "
                                                       "--det-box-path; image_extent: ImageExtentBoxes' (image "
                                                       "labels only, seeds 003 / 004: --cam-network gmp | spam)")
    det_box_path = luigi.Parameter(default="", description="VOC Annotations/ folder or COCO JSON (voc_dir / coco)")
    det_arch = luigi.ChoiceParameter(choices=list(ARCHS), default="fast_rcnn",
                                     description="fast_rcnn: RoIs from selective search (the paper's); faster_rcnn: "
                                                 "torchvision's RPN on the same backbone proposes them (no selective "
                                                 "search, for training or detection)")
    det_preset = luigi.ChoiceParameter(choices=["auto"] + list(PRESETS), default="auto",
                                       description="paper: VGG16, 600 px, 20 epochs; cpu: efficientnet_lite0, "
                                                   "384 px, 8 epochs; auto: paper with --voc-root, else cpu")
    det_backbone = luigi.OptionalStrParameter(default=None, description="vgg16 | efficientnet_lite0 | _lite1 | _lite2")
    det_weights = luigi.OptionalStrParameter(default=None, description="imagenet | path | random")
    det_epochs = luigi.OptionalIntParameter(default=None)
    det_lr = luigi.OptionalFloatParameter(default=None)
    det_lr_steps = luigi.OptionalListParameter(default=None, description="epochs after which lr drops 10x")
    det_image_min_px = luigi.OptionalIntParameter(default=None, description="shorter image side (px)")
    det_image_max_px = luigi.OptionalIntParameter(default=None, description="longer image side cap (px)")
    det_max_proposals = luigi.OptionalIntParameter(default=None)
    det_images_per_batch = luigi.OptionalIntParameter(default=None, description="images per optimizer step "
                                                                                "(split over --det-nproc processes)")
    det_bg_iou_lo = luigi.OptionalFloatParameter(default=None, description="lower IoU bound of background RoIs")
    det_pooler = luigi.OptionalStrParameter(default=None, description="roi_pool | roi_align")
    det_freeze_through = luigi.OptionalStrParameter(default=None,
                                                    description="trunk layers frozen up to and including this one "
                                                                "(efficientnet: stem, stage0..stage6; vgg16: conv1_1.."
                                                                "pool4); default: the backbone's (stage1 / pool2)")
    det_max_iters = luigi.OptionalIntParameter(default=None, description="cap on iterations per epoch (smoke runs)")
    det_workers = luigi.IntParameter(default=0, significant=False, description="DataLoader workers")
    det_nproc = luigi.IntParameter(default=1, significant=False,
                                   description="training processes (torch DDP via torchrun, one GPU each); 1: train "
                                               "in the luigi worker")
    device = luigi.Parameter(default="auto", significant=False, description="auto | cpu | cuda")
    unhashed_values = {"det_arch": "fast_rcnn",  # the detector before --det-arch existed
                       "det_freeze_through": ""}  # ... and before --det-freeze-through

    @property
    def resources(self) -> dict:
        """One unit of the machine's GPU resource, ``--det-nproc`` units for a DDP run (tasks/base.py gpu_units)."""
        return self.gpu_units(self.det_nproc)

    @property
    def uses_proposals(self) -> bool:
        """Whether the detector needs selective-search proposals (fast_rcnn) or proposes its own (faster_rcnn)."""
        return self.det_arch == "fast_rcnn"

    def requires(self):
        reqs = {"proposals": self.clone(SelectiveSearch)} if self.uses_proposals else {}
        if self.det_box_source in PSEUDO_STAGES:
            reqs["pseudo"] = self.clone(PSEUDO_STAGES[self.det_box_source])
        else:
            reqs["dataset"] = self.clone(PrepareDataset)
            if self.det_box_source in ("voc_dir", "coco") and not self.det_box_path:
                raise ValueError(f"TrainFastRCNN --det-box-source {self.det_box_source} needs --det-box-path")
        return reqs

    def training_epochs(self) -> int | None:
        """The epochs of the schedule (None: the preset's): ``--det-epochs``."""
        return self.det_epochs

    def detector_config(self) -> DetectorConfig:
        name = self.det_preset
        if name == "auto":
            name = "paper" if self.voc_root else "cpu"
        epochs = self.training_epochs()
        over = {"backbone": self.det_backbone, "weights": self.det_weights, "epochs": epochs,
                "lr": self.det_lr, "min_size": self.det_image_min_px, "max_size": self.det_image_max_px,
                "max_proposals": self.det_max_proposals, "bg_iou_lo": self.det_bg_iou_lo, "pooler": self.det_pooler,
                "freeze_through": self.det_freeze_through,
                "images_per_batch": self.det_images_per_batch,
                "lr_steps": tuple(int(s) for s in self.det_lr_steps) if self.det_lr_steps is not None else None}
        if self.det_arch == "faster_rcnn" and self.det_bg_iou_lo is None:
            over["bg_iou_lo"] = 0.0  # RPN proposals: background is everything below 0.5 (py-faster-rcnn end2end)
        cfg = preset(name, arch=self.det_arch, **{k: v for k, v in over.items() if v is not None})
        if epochs is not None and self.det_lr_steps is None:  # keep the drop at 80% of the schedule
            cfg = replace(cfg, lr_steps=(max(1, int(round(0.8 * cfg.epochs))),))
        return replace(cfg, seed=int(self.seed), num_workers=int(self.det_workers)).resolved()

    def training_boxes(self, manifest) -> pd.DataFrame:
        trainval = manifest.split("trainval")
        kw = dict(image_ids=list(trainval.image_id), classes=manifest.classes, images=trainval)
        if self.det_box_source in PSEUDO_STAGES:
            return load_training_boxes("pseudo", path=self.input_dir("pseudo") / "pseudo_labels.csv", **kw)
        if self.det_box_source == "gt":
            return load_training_boxes("gt", objects=manifest.objects, **kw)
        return load_training_boxes(self.det_box_source, path=self.det_box_path, **kw)

    def box_source_name(self) -> str:
        """What the training boxes are, for the log and report.json."""
        return self.det_box_source

    def run_stage(self, work: Path) -> None:
        manifest = self.manifest()
        cfg = self.detector_config()
        device = resolve_device(self.device)
        boxes = self.training_boxes(manifest)
        if boxes.empty:
            raise ValueError(f"TrainFastRCNN: no training boxes from box source {self.box_source_name()!r}")
        write_csv(boxes, work / "train_boxes.csv")
        trainval = manifest.split("trainval")
        images = trainval[trainval.image_id.isin(set(boxes.image_id))]
        store = ProposalStore(self.input_dir("proposals") / "proposals_trainval.h5") if self.uses_proposals else None
        dataset = DetectionDataset(images, store, manifest.classes, boxes, flip=cfg.flip, seed=cfg.seed)
        model = build_detector(manifest.classes, cfg)
        log.info("TrainFastRCNN: %s %s on %d images / %d %s boxes, %s", cfg.arch, cfg.backbone, len(images),
                 len(boxes), self.box_source_name(), device)
        t0 = time.time()
        if self.det_nproc < 1:
            raise ValueError(f"--det-nproc must be >= 1, got {self.det_nproc}")
        train_log = train_detector_distributed(model, dataset, work / "model.pth", device, nproc=self.det_nproc,
                                               max_iters_per_epoch=self.det_max_iters)
        strip_checkpoint(work / "model.pth")
        write_csv(train_log, work / "train_log.csv")
        write_json(work / "report.json", {
            "box_source": self.box_source_name(), "box_path": self.det_box_path, "images": int(len(images)),
            "boxes": int(len(boxes)), "classes": list(manifest.classes), "device": str(device),
            "processes": self.det_nproc, "seconds_this_run": round(time.time() - t0, 2),
            "seconds_training": float(train_log["seconds"].sum()),
            "s_per_iter": float(train_log["seconds"].sum() / max(1, train_log["iterations"].sum())),
            "config": cfg.to_dict()})


@inherits(TrainFastRCNN)
class EvaluateVOC07(StageTask):
    """Detections on the test split (``--eval-split``; with ``--eval-holdout N`` the N held-out trainval images)
    scored by the VOC2007 rules, and the detector's CorLoc on trainval.

    Output: ``metrics.json`` (mAP, per-class AP, CorLoc, fps, training time), ``ap_per_class.csv``,
    ``pr_curves.png``, ``detections_test.csv``, ``results/comp4_det_test_<class>.txt`` (devkit format),
    ``corloc_per_class.csv`` and ``corloc_boxes.csv`` (the detector's top-scoring box of every class in every trainval
    image, with no score threshold: CorLoc scores, per class over the images containing it, whether that box hits
    an object of the class at IoU >= 0.5), ``summary.md``.
    """

    uses_gpu = True  # luigi resource gpu_<host>: one GPU stage per machine at a time (tasks/base.py)

    eval_split = luigi.Parameter(default="test", description="the split detected on and scored")
    eval_corloc = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                      description="also detect on trainval and report the detector's CorLoc")
    eval_batch = luigi.IntParameter(default=1, significant=False, description="images per forward pass")
    eval_train_map = luigi.BoolParameter(default=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                         description="also score the detector on its own training images (those "
                                                     "with training boxes), against their ground truth: whether it "
                                                     "underfits")
    unhashed_values = {"eval_train_map": "False"}  # the evaluation before --eval-train-map existed

    @property
    def scored_split(self) -> str:
        """The split detected on and scored: ``holdout`` with ``--eval-holdout N``, else ``--eval-split``."""
        return HOLDOUT_SPLIT if self.eval_holdout else self.eval_split

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # fail before the (long) detector training, not after it, when there is nothing to evaluate on
        if self.images and not (self.eval_holdout and self.gt):
            raise ValueError("EvaluateVOC07: evaluation needs a test split with ground truth; an --images dataset "
                             "has none (its pseudo boxes come from PseudoLabels). Evaluate on a VOC root with "
                             "ImageSets/Main/test.txt")
        if self.voc_root and not self.eval_holdout and not (Path(self.voc_root) / "ImageSets" / "Main" / f"{self.eval_split}.txt").is_file():
            raise ValueError(f"EvaluateVOC07: evaluation needs a test split with ground truth; "
                             f"{Path(self.voc_root) / 'ImageSets' / 'Main' / f'{self.eval_split}.txt'} not found")

    def requires(self):
        # trainval proposals (the detector's CorLoc) and the test split's, which only evaluation computes; none for
        # a faster_rcnn
        reqs = {"detector": self.clone(TrainFastRCNN)}
        if reqs["detector"].uses_proposals:
            reqs["proposals"] = self.clone(SelectiveSearch)
            reqs["test_proposals"] = self.clone(SelectiveSearch, ss_splits=[self.scored_split])
        return reqs

    def proposals_path(self, key: str, split: str) -> Path | None:
        """The proposal store of ``split`` (``key``: the requirement holding it); None for a faster_rcnn."""
        return self.input_dir(key) / f"proposals_{split}.h5" if key in self.requires() else None

    def run_stage(self, work: Path) -> None:
        manifest = self.manifest()
        device = resolve_device(self.device)
        det_dir = self.input_dir("detector")
        model = load_detector(det_dir / "model.pth", device)
        split = self.scored_split
        test = manifest.split(split)
        if test.empty:
            raise ValueError(f"EvaluateVOC07: the dataset has no images in split {split!r}")
        common = dict(device=device, batch_size=self.eval_batch)
        trainval = self.proposals_path("proposals", "trainval")
        table, metrics = evaluate_split(model, test, self.proposals_path("test_proposals", split), manifest.objects,
                                        manifest.classes, work, split=split, **common)
        metrics["split"] = split
        if self.eval_corloc:
            metrics.update(detector_corloc(model, manifest.split("trainval"), trainval, manifest.objects,
                                           manifest.classes, work, **common))
        if self.eval_train_map:
            ids = set(pd.read_csv(det_dir / "train_boxes.csv", dtype={"image_id": str}).image_id)
            tv = manifest.split("trainval")
            _, train = evaluate_split(model, tv[tv.image_id.isin(ids)], trainval, manifest.objects, manifest.classes,
                                      work / "train_images", split="trainval", **common)
            metrics["train_images"] = {k: train[k] for k in ("mAP", "mAP_all_point", "test_images", "detections")}
        train_report = read_json(det_dir / "report.json")
        metrics["training"] = {k: train_report.get(k) for k in ("box_source", "images", "boxes", "device",
                                                                  "seconds_training", "s_per_iter")}
        metrics["detector"] = train_report.get("config")
        write_json(work / "metrics.json", metrics)
        write_text(work / "summary.md", summary_markdown(table, metrics))
        log.info("EvaluateVOC07 on %s: mAP %.1f (11-point), %.1f (all-point)%s, %.2f images/s", split,
                 100 * metrics["mAP"], 100 * metrics["mAP_all_point"], f", CorLoc {100 * metrics['corloc']:.1f}" if self.eval_corloc
                 else "", metrics["test"]["fps"])


# --------------------------------------------------------------------------------------------- comparison
#: detectors compared by CompareDetectors: name -> parameter overrides of EvaluateVOC07 (upstream ones included)
COMPARE_VARIANTS: dict[str, dict] = {
    "pseudo_sacam": {"det_box_source": "pseudo", "cam_method": "sacam"},
    "pseudo_gradcam": {"det_box_source": "pseudo", "cam_method": "gradcam"},
    "pseudo_image_labels": {"det_box_source": "pseudo", "classifier_mode": "image_labels"},
    "pseudo_gmp": {"det_box_source": "image_extent", "cam_network": "gmp"},
    "pseudo_spam": {"det_box_source": "image_extent", "cam_network": "spam"},
    "ground_truth": {"det_box_source": "gt"},
}


@inherits(EvaluateVOC07)
class CompareDetectors(StageTask):
    """Detectors trained on SA-CAM / Grad-CAM / image-label-only (full-image CAM; GMP and SPAM networks with seed
    003's boxes) pseudo labels and on ground truth, evaluated alike; ``comparison.csv`` and ``summary.md`` give mAP,
    CorLoc and the ratio of each mAP to the GT one."""

    compare_variants = luigi.ListParameter(default=list(COMPARE_VARIANTS), description="which of COMPARE_VARIANTS")

    def requires(self):
        out = {}
        names = set(self.get_param_names())
        for v in self.compare_variants:
            if v not in COMPARE_VARIANTS:
                raise ValueError(f"CompareDetectors: unknown variant {v!r}; choose from {list(COMPARE_VARIANTS)}")
            over = {k: val for k, val in COMPARE_VARIANTS[v].items() if k in names}
            missing = set(COMPARE_VARIANTS[v]) - set(over)
            if missing:
                raise ValueError(f"CompareDetectors: variant {v!r} needs parameters {sorted(missing)} that the "
                                 f"pipeline does not have")
            out[v] = self.clone(EvaluateVOC07, **over)
        return out

    def run_stage(self, work: Path) -> None:
        rows = []
        for v in self.compare_variants:
            m = read_json(self.input_dir(v) / "metrics.json")
            rows.append({"variant": v, "mAP": m["mAP"], "mAP_all_point": m["mAP_all_point"],
                         "corloc": m.get("corloc", float("nan")),
                         "train_seconds": m.get("training", {}).get("seconds_training"),
                         "test_fps": m["test"]["fps"], "output": str(self.input_dir(v))})
        df = pd.DataFrame(rows)
        gt = df.loc[df.variant == "ground_truth", "mAP"]
        df["ratio_to_gt"] = df["mAP"] / float(gt.iloc[0]) if len(gt) and gt.iloc[0] > 0 else np.nan
        write_csv(df, work / "comparison.csv")
        lines = ["# Detectors compared (VOC2007 11-point mAP on the test split)", "",
                 "| variant | mAP | mAP / GT mAP | CorLoc (trainval) | training s | test images/s |",
                 "|---|---:|---:|---:|---:|---:|"]
        for r in df.itertuples(index=False):
            ratio = "n/a" if np.isnan(r.ratio_to_gt) else f"{r.ratio_to_gt:.3f}"
            lines.append(f"| {r.variant} | {pct(r.mAP)} | {ratio} | {pct(r.corloc)} | "
                         f"{(r.train_seconds or float('nan')):.0f} | {r.test_fps:.2f} |")
        write_text(work / "summary.md", "\n".join(lines) + "\n")
        log.info("CompareDetectors:\n%s", "\n".join(lines))
