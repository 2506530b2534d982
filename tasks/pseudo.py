"""Stage 5: fused CAMs -> one pseudo box per click, its exports, metrics and report.

    GenerateCAMs (one per backbone: the classifier's and each --cam-ensemble backbone's, each computing all the
        layers of --cam-layers in one pass) + SelectProposals -> FusePseudoBoxes

The box parameters carry a ``box_`` prefix; ``cam_layers`` (GenerateCAMs' parameter: the layers whose maps are
averaged) and ``cam_ensemble`` choose the GenerateCAMs stages (this stage resolves ``cam_layers`` per backbone and
passes the explicit list on to each GenerateCAMs, so their outputs name the layers they hold).
"""
from __future__ import annotations

import logging
from pathlib import Path

import luigi
import pandas as pd
from tqdm import tqdm

from pipeline.backbones import BACKBONES
from pipeline.bcct import with_bc_masks
from pipeline.boxes import (PARTITION_MODES, SCORE_MODES, SYMMETRY_MODES, THRESHOLD_RULES, BoxParams,
                            classes_per_image, pseudo_boxes_and_candidates, rank1_proposals)
from pipeline.cam import CamStore, FusedMaps
from pipeline.clickpairs import (AREA_THRESHOLDS, TooFewPairs, choose_by_area, choose_by_extent,
                                 choose_by_learned_extent, reference_areas, reference_boxes)
from pipeline.dataset import read_ground_truth
from pipeline.export import export_pseudo_labels

from .base import StageTask, inherits
from .bcct import BCMaps
from .cams import GenerateCAMs
from .defaults import TUNED
from .proposals import SelectProposals

log = logging.getLogger("clickscale")


