"""The pipeline's tuned defaults, in one place: the luigi tasks take their parameter defaults from :data:`TUNED`.

The library (``pipeline/``) keeps the paper's values, or neutral ones where the paper gives none (e.g.
``pipeline.boxes.BoxParams``: the paper's T_cam rule, no partition; ``pipeline.cam.CamStoreSettings``: the plain sum
of Eq. 4). The values here were chosen by measurement: each names the entry of docs/experiments.md (how it was
chosen) or docs/results.md (the current numbers) behind it. Field names are the tasks' parameter names.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tuned:
    # -- stage 1, SelectiveSearch -----------------------------------------------------------------------------
    #: OpenCV's fast strategy, as Fast R-CNN's proposals (docs/method.md, stage 1)
    ss_mode: str = "fast"
    #: longest image side given to selective search: its cost grows with the pixel count (docs/method.md, stage 1;
    #: timings: docs/results.md, "Speed")
    ss_image_max_px: int = 500
    #: proposals with a shorter side are dropped (docs/method.md, stage 1)
    ss_box_min_px: float = 20.0

    # -- stage 2, SelectProposals ------------------------------------------------------------------------------
    #: the paper's N = 8 crops per click; 4 or 16 did worse (docs/experiments.md, 2026-11-21, "Probes on all clicks")
    sel_per_click: int = 8
    #: the paper's T_iou (docs/method.md, stage 2)
    sel_nms_iou: float = 0.7
    #: same-class exclusion, an addition to the paper (docs/experiments.md, 2026-11-21, "Same-class exclusion";
    #: docs/results.md, the exclusion rows of `bench/quality.py --extended`)
    sel_exclusive: bool = True

    # -- stage 3, TrainClassifier ------------------------------------------------------------------------------
    #: lite1 / lite2 did not beat lite0 beyond the seed-to-seed spread (docs/experiments.md, 2026-11-21,
    #: "Backbones")
    classifier_backbone: str = "efficientnet_lite0"
    #: more epochs or crops did not help; 224 px crops did, at most 50 per class kept their cost down
    #: (docs/experiments.md, 2026-11-21, "Classifier budget and crop size")
    classifier_epochs: int = 3
    #: the whole-image networks of ``--classifier-mode image_labels`` (GAP, and seeds 003 / 004's GMP / SPAM) see
    #: one item per image, not eight crops per click: at the crop classifier's 3 epochs they had barely left their
    #: initial loss, and seed 003's boxes were nearly all fallbacks (docs/experiments.md, 2026-12-07, "Image-level
    #: networks undertrained")
    classifier_image_epochs: int = 16
    #: ... except in ``--proposals none``, the fast mode: there its box-CorLoc is the same at 3, 4 and 16 epochs while
    #: 16 epochs take most of the mode's time and undo its speed-up (docs/results.md, "Proposal-free click mode")
    proposal_free_image_epochs: int = 3
    classifier_input_px: int = 224
    classifier_max_crops_per_class: int = 50
    #: SGD, lr 0.003 (head x10), frozen BatchNorm statistics (docs/experiments.md, 2026-11-21, "Classifier
    #: hyper-parameters")
    classifier_optimizer: str = "sgd"
    classifier_lr: float = 0.003
    classifier_freeze_bn: bool = True
    #: the gradient's total norm clipped before each step, to about twice its usual size at the peak learning rate:
    #: without it, a perturbation at rounding level (micro-batches, another thread count) sent the voc07-sample
    #: classifier into divergence (docs/experiments.md, 2026-12-01, "Classifier divergence")
    classifier_clip_grad_norm: float = 20.0

    # -- stage 4, GenerateCAMs -----------------------------------------------------------------------------------
    #: the paper's SA-CAM (Eq. 3); Grad-CAM's rows: docs/results.md
    cam_method: str = "sacam"
    #: crop maps weighted by the classifier's probability of the click's class (docs/experiments.md, 2026-11-21,
    #: "Probability-weighted fusion"; the paper's plain sum is ``sum``)
    cam_fusion: str = "prob"
    #: the CAM layers whose maps stage 5 averages, per classifier backbone (docs/experiments.md, 2026-11-22, "Two
    #: CAM layers"; vgg16: the paper's conv5_2, its Table V)
    cam_layers: dict = field(default_factory=lambda: {
        "vgg16": ("conv5_2",),
        **{name: ("stage5_expand", "stage6")
           for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")}})

    # -- stage 5, FusePseudoBoxes --------------------------------------------------------------------------------
    #: a fixed T_cam of 50 on the 0..255 map beat the paper's 80 / 120 rule (docs/experiments.md, 2026-11-22, "Two
    #: CAM layers"; the T_cam rows of docs/results.md)
    box_threshold_rule: str = "fixed"
    box_threshold: float = 50.0
    #: half-extents about the click: the larger of the two sides (docs/experiments.md, 2026-11-21, "First quality
    #: table"; the symmetry rows of docs/results.md)
    box_symmetry: str = "max"
    #: a click's map cut against the other clicks of its class, an addition to the paper (docs/experiments.md,
    #: 2026-11-22, "Two CAM layers"; the partition rows of docs/results.md)
    box_partition: str = "same_class"
    #: the library's: the mean normalised map inside the box, and a box under 2 px a fallback (docs/method.md,
    #: stage 5)
    box_score: str = "box_mean"
    box_min_px: float = 2.0

    # -- ImageExtentBoxes (seed 003's boxes without clicks) --------------------------------------------------------
    #: Algorithm 1's ratio r: on the first 30 trainval images (a probe, docs/experiments.md, 2026-12-01, "Seed 003's
    #: ratio r") r <= 0.5 gave whole-image boxes and one stride cell (r = 0.96 for efficientnet_lite0) too small ones;
    #: bench/quality.py's r rows are the measurement to choose it on
    box_extent_ratio: float = 0.8

    # -- seeds -------------------------------------------------------------------------------------------------
    #: the dataset's randomness (synthetic images, simulated clicks, proposal subsets) and the training's (crop
    #: subsample, classifier and detector training, the report's sample) are seeded apart, so reseeding a
    #: training keeps the dataset and the proposals
    data_seed: int = 0
    seed: int = 0


TUNED = Tuned()
