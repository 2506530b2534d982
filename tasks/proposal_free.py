"""Seeds 003 / 004 as stages: class maps of the whole image from one forward pass, no region proposals.

    PrepareDataset -> TrainClassifier (image_labels, --cam-network spam|gmp|gap) -> ProposalFreeBoxes
                                                                 (clicks; PseudoLabels --proposals none)
    PrepareDataset -> TrainClassifier (image_labels, --cam-network spam|gmp|gap) -> ImageExtentBoxes
                                                                 (no clicks: the image-label-only method)

``--cam-network`` picks the network whose maps are read (it sets the classifier's ``classifier_mode`` and
``classifier_image_pooling`` itself): an image-level network trained on image labels with seed 003's CAM layer and
SPAM (default) or global max pooling (seed 004), or the GAP image-level network; ``crops`` applies the click
classifier (trained on selected proposals, so selective search still runs) to the whole image. Both stages write the
files FusePseudoBoxes writes (pipeline.export.export_pseudo_labels), so PseudoLabels and the detector take them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import luigi
from tqdm import tqdm

from pipeline.boxes import classes_per_image, pseudo_boxes_and_candidates
from pipeline.classifier import load_classifier
from pipeline.device import resolve_device
from pipeline.export import export_pseudo_labels
from pipeline.pooling import conv_layers, feature_body
from pipeline.proposal_free import LowResMaps, click_maps, image_label_boxes, whole_image_fallbacks

from .base import StageTask, inherits
from .classifier import TrainClassifier
from .defaults import TUNED
from .pseudo import FusePseudoBoxes

log = logging.getLogger("clickscale")

#: --cam-network -> the classifier's (classifier_mode, classifier_image_pooling)
CAM_NETWORKS = {"spam": ("image_labels", "spam"), "gmp": ("image_labels", "gmp"), "gap": ("image_labels", "gap"),
                "crops": ("crops", "gap")}


@inherits(TrainClassifier, without=("classifier_mode", "classifier_image_pooling"))
class _WholeImageCams(StageTask):
    """What both stages share: the network (``cam_network``), the forward pass's input size, the export settings."""

    uses_gpu = True  # the forward passes run on CUDA when present

    cam_network = luigi.ChoiceParameter(choices=list(CAM_NETWORKS), default="spam",
                                        description="whose whole-image maps: spam / gmp: an image-level network "
                                                    "with seed 003's CAM layer and that pooling; gap: the image-level "
                                                    "GAP network; crops: the click classifier (needs selective "
                                                    "search for its training crops)")
    cam_image_px = luigi.IntParameter(default=0, description="the whole image is squashed to this square for the "
                                                             "one forward pass (px); 0: the classifier's input size")
    # the export settings of FusePseudoBoxes (the same parameter objects: PseudoLabels passes one value to either)
    metrics_difficult = FusePseudoBoxes.metrics_difficult
    report_images = FusePseudoBoxes.report_images
    report_worst = FusePseudoBoxes.report_worst

    def network_epochs(self) -> int:
        """The network's ``classifier_epochs`` (0: TrainClassifier's default for its mode)."""
        return self.classifier_epochs

    def requires(self):
        mode, pooling = CAM_NETWORKS[self.cam_network]
        return {"classifier": self.clone(TrainClassifier, classifier_mode=mode, classifier_image_pooling=pooling,
                                         classifier_epochs=self.network_epochs())}

    def network(self):
        return load_classifier(self.input_dir("classifier") / "model.pt", resolve_device(self.device))

    def export(self, work: Path, boxes, params: dict, load_map=None) -> dict:
        manifest = self.manifest()
        trainval = manifest.split("trainval")
        result = export_pseudo_labels(
            work, boxes, trainval[trainval["image_id"].isin(set(boxes["image_id"]))], manifest.classes,
            objects=manifest.objects[manifest.objects["image_id"].isin(set(trainval["image_id"]))],
            clicks=manifest.clicks, params={"cam_network": self.cam_network, "cam_image_px": self.cam_image_px,
                                            "classifier": str(self.input_dir("classifier")), **params,
                                            "difficult": self.metrics_difficult},
            load_map=load_map, report_images=self.report_images, report_worst=self.report_worst, seed=self.seed,
            difficult=self.metrics_difficult)
        m = result.get("metrics")
        log.info("%s: %d boxes, %d fallbacks%s", self.task_family, len(boxes), result["boxes"]["fallback"],
                 f"; CorLoc {100 * m['corloc']:.1f}, box-CorLoc {100 * m['box_accuracy']:.1f}, "
                 f"mean IoU {100 * m['mean_iou']:.1f}" if m else "")
        return result