@inherits(GenerateCAMs, BCMaps)
class FusePseudoBoxes(StageTask):
    """One pseudo box per click from its fused CAM (pipeline/boxes.py), rank-1 proposal as counted fallback.

    Output: ``pseudo_labels.csv``, ``Annotations/`` (VOC XML), ``coco.json``, ``metrics.json``, ``per_class.csv``
    (with ground truth), ``summary.md`` and ``report/index.html``.
    """

    #: parameters added later, at the values that give the earlier outputs (tasks/base.py)
    unhashed_values = {"box_bc_mask": "off", "box_bc_delta": "0.8", "box_bc_sigma": "0.01"}

    # defaults chosen on bench/quality.py (voc07-sample, efficientnet_lite0): tasks/defaults.py
    box_threshold_rule = luigi.ChoiceParameter(choices=list(THRESHOLD_RULES), default=TUNED.box_threshold_rule,
                                               description="fixed: --box-threshold on the 0..255 map; paper: T_cam "
                                                           "80 (<2 image classes) / 120; fraction: of the max")
    box_threshold = luigi.OptionalFloatParameter(default=TUNED.box_threshold,
                                                 description="T_cam of the fixed (0..255) / fraction (0..1) rules")
    box_symmetry = luigi.ChoiceParameter(choices=list(SYMMETRY_MODES), default=TUNED.box_symmetry,
                                         description="half-extents about the click: max/mean/min of the two sides; "
                                                     "none: the region's own box")
    box_score = luigi.ChoiceParameter(choices=list(SCORE_MODES), default=TUNED.box_score,
                                      description="confidence of a pseudo box")
    box_min_px = luigi.FloatParameter(default=TUNED.box_min_px,
                                      description="boxes with a shorter side fall back to the proposal (px)")
    box_partition = luigi.ChoiceParameter(choices=list(PARTITION_MODES), default=TUNED.box_partition,
                                          description="keep each click's map on the pixels nearer to it than to the "
                                                      "image's other clicks of its class (same_class), of any class "
                                                      "(all), or not at all (none, the paper)")
    cam_ensemble = luigi.Parameter(default="", description="comma-separated further classifier backbones (e.g. "
                                                           "efficientnet_lite1,efficientnet_lite2): each trains "
                                                           "its own classifier and CAMs, and a click's fused maps, "
                                                           "each scaled to max 1, are averaged before the threshold "
                                                           "(measured: docs/experiments.md)")
    box_area_prior = luigi.ChoiceParameter(choices=["auto", "off", "on", "axes", "learned"], default="auto",
                                           description="with --clicks-per-object 2: T_cam per click (auto: learned "
                                                       "with two clicks, off with one). on: the box "
                                                       "whose area best matches the click pair's distance, weighed "
                                                       "against the default box; axes: the box most probable "
                                                       "given the pair's x and y differences (click error "
                                                       "proportional to the object's side along each axis) and "
                                                       "the default box; learned: as axes, with a prior on each "
                                                       "side learned across images from the click pairs (default "
                                                       "box, class, crowding) (docs/method.md, two clicks)")
    box_area_map_sigma = luigi.FloatParameter(default=0.5, description="log-area spread trusted to the default "
                                                                       "box against the pair's estimate")
    box_area_calibration = luigi.Parameter(default="", description="ground truth of a few images (VOC "
                                                                   "Annotations/ folder or COCO JSON) to fit the "
                                                                   "area model on; empty: self-calibrated")
    box_bc_mask = luigi.ChoiceParameter(choices=["off", "on"], default="off",
                                        description="seed 002: within the click's cell, the BC model's foreground "
                                                    "mask component holding the click takes the fused map's "
                                                    "maximum before the threshold (BackgroundSet -> TrainBC -> "
                                                    "BCMaps; docs/method.md)")
    box_bc_delta = luigi.FloatParameter(default=0.8, description="Eq. 2's delta: the BC mask is the gradient map "
                                                                 ">= delta x its maximum in the cell")
    box_bc_sigma = luigi.FloatParameter(default=0.01, description="Gaussian smoothing of the BC gradient map before "
                                                                  "Eq. 2, as a fraction of the image's longer side "
                                                                  "(0: none)")
    metrics_difficult = luigi.ChoiceParameter(choices=["include", "exclude"], default="include",
                                              description="how difficult ground truths count in the metrics")
    report_images = luigi.IntParameter(default=24, significant=False, description="clicks drawn in the report")
    report_worst = luigi.IntParameter(default=3, significant=False, description="worst boxes drawn per class")

    def image_label_mode(self) -> bool:
        """The paper's image-label-only baseline: whole-image CAMs, no clicks, no proposals to fall back to."""
        return getattr(self, "classifier_mode", "crops") == "image_labels"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ensemble_backbones()  # a bad --cam-ensemble fails here, at creation, before any stage runs
        self.fused_layers(self.classifier_backbone)
        if self.box_bc_mask == "on" and self.image_label_mode():
            raise ValueError("--box-bc-mask on acts on click maps; it does not apply to classifier_mode=image_labels")
        if self.box_area_prior not in ("auto", "off") and self.clicks_per_object != "2":
            raise ValueError(f"--box-area-prior {self.box_area_prior} needs two clicks per object "
                             "(--clicks-per-object 2)")

    def area_prior(self) -> str:
        """``--box-area-prior`` resolved: ``auto`` is ``learned`` with two clicks per object, ``off`` with one."""
        if self.box_area_prior == "auto":
            return "learned" if self.clicks_per_object == "2" else "off"
        return self.box_area_prior

    def significant_params(self) -> dict:
        """The area prior enters the hash as resolved (``auto`` with one click is the earlier ``off``)."""
        return {**super().significant_params(), "box_area_prior": self.area_prior()}

    def fused_layers(self, backbone: str) -> list[str]:
        """The CAM layers whose maps are averaged for ``backbone``: ``--cam-layers`` (comma-separated), or the
        backbone's ``TUNED.cam_layers`` (tasks/defaults.py)."""
        layers = [x.strip() for x in self.cam_layers.split(",") if x.strip()]
        if len(set(layers)) != len(layers):
            raise ValueError(f"--cam-layers {self.cam_layers!r}: each layer once")
        return layers or list(TUNED.cam_layers.get(backbone, ("",)))

    def cam_stages(self) -> dict[str, luigi.Task]:
        """One GenerateCAMs per backbone, computing all of its fused layers in one pass: ``cams`` (the classifier)
        and ``cams:<backbone>`` for the ``--cam-ensemble`` members."""
        stages = {}
        for b in [self.classifier_backbone, *self.ensemble_backbones()]:
            key = "cams" if b == self.classifier_backbone else f"cams:{b}"
            stages[key] = self.clone(GenerateCAMs, classifier_backbone=b,
                                     cam_layers=",".join(x for x in self.fused_layers(b) if x))
        return stages

    def map_readers(self) -> list[CamStore]:
        """One reader per (backbone, layer), in the order the maps are averaged: the main backbone's layers, then
        each ensemble member's."""
        readers = []
        for key, task in self.cam_stages().items():
            store = CamStore(self.input_dir(key))
            layers = [x for x in task.cam_layers.split(",") if x] or store.layers[:1]
            missing = [x for x in layers if x not in store.layers]
            if missing:
                raise ValueError(f"{store.dir}: the CAM store holds layers {store.layers}, not {missing}")
            readers += [store.with_layer(layer) for layer in layers]
        return readers

    def ensemble_backbones(self) -> list[str]:
        """The ``cam_ensemble`` backbones, checked: known, distinct, not the main one, click CAMs only."""
        names = [b.strip() for b in self.cam_ensemble.split(",") if b.strip()]
        if not names:
            return []
        if self.image_label_mode():
            raise ValueError("--cam-ensemble averages click CAMs; it does not apply to classifier_mode=image_labels")
        unknown = [b for b in names if b not in BACKBONES]
        if unknown:
            raise ValueError(f"--cam-ensemble: unknown backbone(s) {unknown}; choose from {list(BACKBONES)}")
        if len(set(names)) != len(names) or self.classifier_backbone in names:
            raise ValueError(f"--cam-ensemble {self.cam_ensemble!r}: each backbone once, and not the main "
                             f"--classifier-backbone {self.classifier_backbone!r}")
        return names

    def requires(self):
        reqs = dict(self.cam_stages())  # the same chain per ensemble backbone
        if not self.image_label_mode():
            reqs["selected"] = self.clone(SelectProposals)
        if self.box_bc_mask == "on":
            reqs["bc"] = self.clone(BCMaps)
        return reqs

    def bc_masked(self, items, clicks: pd.DataFrame, stats: dict):
        """``--box-bc-mask on``: the items with each click's BC mask component spread over
        (:func:`pipeline.bcct.with_bc_masks`); else the items as they are."""
        if self.box_bc_mask != "on":
            return items
        stats.update(store=str(self.input_dir("bc")), background_set=str(
            Path(self.find_upstream("BackgroundSet").output().path) / "index.html"))
        return with_bc_masks(items, self.input_dir("bc"), clicks, self.box_partition, self.box_bc_delta,
                             self.box_bc_sigma, stats)

    def box_params(self) -> BoxParams:
        return BoxParams(self.box_threshold_rule, self.box_threshold, self.box_symmetry, self.box_score,
                         self.box_min_px, self.box_partition)

    def fallback_boxes(self) -> tuple[Path | None, pd.DataFrame]:
        """``(selected.parquet or None, each click's rank-1 proposal)``: the fallback box of a click without one
        from its map (none in the image-label-only mode, which falls back to the whole image)."""
        if "selected" not in self.requires():
            return None, rank1_proposals(pd.DataFrame(columns=["click_id", "rank", "x1", "y1", "x2", "y2"]))
        path = self.input_dir("selected") / "selected.parquet"
        return path, rank1_proposals(pd.read_parquet(path))

    def export_params(self, params: BoxParams, selected_path: Path | None, partial: int, n_maps: int) -> dict:
        """The parameters recorded in metrics.json and the report."""
        cam_dirs = {k: str(self.input_dir(k)) for k in self.cam_stages()}
        return {**params.as_dict(), "difficult": self.metrics_difficult, "cams": cam_dirs["cams"],
                "cam_layers": {b: self.fused_layers(b) for b in [self.classifier_backbone, *self.ensemble_backbones()]},
                "selected": str(selected_path) if selected_path else None,
                **({"cam_stores": cam_dirs} if len(cam_dirs) > 1 else {}),
                **({"stores_partial": partial} if n_maps > 1 else {})}

    def area_choice(self, boxes: pd.DataFrame, candidates: pd.DataFrame, clicks: pd.DataFrame,
                    trainval: pd.DataFrame, sizes: dict) -> tuple[pd.DataFrame, dict]:
        """``--box-area-prior on`` / ``axes`` / ``learned``: each paired click's T_cam by
        :func:`pipeline.clickpairs.choose_by_area` / :func:`~pipeline.clickpairs.choose_by_extent` /
        :func:`~pipeline.clickpairs.choose_by_learned_extent`, the model fitted on ``--box-area-calibration``'s boxes or
        self-calibrated; else ``boxes`` as they are. ``sizes``: image id -> (width, height)."""
        prior = self.area_prior()
        if prior == "off":
            return boxes, {}
        truth = (read_ground_truth(self.box_area_calibration, trainval, partial=True)
                 if self.box_area_calibration else None)
        sides = None if truth is None or prior == "on" else reference_boxes(clicks, truth)
        fallback = {}
        if prior == "learned":
            try:
                chosen, report = choose_by_learned_extent(boxes, candidates, clicks, sides, image_sizes=sizes)
            except TooFewPairs as e:
                if self.box_area_prior != "auto":
                    raise
                # the default on data too small for the learned prior: the default-box prior, said and counted
                log.warning("FusePseudoBoxes: %s; falling back to --box-area-prior axes", e)
                prior, fallback = "axes", {"fallback_from": "learned", "why": str(e)}
            else:
                log.info("FusePseudoBoxes: learned extent prior on %d paired clicks (%s; k %s), %d changed T_cam",
                         report["paired"], report["reference"], [round(m["k"], 3) for m in report["models"]],
                         report["changed"])
                return chosen, {"area_prior": report}
        if prior == "axes":
            try:
                chosen, report = choose_by_extent(boxes, candidates, clicks, sides)
            except TooFewPairs as e:
                if not fallback:
                    raise
                log.warning("FusePseudoBoxes: %s; the default threshold for every click", e)
                return boxes, {"area_prior": {"model": "off", **fallback, "why_not_axes": str(e)}}
            log.info("FusePseudoBoxes: extent model on %d paired clicks (%s; k %s, sigma %s), %d changed T_cam",
                     report["paired"], report["reference"], [round(m["k"], 3) for m in report["models"]],
                     [round(m["sigma"], 2) for m in report["models"]], report["changed"])
            return chosen, {"area_prior": {**report, **fallback}}
        reference = None if truth is None else reference_areas(clicks, truth)
        chosen, report = choose_by_area(boxes, candidates, clicks, self.box_area_map_sigma, reference)
        log.info("FusePseudoBoxes: area prior on %d paired clicks (%s, %d boxes), %d changed T_cam", report["paired"],
                 report["reference"], report["reference_boxes"], report["changed"])
        return chosen.drop(columns=["area_mu", "area_sigma"]), {"area_prior": report}

    def run_stage(self, work: Path) -> None:
        params = self.box_params()
        manifest = self.manifest()
        clicks, trainval = manifest.clicks, manifest.split("trainval")
        sizes = {r.image_id: (int(r.width), int(r.height)) for r in trainval.itertuples(index=False)}
        selected_path, fallback = self.fallback_boxes()
        # the main store first, then the other layers and ensemble members
        bc: dict = {}
        with FusedMaps(self.map_readers()) as maps:
            items, total = maps.items(clicks)
            boxes, candidates = pseudo_boxes_and_candidates(
                tqdm(self.bc_masked(items, clicks, bc), total=total, desc="pseudo boxes", leave=False), fallback,
                classes_per_image(clicks), params, image_sizes=sizes, clicks=clicks,
                candidate_thresholds=AREA_THRESHOLDS if self.area_prior() != "off" else ())
            boxes, area = self.area_choice(boxes, candidates, clicks, trainval, sizes)
            if bc:
                area["bc_mask"] = {**bc, "delta": self.box_bc_delta, "sigma": self.box_bc_sigma}
            result = export_pseudo_labels(
                work, boxes, trainval[trainval["image_id"].isin(set(boxes["image_id"]))], manifest.classes,
                objects=manifest.objects[manifest.objects["image_id"].isin(set(trainval["image_id"]))],
                clicks=clicks, params={**self.export_params(params, selected_path, maps.partial, len(maps.stores)), **area},
                load_map=maps.load_map, report_images=self.report_images, report_worst=self.report_worst,
                seed=self.seed, difficult=self.metrics_difficult)
        m = result.get("metrics")
        log.info("FusePseudoBoxes: %d boxes, %d fallbacks%s", len(boxes), result["boxes"]["fallback"],
                 f"; CorLoc {100 * m['corloc']:.1f}, box-CorLoc {100 * m['box_accuracy']:.1f}, "
                 f"mean IoU {100 * m['mean_iou']:.1f}" if m else "")
