"""Re-localisation rounds (seed 001's deep MIL): detectors trained on the pseudo boxes move each box, by folds.

    pseudo-box stage (round 0: FusePseudoBoxes | MILBoxes | ProposalFreeBoxes)
      -> RelocalizeDetector (round 1, one per fold) -> RelocalizeBoxes (round 1)
      -> RelocalizeDetector (round 2, one per fold) -> RelocalizeBoxes (round 2) -> ...   (PseudoLabels
         --relocalize-rounds N takes round N's boxes)

``RelocalizeDetector`` is ``TrainFastRCNN`` (every ``--det-*`` parameter, the same training) on the boxes of the
previous round, restricted to the images outside its fold (pipeline.relocalize.fold_assignment, seeded with
``--data-seed``), for ``--relocalize-det-epochs``; ``RelocalizeBoxes`` runs each fold's detector on its own fold's
images and picks each click's box (pipeline/relocalize.py). Every round and every fold's detector is its own
parameter-hashed stage, so a killed round resumes: finished detectors are reused, a detector in training resumes
from its last epoch's checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import luigi
import luigi.util
import pandas as pd

from pipeline.detector import load_detector, load_training_boxes
from pipeline.device import resolve_device
from pipeline.export import export_pseudo_labels, read_pseudo_labels
from pipeline.io import read_json, write_csv, write_json, write_text
from pipeline.proposals import ProposalStore
from pipeline.relocalize import (RelocalizeParams, fold_assignment, relocalize_round, round_row, rounds_markdown,
                                 training_image_ids)

from .base import StageTask, inherits
from .detector import TrainFastRCNN
from .mil import MILBoxes
from .proposal_free import ProposalFreeBoxes
from .proposals import SelectiveSearch
from .pseudo import FusePseudoBoxes

log = logging.getLogger("clickscale")

#: the pseudo-box stage of each ``--box-method``
BOX_STAGES = {"cam": FusePseudoBoxes, "mil": MILBoxes}
#: ``--proposals``: selective_search (the chain above) or none (whole-image CAMs, tasks/proposal_free.py)
PROPOSALS = ("selective_search", "none")


class BoxSource:
    """Parameter mixin: which stage gives the pseudo boxes (round 0): ``--box-method`` and ``--proposals``."""

    box_method = luigi.ChoiceParameter(choices=list(BOX_STAGES), default="cam",
                                       description="cam: SA-CAM boxes (FusePseudoBoxes, the default); mil: "
                                                   "click-supervised MIL (MILBoxes, paper 001)")
    proposals = luigi.ChoiceParameter(choices=list(PROPOSALS), default="selective_search",
                                      description="none: no selective search and no stage 2; each click's box from "
                                                  "the whole-image map of its class (ProposalFreeBoxes, "
                                                  "--cam-network), with --box-method cam")

    def box_stage(self) -> luigi.Task:
        """The pseudo-box stage of ``--box-method`` / ``--proposals`` (round 0)."""
        if self.proposals == "none":
            return self.clone(ProposalFreeBoxes)
        return self.clone(BOX_STAGES[self.box_method])

    def boxes_of_round(self, k: int) -> luigi.Task:
        """The stage whose ``pseudo_labels.csv`` holds round ``k``'s boxes (0: the pseudo-box stage's)."""
        return self.box_stage() if k == 0 else self.clone(RelocalizeBoxes, relocalize_round=k)

    def image_folds(self, manifest) -> pd.Series:
        """The fold of every clicked trainval image (pipeline.relocalize.fold_assignment, ``--data-seed``)."""
        trainval = manifest.split("trainval")
        clicked = set(manifest.clicks["image_id"].astype(str))
        return fold_assignment([i for i in trainval["image_id"].astype(str) if i in clicked], self.relocalize_folds,
                               self.data_seed)


@inherits(MILBoxes, ProposalFreeBoxes)
class RelocalizeDetector(BoxSource, TrainFastRCNN):
    """``TrainFastRCNN`` on round ``relocalize_round - 1``'s pseudo boxes of the images outside fold
    ``relocalize_fold``: the detector that re-localises that fold's boxes in round ``relocalize_round``. Output as
    TrainFastRCNN's (``model.pth``, ``train_log.csv``, ``train_boxes.csv``: the images it trained on,
    ``report.json``); a killed run resumes from its last epoch."""

    relocalize_round = luigi.IntParameter(default=1, description="the round this detector re-localises (>= 1); it "
                                                                 "trains on the previous round's boxes")
    relocalize_fold = luigi.IntParameter(default=0, description="the fold this detector re-localises; it trains on "
                                                                "the other folds' images")
    relocalize_folds = luigi.IntParameter(default=2, description="image folds (>= 2): each fold's boxes are "
                                                                 "re-localised by a detector trained on the other "
                                                                 "folds' images (assigned with --data-seed)")
    relocalize_det_epochs = luigi.IntParameter(default=6, description="epochs of each fold's detector (the lr "
                                                                      "drops after four fifths of them unless "
                                                                      "--det-lr-steps); the other --det-* "
                                                                      "parameters as TrainFastRCNN")
    relocalize_det_labels = luigi.ChoiceParameter(choices=["pseudo", "gt"], default="pseudo",
                                                  description="what the fold detectors train on: pseudo (the previous "
                                                              "round's boxes) or gt (the ground truth of the same "
                                                              "images: an upper bound, to diagnose a round, not a "
                                                              "method)")
    #: TrainFastRCNN parameters this stage does not read: its boxes are the previous round's, its epochs
    #: --relocalize-det-epochs (left out of its hash, so they do not move it)
    unread = ("det_box_source", "det_box_path", "det_epochs")
    unhashed_values = {**TrainFastRCNN.unhashed_values, "relocalize_det_labels": "pseudo"}  # the stage before it

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.relocalize_round < 1 or not 0 <= self.relocalize_fold < self.relocalize_folds:
            raise ValueError(f"RelocalizeDetector: need round >= 1 (got {self.relocalize_round}) and 0 <= fold < "
                             f"folds (got fold {self.relocalize_fold} of {self.relocalize_folds})")
        if self.relocalize_det_epochs < 1:
            raise ValueError(f"--relocalize-det-epochs must be >= 1, got {self.relocalize_det_epochs}")
        if self.proposals == "none" and self.uses_proposals:
            raise ValueError("re-localisation with --proposals none needs a detector without selective search: "
                             "--det-arch faster_rcnn")

    def significant_params(self) -> dict:
        return {k: v for k, v in super().significant_params().items() if k not in self.unread}

    def training_epochs(self) -> int:
        return self.relocalize_det_epochs

    def requires(self):
        reqs = {"proposals": self.clone(SelectiveSearch)} if self.uses_proposals else {}
        reqs["pseudo"] = self.boxes_of_round(self.relocalize_round - 1)
        return reqs

    def box_source_name(self) -> str:
        return "gt" if self.relocalize_det_labels == "gt" else f"pseudo (round {self.relocalize_round - 1})"

    def training_boxes(self, manifest) -> pd.DataFrame:
        trainval = manifest.split("trainval")
        ids = training_image_ids(self.image_folds(manifest), self.relocalize_fold)
        if self.relocalize_det_labels == "gt":  # no ground truth: TrainFastRCNN's "no training boxes" error
            return load_training_boxes("gt", objects=manifest.objects, image_ids=ids, classes=manifest.classes,
                                       images=trainval)
        return load_training_boxes("pseudo", path=self.input_dir("pseudo") / "pseudo_labels.csv", image_ids=ids,
                                   classes=manifest.classes, images=trainval)


@inherits(RelocalizeDetector, without=("relocalize_fold",))
class RelocalizeBoxes(BoxSource, StageTask):
    """Round ``relocalize_round`` of re-localisation: each fold's ``RelocalizeDetector`` detects on its fold's images
    and each click takes its best detection, or keeps its input box (pipeline/relocalize.py). Output: the files of
    FusePseudoBoxes (``pseudo_labels.csv`` with ``relocalized``, ``moved``, ``fold``, ``det_score``, ``s_bc``,
    ``s_ba``; ``Annotations/``, ``coco.json``, ``metrics.json``, ``per_class.csv``, ``summary.md`` with the
    per-round table, ``report/index.html``), ``detections.csv`` (the candidates, with their fold) and
    ``relocalize.json`` (the counts, the detectors, every round's row)."""

    uses_gpu = True  # the detectors' forward passes run on CUDA when present

    relocalize_round = luigi.IntParameter(default=1, description="the round (>= 1); it re-localises the previous "
                                                                 "round's boxes (round 0: the pseudo-box stage's)")
    relocalize_min_score = luigi.FloatParameter(default=0.5, description="a detection scoring below this is not "
                                                                         "confident: a click without a confident "
                                                                         "detection of its class around it keeps "
                                                                         "its box")
    relocalize_sigma_bc = luigi.FloatParameter(default=0.15, description="sigma of the box-center score (center "
                                                                         "distance to the click / sqrt(box area)), "
                                                                         "as --mil-sigma-bc")
    relocalize_nms = luigi.FloatParameter(default=1.0, description="per-class NMS IoU of the candidate detections; "
                                                                   "1: none (every regressed proposal competes)")
    # the export settings of FusePseudoBoxes (the same parameter objects, as MILBoxes)
    metrics_difficult = FusePseudoBoxes.metrics_difficult
    report_images = FusePseudoBoxes.report_images
    report_worst = FusePseudoBoxes.report_worst

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.relocalize_round < 1:
            raise ValueError(f"RelocalizeBoxes: the round must be >= 1, got {self.relocalize_round}")
        self.relocalize_params()  # bad values fail here, before any detector trains
        self.detectors()

    def relocalize_params(self) -> RelocalizeParams:
        return RelocalizeParams(folds=self.relocalize_folds, min_score=self.relocalize_min_score,
                                sigma_bc=self.relocalize_sigma_bc, nms=self.relocalize_nms)

    def detectors(self) -> dict[str, luigi.Task]:
        return {f"fold{f}": self.clone(RelocalizeDetector, relocalize_fold=f) for f in range(self.relocalize_folds)}

    def requires(self):
        reqs = {**self.detectors(), "input": self.boxes_of_round(self.relocalize_round - 1)}
        if reqs["fold0"].uses_proposals:
            reqs["proposals"] = self.clone(SelectiveSearch)
        return reqs

    def earlier_rounds(self, boxes_in: pd.DataFrame) -> list[dict]:
        """The per-round rows up to the input round (round 0 from the pseudo-box stage's metrics.json)."""
        if self.relocalize_round > 1:
            return read_json(self.input_dir("input") / "relocalize.json")["rounds"]
        metrics = read_json(self.input_dir("input") / "metrics.json").get("metrics")
        return [round_row(0, boxes_in, metrics, None)]

    def fold_detectors(self) -> tuple[dict[int, Path], dict[int, set[str]]]:
        """Each fold's detector directory and the images it trained on (its ``train_boxes.csv``)."""
        dirs = {int(k[len("fold"):]): self.input_dir(k) for k in self.detectors()}
        return dirs, {f: set(pd.read_csv(d / "train_boxes.csv", dtype={"image_id": str}).image_id)
                      for f, d in dirs.items()}

    def run_stage(self, work: Path) -> None:
        manifest, params, device = self.manifest(), self.relocalize_params(), resolve_device(self.device)
        trainval, folds = manifest.split("trainval"), self.image_folds(manifest)
        boxes_in = read_pseudo_labels(self.input_dir("input") / "pseudo_labels.csv")
        dirs, trained_on = self.fold_detectors()
        with (ProposalStore(self.input_dir("proposals") / "proposals_trainval.h5") if "proposals" in self.requires()
              else contextlib.nullcontext()) as proposals:
            boxes, dets, report = relocalize_round(manifest.clicks, boxes_in, trainval, folds,
                                                   lambda f: load_detector(dirs[f] / "model.pth", device), proposals,
                                                   params, device, trained_on=trained_on)
        write_csv(dets, work / "detections.csv")
        counts = {k: report[k] for k in ("relocalized", "kept", "moved")}
        earlier = self.earlier_rounds(boxes_in)  # (also in the report's parameters)
        result = export_pseudo_labels(
            work, boxes, trainval[trainval["image_id"].isin(set(boxes["image_id"]))], manifest.classes,
            objects=manifest.objects[manifest.objects["image_id"].isin(set(trainval["image_id"]))],
            clicks=manifest.clicks, params={"box_method": "relocalize", "round": self.relocalize_round,
                                            **params.as_dict(), **counts, "input": str(self.input_dir("input")),
                                            "earlier_rounds": earlier},
            report_images=self.report_images, report_worst=self.report_worst, seed=self.seed,
            difficult=self.metrics_difficult)
        rounds = [*earlier, round_row(self.relocalize_round, boxes, result.get("metrics"), report)]
        write_json(work / "relocalize.json", {
            **report, "round": self.relocalize_round, "rounds": rounds,
            "detectors": {str(f): str(d) for f, d in dirs.items()},
            "fold_images": {str(f): int(n) for f, n in folds.value_counts().sort_index().items()}})
        write_text(work / "summary.md", (work / "summary.md").read_text() + "\nRe-localisation rounds (round 0: the "
                   "input pseudo boxes):\n\n" + rounds_markdown(rounds) + "\n")
        log.info("RelocalizeBoxes round %d: %d re-localised (%d moved), %d kept their box", self.relocalize_round,
                 report["relocalized"], report["moved"], report["kept"])


# a detector of round k + 1 requires round k's RelocalizeBoxes: it carries that stage's parameters (inherited, so
# not in its hash: they reach it through that stage's ref)
luigi.util.inherits(RelocalizeBoxes)(RelocalizeDetector)