class ProposalFreeBoxes(_WholeImageCams):
    """One pseudo box per click from the whole-image map of its class (``--proposals none``): stage 5's partition,
    threshold and symmetric box about the click (pipeline/boxes.py) on the map upsampled to the image; the whole
    image when no box comes out. Output as FusePseudoBoxes'."""

    # stage 5's parameters (the same parameter objects as FusePseudoBoxes')
    box_threshold_rule = FusePseudoBoxes.box_threshold_rule
    box_threshold = FusePseudoBoxes.box_threshold
    box_symmetry = FusePseudoBoxes.box_symmetry
    box_score = FusePseudoBoxes.box_score
    box_min_px = FusePseudoBoxes.box_min_px
    box_partition = FusePseudoBoxes.box_partition

    def network_epochs(self) -> int:
        """The fast mode trains an image-level network for ``TUNED.proposal_free_image_epochs`` unless
        ``--classifier-epochs`` says otherwise (the crop classifier keeps its own default)."""
        if self.classifier_epochs or CAM_NETWORKS[self.cam_network][0] != "image_labels":
            return self.classifier_epochs
        return TUNED.proposal_free_image_epochs

    def run_stage(self, work: Path) -> None:
        params = FusePseudoBoxes.box_params(self)
        manifest = self.manifest()
        clicks, trainval = manifest.clicks, manifest.split("trainval")
        net = self.network()
        px = self.cam_image_px or net.input_size
        store = LowResMaps(clicks, trainval, manifest.classes, conv_layers(feature_body(net)), px)
        items = click_maps(net, trainval, clicks, manifest.classes, input_px=px, device=resolve_device(self.device),
                           store=store)
        boxes, _ = pseudo_boxes_and_candidates(
            tqdm(items, total=len(clicks), desc="pseudo boxes", leave=False), whole_image_fallbacks(clicks, trainval),
            classes_per_image(clicks), params,
            image_sizes={str(r.image_id): (int(r.width), int(r.height)) for r in trainval.itertuples(index=False)},
            clicks=clicks)
        self.export(work, boxes, {"proposals": "none", **params.as_dict()}, load_map=store.click_map)


class ImageExtentBoxes(_WholeImageCams):
    """The image-label-only method of seeds 003 / 004: for each labelled class of each trainval image, the boxes of
    its whole-image map by peaks, mountains, fast back-projection and contours (pipeline/extent.py), no clicks and
    no proposals. Output as FusePseudoBoxes' (``click_id`` -1)."""

    box_threshold_rule = FusePseudoBoxes.box_threshold_rule
    box_threshold = FusePseudoBoxes.box_threshold
    box_extent_ratio = luigi.FloatParameter(default=TUNED.box_extent_ratio,
                                            description="Algorithm 1's r: each receptive field shrinks by r of its "
                                                        "width (0: the whole field); -1: to one stride cell")

    def run_stage(self, work: Path) -> None:
        manifest = self.manifest()
        ratio = None if self.box_extent_ratio < 0 else self.box_extent_ratio
        boxes = image_label_boxes(self.network(), manifest.split("trainval"), manifest.image_labels(),
                                  manifest.classes, threshold_rule=self.box_threshold_rule,
                                  threshold_value=self.box_threshold, ratio=ratio,
                                  input_px=self.cam_image_px or None, device=resolve_device(self.device))
        self.export(work, boxes, {"threshold_rule": self.box_threshold_rule, "threshold_value": self.box_threshold,
                                  "extent_ratio": self.box_extent_ratio})
