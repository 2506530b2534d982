"""Click-supervised MIL (paper 001, Papadopoulos et al.) as a pseudo-box source, beside the CAM stages:

    PrepareDataset + SelectiveSearch + TrainClassifier -> MILBoxes      (PseudoLabels --box-method mil)

One box per click among the proposals containing it, by an appearance model (a linear classifier on the crop
classifier's features) times the box-center score (times the box-area score with two clicks), re-trained and
re-localised over a few rounds with multi-folding (pipeline/mil.py; docs/method.md). Writes the same files as
FusePseudoBoxes (pipeline.export.export_pseudo_labels) and ``mil.json`` (the run's MIL report).
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import luigi
from tqdm import tqdm

from pipeline.classifier import load_classifier
from pipeline.device import resolve_device
from pipeline.export import export_pseudo_labels
from pipeline.io import write_json
from pipeline.mil import CENTER_NORMS, MILParams, build_mil_data, mil_boxes
from pipeline.proposals import ProposalStore

from .base import StageTask, inherits
from .classifier import TrainClassifier
from .dataset import PrepareDataset
from .proposals import SelectiveSearch
from .pseudo import FusePseudoBoxes

log = logging.getLogger("clickscale")


@inherits(TrainClassifier)
class MILBoxes(StageTask):
    """One pseudo box per click by click-supervised MIL (:mod:`pipeline.mil`). Output: ``pseudo_labels.csv`` (with
    the chosen box's ``p_app``, ``s_bc`` and ``s_ba``), ``Annotations/``, ``coco.json``, ``metrics.json``,
    ``per_class.csv`` (with ground truth), ``summary.md``, ``report/index.html`` and ``mil.json``."""

    uses_gpu = True  # the backbone's forward per image runs on CUDA when present

    mil_rounds = luigi.IntParameter(default=3, description="re-training / re-localisation rounds")
    mil_folds = luigi.IntParameter(default=10, description="image folds: each fold's clicks are re-localised by "
                                                           "a model trained on the other folds' images")
    mil_sigma_bc = luigi.FloatParameter(default=0.15, description="sigma of the box-center score, in units of "
                                                                  "--mil-center-norm")
    mil_center_norm = luigi.ChoiceParameter(choices=list(CENTER_NORMS), default="sqrt_area",
                                            description="the center-to-click distance divided by sqrt(proposal "
                                                        "area) or by the image diagonal")
    mil_max_candidates = luigi.IntParameter(default=200, description="proposals per click (those containing it, "
                                                                     "nearest centers first)")
    mil_negatives_per_image = luigi.IntParameter(default=50, description="seeded sample of each image's proposals: "
                                                                         "negatives of the classes not clicked in it")
    mil_l2 = luigi.FloatParameter(default=1e-4, description="L2 penalty of the linear appearance model")
    mil_max_iter = luigi.IntParameter(default=50, description="L-BFGS iterations per model fit")
    mil_image_side_px = luigi.IntParameter(default=480, description="longest image side of the feature forward (px)")
    mil_layer = luigi.Parameter(default="", description="feature layer; empty: the deepest convolutional layer "
                                                        "(efficientnet conv_head)")
    mil_pca_dims = luigi.IntParameter(default=256, description="features projected on this many principal axes "
                                                               "of the negative sample; 0: none")
    mil_area_folds = luigi.IntParameter(default=5, description="two clicks: image folds of the cross-fitted area "
                                                               "model")
    mil_area_slope = luigi.FloatParameter(default=2.0, description="two clicks: slope of the area model's log area "
                                                                   "on log pair distance (2: click errors "
                                                                   "proportional to the object's side); 0: fitted")
    # the export settings of FusePseudoBoxes (the same parameter objects: PseudoLabels passes one value to either)
    metrics_difficult = FusePseudoBoxes.metrics_difficult
    report_images = FusePseudoBoxes.report_images
    report_worst = FusePseudoBoxes.report_worst

    def requires(self):
        return {"dataset": self.clone(PrepareDataset), "proposals": self.clone(SelectiveSearch),
                "classifier": self.clone(TrainClassifier)}

    def mil_params(self) -> MILParams:
        return MILParams(rounds=self.mil_rounds, folds=self.mil_folds, sigma_bc=self.mil_sigma_bc,
                         center_norm=self.mil_center_norm, max_candidates=self.mil_max_candidates,
                         negatives_per_image=self.mil_negatives_per_image, l2=self.mil_l2, max_iter=self.mil_max_iter,
                         image_side=self.mil_image_side_px, layer=self.mil_layer, pca_dims=self.mil_pca_dims,
                         area_folds=self.mil_area_folds, area_slope=self.mil_area_slope or None, seed=self.seed)

    def run_stage(self, work: Path) -> None:
        params, manifest = self.mil_params(), self.manifest()
        trainval = manifest.split("trainval")
        model = load_classifier(self.input_dir("classifier") / "model.pt", resolve_device(self.device))
        with ProposalStore(self.input_dir("proposals") / "proposals_trainval.h5") as store:
            data = build_mil_data(model, manifest.clicks, trainval, store, manifest.classes, params,
                                  progress=partial(tqdm, desc="MIL features", leave=False))
        boxes, report = mil_boxes(data, params, progress=partial(tqdm, desc="MIL rounds", leave=False))
        write_json(work / "mil.json", {**report, "classifier": str(self.input_dir("classifier"))})
        images = trainval[trainval["image_id"].isin(set(boxes["image_id"]))]
        result = export_pseudo_labels(
            work, boxes, images, manifest.classes,
            objects=manifest.objects[manifest.objects["image_id"].isin(set(trainval["image_id"]))],
            clicks=manifest.clicks, params={"box_method": "mil", **params.as_dict(),
                                            "difficult": self.metrics_difficult,
                                            "classifier": str(self.input_dir("classifier"))},
            report_images=self.report_images, report_worst=self.report_worst, seed=self.seed,
            difficult=self.metrics_difficult)
        m = result.get("metrics")
        log.info("MILBoxes: %d boxes, %d without a proposal, rounds changed %s%s", len(boxes),
                 report["no_proposal"], report["changed_per_round"],
                 f"; CorLoc {100 * m['corloc']:.1f}, box-CorLoc {100 * m['box_accuracy']:.1f}, "
                 f"mean IoU {100 * m['mean_iou']:.1f}" if m else "")
