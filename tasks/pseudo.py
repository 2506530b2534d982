"""Stage 5: fused CAMs -> one pseudo box per click, its exports, metrics and report.

    GenerateCAMs + SelectProposals -> FusePseudoBoxes
"""
from __future__ import annotations

import logging
from pathlib import Path

import luigi
import pandas as pd
from luigi.util import inherits
from tqdm import tqdm

from pipeline.boxes import (PARTITION_MODES, SCORE_MODES, SYMMETRY_MODES, THRESHOLD_RULES, BoxParams,
                            classes_per_image, pseudo_boxes_from_cams, rank1_proposals)
from pipeline.cam import CamStore
from pipeline.export import export_pseudo_labels

from .base import StageTask
from .cams import GenerateCAMs
from .proposals import SelectProposals

log = logging.getLogger("clickscale")


@inherits(GenerateCAMs)
class FusePseudoBoxes(StageTask):
    """One pseudo box per click from its fused CAM (pipeline/boxes.py), rank-1 proposal as counted fallback.

    Output: ``pseudo_labels.csv``, ``Annotations/`` (VOC XML), ``coco.json``, ``metrics.json``, ``per_class.csv``
    (with ground truth), ``summary.md`` and ``report/index.html``.
    """

    # defaults chosen on bench/quality.py (voc07-sample, efficientnet_lite0; numbers in the README): a fixed T_cam
    # of 60 on the 0..255 normalised map, "max" symmetry, and the same-class partition of the map
    cam_threshold_rule = luigi.ChoiceParameter(choices=list(THRESHOLD_RULES), default="fixed",
                                               description="fixed: --cam-threshold on 0..255 (default 60); paper: "
                                                           "T_cam 80 (<2 image classes) / 120; fraction: of the max")
    cam_threshold = luigi.OptionalFloatParameter(default=60.0, description="value for the fixed/fraction rules")
    symmetry = luigi.ChoiceParameter(choices=list(SYMMETRY_MODES), default="max",
                                     description="half-extents about the click: max/mean/min of the two sides; "
                                                 "none: the region's own box")
    box_score = luigi.ChoiceParameter(choices=list(SCORE_MODES), default="box_mean",
                                      description="confidence of a pseudo box")
    min_box_side = luigi.FloatParameter(default=2.0, description="narrower boxes fall back to the proposal (px)")
    partition = luigi.ChoiceParameter(choices=list(PARTITION_MODES), default="same_class",
                                      description="keep each click's map on the pixels nearer to it than to the "
                                                  "image's other clicks of its class (same_class), of any class "
                                                  "(all), or not at all (none, the paper)")
    difficult = luigi.ChoiceParameter(choices=["include", "exclude"], default="include",
                                      description="how difficult ground truths count in the metrics")
    report_images = luigi.IntParameter(default=24, significant=False, description="clicks drawn in the report")
    report_worst = luigi.IntParameter(default=3, significant=False, description="worst boxes drawn per class")

    def image_label_mode(self) -> bool:
        """The paper's image-label-only baseline: whole-image CAMs, no clicks, no proposals to fall back to."""
        return getattr(self, "classifier_mode", "crops") == "image_labels"

    def requires(self):
        reqs = {"cams": self.clone(GenerateCAMs)}
        if not self.image_label_mode():
            reqs["selected"] = self.clone(SelectProposals)
        return reqs

    def box_params(self) -> BoxParams:
        return BoxParams(self.cam_threshold_rule, self.cam_threshold, self.symmetry, self.box_score,
                         self.min_box_side, self.partition)

    def run_stage(self, work: Path) -> None:
        params = self.box_params()
        manifest = self.manifest()
        if "selected" in self.requires():
            selected_path = self.input_dir("selected") / "selected.parquet"
            fallback = rank1_proposals(pd.read_parquet(selected_path))
        else:
            selected_path, fallback = None, rank1_proposals(pd.DataFrame(columns=["click_id", "rank", "x1", "y1",
                                                                                  "x2", "y2"]))
        clicks = manifest.clicks
        trainval = manifest.split("trainval")
        sizes = {r.image_id: (int(r.width), int(r.height)) for r in trainval.itertuples(index=False)}
        store = CamStore(self.input_dir("cams"))
        kinds = set(store.index["kind"])
        with store:
            if kinds == {"image"}:  # the image-label-only baseline: one whole-image CAM per image and class
                ids = store.click_ids()
                items = ((i, *store.load(i)) for i in ids)
                total = len(ids)
            else:
                meta = clicks.set_index("click_id")

                def items_gen():
                    for cid in meta.index:
                        if cid in store:
                            yield (int(cid), *store.load(cid))
                        else:  # counted as "missing" and given its fallback proposal
                            r = meta.loc[cid]
                            yield int(cid), None, {"image_id": r.image_id, "class": r["class"], "x": r.x, "y": r.y}

                items, total = items_gen(), len(meta)
            boxes = pseudo_boxes_from_cams(tqdm(items, total=total, desc="pseudo boxes", leave=False), fallback,
                                           classes_per_image(clicks), params, image_sizes=sizes, clicks=clicks)
            images = trainval[trainval["image_id"].isin(set(boxes["image_id"]))]
            objects = manifest.objects[manifest.objects["image_id"].isin(set(trainval["image_id"]))]
            result = export_pseudo_labels(
                work, boxes, images, manifest.classes, objects=objects, clicks=clicks,
                params={**params.as_dict(), "difficult": self.difficult, "cams": str(self.input_dir("cams")),
                        "selected": str(selected_path) if selected_path else None},
                load_map=lambda cid: store.load(cid)[0] if cid in store else None,
                report_images=self.report_images, report_worst=self.report_worst, seed=self.seed,
                difficult=self.difficult)
        m = result.get("metrics")
        log.info("FusePseudoBoxes: %d boxes, %d fallbacks%s", len(boxes), result["boxes"]["fallback"],
                 f"; CorLoc {100 * m['corloc']:.1f}, box-CorLoc {100 * m['box_accuracy']:.1f}, "
                 f"mean IoU {100 * m['mean_iou']:.1f}" if m else "")
