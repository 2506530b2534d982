"""Stage 6: Fast R-CNN on external (selective-search) proposals, built from torchvision's detection parts, and
(``arch="faster_rcnn"``, :class:`FasterRCNN`) the same detector with torchvision's ``RegionProposalNetwork``.

The model (:class:`FastRCNN`) is a torchvision ``GeneralizedRCNN`` whose ``rpn`` is :class:`ExternalProposals`:
it takes the image's precomputed proposals (original-image coordinates) and scales them with the images.
``GeneralizedRCNNTransform`` resizes images and ground-truth boxes but not proposals; they go through the same
``transform.resize_boxes`` with the same sizes, so a proposal equal to a ground-truth box stays equal.
The rest is torchvision's: ``RoIHeads`` (matching, fg/bg sampling, box coding, loss, per-class NMS), a RoI pooler
(``RoIPool`` on the last conv layer as in the paper, or ``MultiScaleRoIAlign``), a box head (VGG16: fc6/fc7
initialised from the ImageNet classifier; other backbones: ``TwoMLPHead``) and ``FastRCNNPredictor``.

Backbones come from :mod:`pipeline.backbones` (``feature_trunk``, ``vgg16_fc_layers``):

* ``vgg16``: conv1_1..conv5_3 (stride 16), RoI max pooling 7x7, fc6/fc7 from ImageNet, conv1-2 frozen (as
  Fast R-CNN's VGG16 recipe).
* ``efficientnet_lite0`` (the CPU default): stem..stage6 with stages 5-6 dilated so the trunk has stride 16
  (320 channels; built here from the backbones trunk, see :func:`dilate_to_stride`), a 1x1 conv to 128 channels
  (RoI pooling and fc6 on 320 channels made the head cost more than the trunk at test time on a CPU;
  docs/experiments.md), RoIAlign 7x7, ``TwoMLPHead`` 1024; stem..stage1 frozen. All BatchNorm layers are frozen
  (eval mode, fixed affine): 2 images per batch give no usable batch statistics.

Training follows Fast R-CNN (docs/method.md, stage 6): 2 images per batch, 64 RoIs per image (128 per batch),
25% foreground at IoU >= 0.5, background at IoU in [0.1, 0.5) (:class:`FastRCNNRoIHeads`; torchvision's own
range is [0, 0.5)), RoIs below 0.1 are not sampled, horizontal flips (of image, boxes and proposals), SGD with
momentum 0.9 and weight decay 5e-4 (biases: twice the learning rate and no decay, as in the Caffe recipe), lr 1e-3
then 1e-4. AMP on CUDA. The loop is :func:`pipeline.engine.fit`'s: a checkpoint dict ``{model, optimizer,
lr_scheduler, scaler, epoch, args, classes, log}`` (plain data, read with ``weights_only=True``) is written atomically
after every epoch and training resumes from it. Epoch ``e`` seeds the RNGs with ``(seed, e)``, so a run resumed at
an epoch boundary is identical to an uninterrupted one.

Test: class-specific box regression, score > 0.05, per-class NMS at IoU 0.3, at most 100 detections per image.

Box sources for training (:func:`load_training_boxes`): a pseudo label CSV, the ground truth (non-difficult
objects, as py-faster-rcnn's ``use_diff=False``), a VOC ``Annotations/`` folder or a COCO JSON.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, box_iou, clip_boxes_to_image, remove_small_boxes, roi_pool

from . import distributed as D
from .backbones import EFFNET_PACKAGES
from .device import resolve_device
from .imageio import read_image
from .engine import EpochStats, FitSpec, NonFiniteLossError, Step, fit, freeze_batchnorm
from .engine import checkpoint as checkpoints

log = logging.getLogger(__name__)

BOX_SOURCES = ("pseudo", "gt", "voc_dir", "coco")
#: fast_rcnn: external (selective-search) proposals; faster_rcnn: torchvision's RegionProposalNetwork, no proposals
ARCHS = ("fast_rcnn", "faster_rcnn")
POOLERS = ("auto", "roi_pool", "roi_align")
BOX = ["x1", "y1", "x2", "y2"]

#: per backbone: default trunk layer, output stride wanted, layers frozen (up to and including), pooler
BACKBONE_DEFAULTS = {
    "vgg16": dict(trunk_layer="conv5_3", trunk_stride=16, freeze_through="pool2", pooler="roi_pool",
                  reduce_channels=0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    **{name: dict(trunk_layer="stage6", trunk_stride=16, freeze_through="stage1", pooler="roi_align",
                  reduce_channels=128, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
       for name in EFFNET_PACKAGES},
}


class DetectorError(RuntimeError):
    """Training or detection cannot go on (bad input, NaN loss, ...); the message says what and where."""


class DetectorNonFiniteError(DetectorError, NonFiniteLossError):
    """The detector's training loss or weights became NaN or infinite (also the engine's NonFiniteLossError)."""


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class DetectorConfig:
    """Everything that defines a detector and its training; stored in every checkpoint (``args``)."""

    arch: str = "fast_rcnn"            # one of ARCHS
    backbone: str = "vgg16"
    weights: str = "imagenet"          # "imagenet", a state-dict path, or "random" (tests / timing only)
    trunk_layer: str = ""              # "" = the backbone's default (BACKBONE_DEFAULTS)
    trunk_stride: int = 0              # 0 = default; efficientnet_lite0 can dilate its last stages to 16
    freeze_through: str = ""           # trunk layers frozen up to and including this one; "" = the backbone's default
    pooler: str = "auto"               # auto: roi_pool for vgg16 (paper), roi_align otherwise
    pool_size: int = 7
    reduce_channels: int = -1          # 1x1 conv + ReLU before RoI pooling to this many channels; 0 none, -1 default
    representation_size: int = 1024    # TwoMLPHead width (not vgg16, whose head is fc6/fc7 of 4096)
    min_size: int = 600                # shorter image side
    max_size: int = 1000               # longer side cap
    images_per_batch: int = 2
    rois_per_image: int = 64           # 128 per batch of 2 images
    fg_fraction: float = 0.25
    fg_iou: float = 0.5                # foreground: IoU >= fg_iou
    bg_iou_lo: float = 0.1             # background: bg_iou_lo <= IoU < bg_iou_hi
    bg_iou_hi: float = 0.5
    max_proposals: int = 2000          # per image (evenly spread subset of a larger set; stores are sorted)
    min_proposal_size: float = 1.0     # in resized-image pixels
    flip: bool = True
    epochs: int = 20
    lr: float = 1e-3
    lr_steps: tuple[int, ...] = (16,)  # epochs after which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_iters: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    amp: bool = True                   # on CUDA only
    score_thresh: float = 0.05
    nms_thresh: float = 0.3
    detections_per_img: int = 100
    num_workers: int = 0
    seed: int = 0
    # faster_rcnn only: the RPN (torchvision's RegionProposalNetwork on the one stride-16 feature map; Faster R-CNN's
    # anchors of 3 aspect ratios, here 5 sizes for the smaller images; fg IoU >= 0.7, bg < 0.3, 256 anchors per
    # image, half foreground; NMS 0.7 on the proposals)
    rpn_anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    rpn_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_train: int = 2000      # proposals per image before / after NMS, training
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 1000       # ... and at test time
    rpn_post_nms_test: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_batch_per_image: int = 256
    #: fields a resumed run may change: they do not change what the finished epochs computed (the lr schedule,
    #: milestones and warmup, does not depend on the total number of epochs, so a run can be extended)
    RUNTIME_FIELDS = ("epochs", "num_workers")

    def resolved(self) -> "DetectorConfig":
        """A copy with the backbone-dependent defaults filled in and every value checked."""
        if self.arch not in ARCHS:
            raise ValueError(f"unknown detector architecture {self.arch!r}; choose one of {ARCHS}")
        if self.backbone not in BACKBONE_DEFAULTS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {tuple(BACKBONE_DEFAULTS)}")
        d = BACKBONE_DEFAULTS[self.backbone]
        pooler = d["pooler"] if self.pooler == "auto" else self.pooler
        if pooler not in POOLERS[1:]:
            raise ValueError(f"unknown pooler {self.pooler!r}; choose one of {POOLERS}")
        if not (0 <= self.bg_iou_lo <= self.bg_iou_hi <= self.fg_iou <= 1):
            raise ValueError(f"need 0 <= bg_iou_lo ({self.bg_iou_lo}) <= bg_iou_hi ({self.bg_iou_hi}) <= fg_iou "
                             f"({self.fg_iou}) <= 1")
        if self.images_per_batch < 1 or self.rois_per_image < 1 or self.epochs < 1:
            raise ValueError("images_per_batch, rois_per_image and epochs must be positive")
        return replace(self, trunk_layer=self.trunk_layer or d["trunk_layer"],
                       freeze_through=self.freeze_through or d["freeze_through"],
                       trunk_stride=self.trunk_stride or d["trunk_stride"], pooler=pooler,
                       reduce_channels=d["reduce_channels"] if self.reduce_channels < 0 else self.reduce_channels,
                       lr_steps=tuple(int(s) for s in self.lr_steps))

    #: the fields held as tuples (lists in a checkpoint's ``args``)
    TUPLE_FIELDS = ("lr_steps", "rpn_anchor_sizes", "rpn_aspect_ratios")

    def to_dict(self) -> dict:
        """The fields as a dict (checkpoint ``args``); ``freeze_through`` only when it is not the backbone's default,
        so that the args of a default config are those of checkpoints written before the field existed (a run
        interrupted then still resumes)."""
        out = asdict(self)
        for k in self.TUPLE_FIELDS:
            out[k] = list(out[k])
        if out["freeze_through"] in ("", BACKBONE_DEFAULTS.get(self.backbone, {}).get("freeze_through")):
            del out["freeze_through"]
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "DetectorConfig":
        """The config of a checkpoint's ``args`` (written before ``arch`` existed: fast_rcnn, the default)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in cls.TUPLE_FIELDS:
            if k in kw:
                kw[k] = tuple(kw[k])
        backbone = BACKBONE_DEFAULTS.get(kw.get("backbone", cls.backbone), {})
        kw.setdefault("freeze_through", backbone.get("freeze_through", ""))  # absent = the default (to_dict)
        return cls(**kw)


#: "paper": Fast R-CNN on VGG16 as in method.md (the schedule is scaled to epochs of VOC07 trainval: 40k + 10k
#: iterations of 2 images over 5011 images ~ 16 + 4 epochs). "cpu": efficientnet_lite0 at a smaller scale and a
#: short schedule, for 2-core machines and the embedded synthetic dataset.
PRESETS: dict[str, DetectorConfig] = {
    "paper": DetectorConfig(),
    "cpu": DetectorConfig(backbone="efficientnet_lite0", min_size=384, max_size=640, epochs=8, lr=4e-3,
                          lr_steps=(6,), warmup_iters=100, max_proposals=2000),
}


def preset(name: str, **overrides) -> DetectorConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown detector preset {name!r}; choose one of {tuple(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------------- model
class ExternalProposals(nn.Module):
    """The "RPN" of a Fast R-CNN: returns the given proposals, scaled like the images.

    Input proposals are in original-image coordinates (one ``(K, 4)`` tensor per image). More than
    ``max_proposals`` are thinned to an evenly spaced subset (stores are sorted, so a prefix would be biased);
    boxes are resized with ``transform.resize_boxes`` from the original to the resized image size, clipped, and
    boxes smaller than ``min_size`` (resized pixels) are dropped.
    """

    def __init__(self, max_proposals: int = 2000, min_size: float = 1.0):
        super().__init__()
        self.max_proposals = int(max_proposals)
        self.min_size = float(min_size)

    def forward(self, images: ImageList, proposals: list[torch.Tensor],
                original_sizes: list[tuple[int, int]]) -> tuple[list[torch.Tensor], dict]:
        out = []
        for p, orig, new in zip(proposals, original_sizes, images.image_sizes):
            p = p.to(device=images.tensors.device, dtype=torch.float32).reshape(-1, 4)
            if self.max_proposals and len(p) > self.max_proposals:
                idx = torch.linspace(0, len(p) - 1, self.max_proposals, device=p.device).round().long()
                p = p[idx]
            p = resize_boxes(p, list(orig), list(new))
            p = clip_boxes_to_image(p, tuple(new))
            p = p[remove_small_boxes(p, self.min_size)]
            out.append(p)
        return out, {}


class RoIPoolLayer(nn.Module):
    """``torchvision.ops.roi_pool`` on one feature map, with the ``MultiScaleRoIAlign`` call signature."""

    def __init__(self, output_size: int, spatial_scale: float, featmap_name: str = "0"):
        super().__init__()
        self.output_size = (int(output_size), int(output_size))
        self.spatial_scale = float(spatial_scale)
        self.featmap_name = featmap_name

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        x = features[self.featmap_name]
        boxes = [p.to(x.dtype) for p in proposals]
        return roi_pool(x, boxes, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class FastRCNNRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` with Fast R-CNN's background range: IoU in ``[bg_iou_lo, bg_iou_hi)`` is
    background, IoU ``>= fg_iou`` foreground, everything else (IoU < bg_iou_lo, or between bg_iou_hi and fg_iou)
    is never sampled."""

    def __init__(self, *args, bg_iou_lo: float = 0.1, bg_iou_hi: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.bg_iou_lo = float(bg_iou_lo)
        self.bg_iou_hi = float(bg_iou_hi)
        self.fg_iou = float(self.proposal_matcher.high_threshold)

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched_idxs, labels = [], []
        for props, gt, gt_lab in zip(proposals, gt_boxes, gt_labels):
            if gt.numel() == 0:  # no objects: everything is background (as torchvision)
                matched_idxs.append(torch.zeros(len(props), dtype=torch.int64, device=props.device))
                labels.append(torch.zeros(len(props), dtype=torch.int64, device=props.device))
                continue
            iou = box_iou(gt, props)  # (G, P)
            best, idx = iou.max(dim=0)
            lab = gt_lab[idx].to(torch.int64)
            lab[best < self.fg_iou] = 0
            lab[(best < self.bg_iou_lo) | ((best >= self.bg_iou_hi) & (best < self.fg_iou))] = -1
            matched_idxs.append(idx)
            labels.append(lab)
        return matched_idxs, labels

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        # under autocast the predictor's outputs are float16, and torchvision decodes boxes in the dtype of the
        # regression (0.5 px steps at 512-1024 px): decode in float32
        return super().postprocess_detections(class_logits.float(), box_regression.float(),
                                              [p.float() for p in proposals], image_shapes)


class TrunkBackbone(nn.Module):
    """A convolutional trunk returning ``{"0": features}`` with ``out_channels`` and ``stride``."""

    def __init__(self, body: nn.Module, out_channels: int, stride: int):
        super().__init__()
        self.body = body
        self.out_channels = int(out_channels)
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("0", self.body(x))])


class FastRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` with external proposals: ``model(images, proposals, targets=None)``.

    ``images``: list of ``(3, H, W)`` float tensors in 0..1 (RGB); ``proposals``: list of ``(K, 4)`` boxes in the
    images' coordinates; ``targets`` (training): list of ``{"boxes": (N, 4) float, "labels": (N,) int64 in
    1..num_classes}``. Training mode returns the loss dict, eval mode one dict per image with ``boxes`` (original
    image coordinates), ``labels`` (1-based) and ``scores``.
    """

    def __init__(self, backbone: TrunkBackbone, rpn: ExternalProposals, roi_heads: RoIHeads,
                 transform: GeneralizedRCNNTransform, classes: Sequence[str], config: DetectorConfig):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.classes = tuple(classes)
        self.config = config

    def train(self, mode: bool = True) -> "FastRCNN":
        super().train(mode)
        freeze_batchnorm(self.backbone)  # frozen BatchNorm: running statistics are never updated
        return self

    def forward(self, images: list[torch.Tensor], proposals: list[torch.Tensor] | None,
                targets: list[dict[str, torch.Tensor]] | None = None):
        if proposals is not None and len(images) != len(proposals):
            raise ValueError(f"{len(images)} images but {len(proposals)} proposal sets")
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            for i, t in enumerate(targets):
                b = t["boxes"]
                if b.ndim != 2 or b.shape[-1] != 4:
                    raise ValueError(f"target {i}: boxes must be (N, 4), got {tuple(b.shape)}")
                if (b[:, 2:] <= b[:, :2]).any():
                    raise ValueError(f"target {i}: degenerate box {b[(b[:, 2:] <= b[:, :2]).any(1)][0].tolist()}")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        images_t, targets_t = self.transform(images, targets)
        features = self.backbone(images_t.tensors)
        props, losses = self.propose(images_t, features, proposals, original_sizes, targets_t)
        detections, det_losses = self.roi_heads(features, props, images_t.image_sizes, targets_t)
        if self.training:
            return {**losses, **det_losses}
        return self.transform.postprocess(detections, images_t.image_sizes, original_sizes)

    def propose(self, images_t: ImageList, features, proposals, original_sizes, targets_t):
        """The RoIs of each image (resized-image coordinates) and the proposal losses (none here)."""
        if proposals is None:
            raise ValueError("a Fast R-CNN needs proposals for every image")
        return self.rpn(images_t, proposals, original_sizes)


class FasterRCNN(FastRCNN):
    """The same detector with torchvision's ``RegionProposalNetwork`` as its ``rpn``: it proposes its own RoIs
    (trained with the RPN's objectness and box losses, ``loss_objectness`` and ``loss_rpn_box_reg``, added to the
    RoI heads'); ``proposals`` are ignored (pass ``None``)."""

    def propose(self, images_t: ImageList, features, proposals, original_sizes, targets_t):
        return self.rpn(images_t, features, targets_t)


def dilate_to_stride(trunk: nn.Sequential, current_stride: int, target_stride: int) -> int:
    """Turn the strided convolutions of ``trunk`` that take it beyond ``target_stride`` into stride-1 ones and
    dilate every later spatial convolution to match (DeepLab-style), keeping the pretrained weights. Returns the
    new output stride. Padding is recomputed for symmetric "same" padding (timm's default for lite0)."""
    if target_stride >= current_stride:
        return current_stride
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    stride, dilation = 1, 1
    for conv in convs:
        s = conv.stride[0]
        k = conv.kernel_size[0]
        if s > 1 and stride * s > target_stride:
            conv.stride = (1, 1)
            conv.padding = ((k - 1) * dilation // 2,) * 2
            conv.dilation = (dilation, dilation)
            dilation *= s
            continue
        stride *= s
        if k > 1 and dilation > 1:
            conv.dilation = (dilation, dilation)
            conv.padding = ((k - 1) * dilation // 2,) * 2
    return stride


def _freeze_through(trunk: nn.Sequential, name: str) -> None:
    names = list(trunk._modules)
    if name not in names:
        raise ValueError(f"cannot freeze through {name!r}: trunk layers are {names}")
    for n in names[: names.index(name) + 1]:
        for p in trunk._modules[n].parameters():
            p.requires_grad_(False)


def build_detector(classes: Sequence[str], config: DetectorConfig | None = None) -> FastRCNN:
    """A Fast R-CNN (``config.arch`` fast_rcnn) or Faster R-CNN (faster_rcnn: :class:`FasterRCNN`) for ``classes``
    (background added as label 0) from the project's backbones; both share the trunk, pooler and box head."""
    from . import backbones

    cfg = (config or DetectorConfig()).resolved()
    d = BACKBONE_DEFAULTS[cfg.backbone]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        trunk = backbones.feature_trunk(cfg.backbone, cfg.weights, cfg.trunk_layer)
        body, channels, stride = trunk.module, trunk.out_channels, trunk.stride
        if cfg.trunk_stride and cfg.trunk_stride != stride:
            if cfg.trunk_stride > stride:
                raise ValueError(f"{cfg.backbone} layer {cfg.trunk_layer} has stride {stride}; cannot raise it to "
                                 f"{cfg.trunk_stride}")
            stride = dilate_to_stride(body, stride, cfg.trunk_stride)
        _freeze_through(body, cfg.freeze_through)
        freeze_batchnorm(body, stats=False, affine=True)  # (statistics: FastRCNN.train)
        if cfg.reduce_channels:
            if cfg.backbone == "vgg16":
                raise ValueError("vgg16's fc6 from ImageNet needs the 512 conv5_3 channels: reduce_channels must be 0")
            reduce = nn.Conv2d(channels, cfg.reduce_channels, 1)
            nn.init.kaiming_normal_(reduce.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(reduce.bias)
            body = nn.Sequential(OrderedDict([*body.named_children(), ("reduce", reduce), ("reduce_relu", nn.ReLU())]))
            channels = cfg.reduce_channels
        backbone = TrunkBackbone(body, channels, stride)

        if cfg.pooler == "roi_pool":
            pooler = RoIPoolLayer(cfg.pool_size, 1.0 / stride)
        else:
            pooler = MultiScaleRoIAlign(["0"], cfg.pool_size, sampling_ratio=2)
        if cfg.backbone == "vgg16":
            if cfg.pool_size != 7 or channels != 512:
                raise ValueError("the vgg16 box head (fc6/fc7 from ImageNet) needs 512x7x7 RoI features "
                                 f"(got {channels} channels, pool_size {cfg.pool_size})")
            head, rep = backbones.vgg16_fc_layers(cfg.weights)
        else:
            rep = cfg.representation_size
            head = TwoMLPHead(channels * cfg.pool_size ** 2, rep)
        predictor = FastRCNNPredictor(rep, len(classes) + 1)
        nn.init.normal_(predictor.cls_score.weight, std=0.01)  # Fast R-CNN's initialisation
        nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(predictor.cls_score.bias)
        nn.init.zeros_(predictor.bbox_pred.bias)
        if cfg.arch == "faster_rcnn":
            anchors = AnchorGenerator((tuple(cfg.rpn_anchor_sizes),), (tuple(cfg.rpn_aspect_ratios),))
            rpn = RegionProposalNetwork(
                anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]), fg_iou_thresh=0.7,
                bg_iou_thresh=0.3, batch_size_per_image=cfg.rpn_batch_per_image, positive_fraction=0.5,
                pre_nms_top_n=dict(training=cfg.rpn_pre_nms_train, testing=cfg.rpn_pre_nms_test),
                post_nms_top_n=dict(training=cfg.rpn_post_nms_train, testing=cfg.rpn_post_nms_test),
                nms_thresh=cfg.rpn_nms_thresh)
        else:
            rpn = ExternalProposals(cfg.max_proposals, cfg.min_proposal_size)
    roi_heads = FastRCNNRoIHeads(
        pooler, head, predictor,
        fg_iou_thresh=cfg.fg_iou, bg_iou_thresh=cfg.bg_iou_hi,
        batch_size_per_image=cfg.rois_per_image, positive_fraction=cfg.fg_fraction,
        bbox_reg_weights=None, score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img, bg_iou_lo=cfg.bg_iou_lo, bg_iou_hi=cfg.bg_iou_hi)
    transform = GeneralizedRCNNTransform(cfg.min_size, cfg.max_size, list(d["mean"]), list(d["std"]),
                                         size_divisible=32)
    model_class = FasterRCNN if cfg.arch == "faster_rcnn" else FastRCNN
    return model_class(backbone, rpn, roi_heads, transform, classes, cfg)


# ------------------------------------------------------------------------------------------------------ data
ProposalSource = Callable[[str], np.ndarray] | Mapping[str, np.ndarray]


def _get_proposals(source: ProposalSource, image_id: str) -> np.ndarray:
    try:
        boxes = source[image_id] if not callable(source) or hasattr(source, "__getitem__") else source(image_id)
    except KeyError as e:
        raise DetectorError(str(e.args[0]) if e.args else f"no proposals for image {image_id!r}") from None
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise DetectorError(f"proposals of image {image_id!r} hold non-finite values")
    return boxes


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror ``(x1, y1, x2, y2)`` boxes of an image ``width`` wide (continuous coordinates)."""
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    out[:, [0, 2]] = width - out[:, [2, 0]]
    return out


class DetectionDataset(torch.utils.data.Dataset):
    """Images with their proposals and (for training) boxes.

    ``images``: ``image_id, path`` (``width, height`` checked against the decoded image when present);
    ``proposals``: ``store[image_id] -> (K, 4)`` (a :class:`pipeline.proposals.ProposalStore`, a dict, or a
    callable), or ``None`` for a detector that proposes its own (every item then has no proposals); ``boxes``: ``image_id, class, x1..y2`` or ``None`` at test time. Item ``i`` is
    ``(image (3,H,W) float 0..1, proposals (K,4), target {"boxes", "labels" (1-based), "image_id"}, image_id)``.
    With ``flip``, an item is mirrored when ``rng(seed, epoch, i)`` says so (call :meth:`set_epoch`).
    """

    def __init__(self, images: pd.DataFrame, proposals: ProposalSource | None, classes: Sequence[str],
                 boxes: pd.DataFrame | None = None, flip: bool = False, seed: int = 0):
        self.images = images.reset_index(drop=True)
        self.proposals = proposals
        self.classes = tuple(classes)
        self.class_index = {c: i + 1 for i, c in enumerate(self.classes)}
        self.flip = flip
        self.seed = int(seed)
        self.epoch = 0
        self.boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if boxes is not None:
            unknown = sorted(set(boxes["class"]) - set(self.classes))
            if unknown:
                raise DetectorError(f"training boxes have classes not in the dataset: {unknown}")
            ids = boxes["image_id"].astype(str).to_numpy()
            xy = boxes[BOX].to_numpy(np.float32)
            lab = boxes["class"].map(self.class_index).to_numpy(np.int64)
            for image_id in np.unique(ids):
                sel = ids == image_id
                self.boxes[image_id] = (xy[sel], lab[sel])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def flipped(self, i: int) -> bool:
        if not self.flip:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5)

    def __getitem__(self, i: int):
        row = self.images.iloc[i]
        image_id = str(row["image_id"])
        img = read_image(row["path"])
        h, w = img.shape[:2]
        if "width" in row and "height" in row and (int(row["width"]), int(row["height"])) != (w, h):
            raise DetectorError(f"{row['path']}: image is {w}x{h} but the dataset says {row['width']}x{row['height']}")
        props = np.zeros((0, 4), np.float32) if self.proposals is None else _get_proposals(self.proposals, image_id)
        boxes, labels = self.boxes.get(image_id, (np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
        if self.flipped(i):
            img = img[:, ::-1]
            props = flip_boxes(props, w)
            boxes = flip_boxes(boxes, w)
        tensor = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
        target = {"boxes": torch.from_numpy(np.array(boxes, np.float32)).reshape(-1, 4),
                  "labels": torch.from_numpy(np.array(labels, np.int64))}
        return tensor, torch.from_numpy(props), target, image_id


def _collate(batch):
    return tuple(zip(*batch))


# ----------------------------------------------------------------------------------------------- box sources
def load_training_boxes(source: str, *, objects: pd.DataFrame | None = None, path: str | os.PathLike | None = None,
                        image_ids: Iterable[str] | None = None, classes: Sequence[str] | None = None,
                        images: pd.DataFrame | None = None) -> pd.DataFrame:
    """Training boxes ``image_id, class, x1, y1, x2, y2`` from one of :data:`BOX_SOURCES`.

    * ``"pseudo"``: a pseudo label CSV at ``path`` (:func:`pipeline.export.read_pseudo_labels`);
    * ``"gt"``: ``objects`` (the manifest's), difficult objects left out (py-faster-rcnn's ``use_diff=False``);
    * ``"voc_dir"``: a VOC ``Annotations/`` folder at ``path``, one XML per image of ``image_ids`` (each must
      exist; difficult objects left out);
    * ``"coco"``: a COCO JSON at ``path`` (:func:`pipeline.export.read_coco`; crowd boxes left out).

    Only images in ``image_ids`` are kept (when given). Boxes are checked against the image sizes of ``images``
    (``image_id, width, height``) when given: a box outside the image by more than a pixel is an error naming
    the source; smaller overhangs are clipped.
    """
    from . import export

    if source not in BOX_SOURCES:
        raise ValueError(f"unknown box source {source!r}; choose one of {BOX_SOURCES}")
    ids = None if image_ids is None else [str(i) for i in image_ids]
    if source == "gt":
        if objects is None:
            raise ValueError("box source 'gt' needs the ground-truth objects table")
        df = objects[~objects["difficult"].astype(bool)] if "difficult" in objects else objects
        what = "ground truth"
    else:
        if not path:
            raise ValueError(f"box source {source!r} needs a path")
        what = str(path)
        if source == "pseudo":
            df = export.read_pseudo_labels(path)
        elif source == "voc_dir":
            if not Path(path).is_dir():
                raise FileNotFoundError(f"{path}: annotation folder not found")
            df = export.read_voc_annotations(path, ids, classes)
            df = df[~df["difficult"].astype(bool)]
        else:
            df, _, _ = export.read_coco(path)
            if "iscrowd" in df:
                df = df[df["iscrowd"].astype(int) == 0]
    df = df[["image_id", "class"] + BOX].copy()
    df["image_id"] = df["image_id"].astype(str)
    if ids is not None:
        df = df[df["image_id"].isin(set(ids))]
    if classes is not None:
        unknown = sorted(set(df["class"]) - set(classes))
        if unknown:
            raise DetectorError(f"{what}: boxes of unknown classes {unknown}; the dataset's classes are "
                                f"{list(classes)}")
    if images is not None and len(df):
        size = images.drop_duplicates("image_id").set_index(images.drop_duplicates("image_id")["image_id"]
                                                            .astype(str))[["width", "height"]]
        missing = sorted(set(df["image_id"]) - set(size.index))
        if missing:
            raise DetectorError(f"{what}: boxes of images not in the dataset, e.g. {missing[:3]}")
        wh = size.loc[df["image_id"]].to_numpy(np.float64)
        xy = df[BOX].to_numpy(np.float64, copy=True)
        out = (xy[:, 0] < -1) | (xy[:, 1] < -1) | (xy[:, 2] > wh[:, 0] + 1) | (xy[:, 3] > wh[:, 1] + 1)
        if out.any():
            k = int(np.flatnonzero(out)[0])
            raise DetectorError(f"{what}: box {xy[k].tolist()} of image {df['image_id'].iloc[k]} lies outside its "
                                f"{int(wh[k, 0])}x{int(wh[k, 1])} image")
        xy[:, [0, 2]] = np.clip(xy[:, [0, 2]], 0, wh[:, [0]])
        xy[:, [1, 3]] = np.clip(xy[:, [1, 3]], 0, wh[:, [1]])
        df[BOX] = xy
    xy = df[BOX].to_numpy(np.float64)
    bad = ~np.isfinite(xy).all(1) | (xy[:, 2] <= xy[:, 0]) | (xy[:, 3] <= xy[:, 1])
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise DetectorError(f"{what}: empty or non-finite box {xy[k].tolist()} of image {df['image_id'].iloc[k]}")
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------- training
def make_optimizer(model: nn.Module, cfg: DetectorConfig) -> torch.optim.SGD:
    """SGD, Caffe style: weights at ``lr`` with weight decay, biases at ``2 lr`` without."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith(".bias") else weights).append(p)
    groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
              {"params": biases, "lr": 2 * cfg.lr, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


save_checkpoint = checkpoints.save_checkpoint  # atomic; plain data only (see pipeline.engine.checkpoint)


def strip_checkpoint(path: str | os.PathLike) -> Path:
    """Drop the optimizer / scheduler / scaler state from a finished run's checkpoint (atomically)."""
    return checkpoints.strip_checkpoint(path, error=DetectorError)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint dict, read with ``weights_only=True`` (no code runs from the file); DetectorError when
    unreadable, FileNotFoundError when missing."""
    return checkpoints.load_checkpoint(path, map_location, error=DetectorError)


def load_detector(path: str | os.PathLike, device: torch.device | str = "cpu", weights: str = "random") -> FastRCNN:
    """Rebuild a detector from a checkpoint (its ``args``, ``classes``) and load its weights.

    The architecture is built with ``weights`` (default random: every tensor is overwritten by the checkpoint)."""
    ckpt = load_checkpoint(path)
    cfg = replace(DetectorConfig.from_dict(ckpt["args"]), weights=weights)
    model = build_detector(ckpt["classes"], cfg)
    model.load_state_dict(ckpt["model"])
    model.config = DetectorConfig.from_dict(ckpt["args"])
    return model.to(device).eval()


class _DetectionTask:
    """:func:`train_detector`'s part of the engine's loop (:class:`pipeline.engine.TrainTask`): each epoch a seeded
    order of the images with boxes, cut into batches of ``images_per_batch`` (this rank's pieces), a new
    DataLoader (its workers copy the dataset with the epoch's flips), the sum of the RoI heads' losses."""

    def __init__(self, model: FastRCNN, dataset: DetectionDataset, keep: list[int], device: torch.device,
                 iters_per_epoch: int, rank: int, world: int):
        self.model, self.dataset, self.keep, self.device = model, dataset, keep, device
        self.cfg, self.iters_per_epoch, self.rank, self.world = model.config, iters_per_epoch, rank, world
        self.sums: dict[str, float] = {}

    def start_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.model.train()
        self.sums = {}

    def batches(self, epoch: int) -> torch.utils.data.DataLoader:
        order = [self.keep[j] for j in np.random.default_rng([self.cfg.seed, epoch, 7]).permutation(len(self.keep))]
        sampler = D.RankBatchSampler(order, self.cfg.images_per_batch, False, self.rank, self.world,
                                     max_batches=self.iters_per_epoch)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=_collate,
                                           num_workers=self.cfg.num_workers)

    def step(self, net: nn.Module, batch) -> Step:
        imgs, props, targets, _ = batch
        imgs = [i.to(self.device, non_blocking=True) for i in imgs]
        props = [p.to(self.device) for p in props]
        targets = [{"boxes": t["boxes"].to(self.device), "labels": t["labels"].to(self.device)} for t in targets]
        losses = net(imgs, props, targets)
        return Step(sum(losses.values()), len(imgs), {k: v.detach() for k, v in losses.items()})

    def record(self, step: Step, share: float) -> None:
        for k, v in step.logs.items():  # this rank's share of the global batch's mean
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * share

    def describe(self, batch, step: Step) -> str:
        return f", { {k: float(v) for k, v in step.logs.items()} }, images {list(batch[3])}"

    def end_epoch(self, stats: EpochStats) -> dict:
        sums = self.sums
        if self.world > 1:  # the whole batches' mean losses
            keys = sorted(sums)
            total = D.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device))
            sums = dict(zip(keys, total.tolist()))
        n_it = max(stats.iterations, 1)
        row = {"epoch": stats.epoch + 1, "iterations": stats.iterations, "lr": stats.lr_end[0],
               "seconds": round(stats.seconds, 3), "s_per_iter": round(stats.seconds / n_it, 4),
               **{k: v / n_it for k, v in sums.items()}}
        row["loss"] = sum(v for k, v in row.items() if k.startswith("loss_"))
        return row


def _warmup(cfg: DetectorConfig, iters_per_epoch: int) -> Callable[[torch.optim.Optimizer, int, int], None]:
    """The lr hook: a linear warmup over the first ``cfg.warmup_iters`` iterations (on top of MultiStepLR)."""
    def hook(optimizer: torch.optim.Optimizer, epoch: int, it: int) -> None:
        global_it = epoch * iters_per_epoch + it
        if cfg.warmup_iters and global_it < cfg.warmup_iters:
            f = (global_it + 1) / cfg.warmup_iters
            for g, base in zip(optimizer.param_groups, (cfg.lr, 2 * cfg.lr)):
                g["lr"] = base * f * (cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps))
    return hook


def _detector_seed(seed: int) -> Callable[[int, int], int]:
    # not pipeline.engine.epoch_seed: this formula is what every detector was trained with (RoI sampling, dropout);
    # another one would change every result
    return lambda epoch, rank: seed * 100003 + epoch + 1000003 * rank


def train_detector(model: FastRCNN, dataset: DetectionDataset, checkpoint: str | os.PathLike,
                   device: torch.device | str = "cpu", resume: bool = True,
                   max_iters_per_epoch: int | None = None,
                   on_epoch: Callable[[dict], None] | None = None, progress: bool = True) -> pd.DataFrame:
    """Train ``model`` on ``dataset`` with the recipe of ``model.config``; returns the per-epoch log table.

    Under torchrun (``WORLD_SIZE`` > 1, see :func:`train_detector_distributed`) the model is wrapped in
    DistributedDataParallel and each global batch of ``images_per_batch`` images is split over the processes, each
    process's loss weighted by its share of the batch, so N processes take the same optimizer steps as one (but for
    a last batch smaller than N, which joins the one before it; the RoI sampling differs); only rank 0 writes the
    checkpoint.

    After every epoch the checkpoint dict ``{model, optimizer, lr_scheduler, scaler, epoch, args, classes, log}``
    is written atomically to ``checkpoint``; with ``resume`` an existing checkpoint is continued from the epoch
    after the one it holds (a finished run returns at once; its ``args`` must be this config's but for
    ``DetectorConfig.RUNTIME_FIELDS``, e.g. a longer ``epochs``); without, it is removed first. A non-finite loss
    or weights stop training with :class:`DetectorNonFiniteError` naming the epoch, iteration and images; the last
    checkpoint stays as it was. ``max_iters_per_epoch`` caps iterations (smoke tests, timing). The loop is
    :func:`pipeline.engine.fit`; the model is left in eval mode.
    """
    cfg = model.config
    world, rank = D.world_size(), D.rank()
    device = D.local_device(device) if world > 1 else torch.device(device)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)
    keep = [i for i in range(len(dataset)) if len(dataset.boxes.get(str(dataset.images.image_id.iloc[i]), ((),))[0])]
    if not keep:
        raise DetectorError("no training image has a box")
    if len(keep) < world:
        raise DetectorError(f"{len(keep)} training image(s) cannot be split over {world} processes")
    iters_per_epoch = math.ceil(len(keep) / cfg.images_per_batch)
    if max_iters_per_epoch:
        iters_per_epoch = min(iters_per_epoch, max_iters_per_epoch)
    task = _DetectionTask(model, dataset, keep, device, iters_per_epoch, rank, world)
    spec = FitSpec(model, optimizer, task, Path(checkpoint), cfg.to_dict(), cfg.epochs, device,
                   scheduler=scheduler, scheduler_interval="epoch", lr_hook=_warmup(cfg, iters_per_epoch),
                   seed=_detector_seed(cfg.seed), amp=bool(cfg.amp and device.type == "cuda"),
                   runtime_args=DetectorConfig.RUNTIME_FIELDS, extra={"classes": list(model.classes)},
                   name="detector", error=DetectorError, nonfinite_error=DetectorNonFiniteError)
    on_epoch_end = (lambda epoch, row: on_epoch(row)) if on_epoch is not None and rank == 0 else None
    return pd.DataFrame(fit(spec, resume=resume, progress=progress, on_epoch_end=on_epoch_end))


def _train_detector_rank(model: FastRCNN, dataset: DetectionDataset, checkpoint: str, device: str = "auto",
                         max_iters_per_epoch: int | None = None, progress: bool = True) -> None:
    """What each torchrun process runs (:func:`train_detector_distributed`)."""
    train_detector(model, dataset, checkpoint, device, resume=True, max_iters_per_epoch=max_iters_per_epoch,
                   progress=progress)


def train_detector_distributed(model: FastRCNN, dataset: DetectionDataset, checkpoint: str | os.PathLike,
                               device: torch.device | str = "auto", *, nproc: int = 2,
                               max_iters_per_epoch: int | None = None, progress: bool = True,
                               env: dict | None = None) -> pd.DataFrame:
    """:func:`train_detector` in ``nproc`` processes (torch DDP under ``torchrun --standalone``; one GPU each on
    CUDA, gloo on the CPU; :func:`pipeline.distributed.launch`), resumable from ``checkpoint`` like it. Afterwards
    ``model`` holds the trained weights (read from the final checkpoint); returns the training log. ``nproc=1``
    trains in this process."""
    if nproc <= 1:
        return train_detector(model, dataset, checkpoint, device, resume=True,
                              max_iters_per_epoch=max_iters_per_epoch, progress=progress)
    dev = torch.device(device) if isinstance(device, torch.device) else resolve_device(device)
    D.check_processes(nproc, dev, model.config.images_per_batch, "images per batch")
    checkpoint = Path(checkpoint)
    D.launch("pipeline.detector:_train_detector_rank",
             {"model": model.cpu(), "dataset": dataset, "checkpoint": str(checkpoint), "device": dev.type,
              "max_iters_per_epoch": max_iters_per_epoch, "progress": progress},
             nproc, checkpoint.parent, device=dev.type, env=env)
    # the finished checkpoint: loads the weights and the log, trains nothing
    return train_detector(model, dataset, checkpoint, dev, resume=True, progress=False)


# ---------------------------------------------------------------------------------------------------- testing
@contextmanager
def _test_settings(model: FastRCNN, score_thresh: float | None = None, detections_per_img: int | None = None,
                   nms_thresh: float | None = None):
    """Temporarily change the test-time score threshold / per-image cap / per-class NMS IoU of ``model.roi_heads``."""
    heads = model.roi_heads
    saved = heads.score_thresh, heads.detections_per_img, heads.nms_thresh
    if score_thresh is not None:
        heads.score_thresh = float(score_thresh)
    if detections_per_img is not None:
        heads.detections_per_img = int(detections_per_img)
    if nms_thresh is not None:
        heads.nms_thresh = float(nms_thresh)
    try:
        yield
    finally:
        heads.score_thresh, heads.detections_per_img, heads.nms_thresh = saved


@torch.no_grad()
def detect(model: FastRCNN, dataset: DetectionDataset, device: torch.device | str = "cpu", batch_size: int = 1,
           progress: bool = True, top_per_class: bool = False,
           test_settings: Mapping[str, float | int] | None = None) -> tuple[pd.DataFrame, dict]:
    """Detections on every image of ``dataset``: ``(dets, stats)``.

    ``dets``: ``image_id, class, score, x1, y1, x2, y2`` (original-image coordinates; per-class NMS and the
    per-image cap of the model's config applied). ``stats``: ``images``, ``seconds`` (whole loop, image reading
    included), ``model_seconds`` (forward passes only, synchronised on CUDA), ``fps`` and ``model_fps``.

    ``top_per_class`` (for CorLoc): no score threshold and no per-image cap, and only the highest-scoring box of
    each class in each image is kept, so every class gets its top box however low its score (NMS never removes
    a class's top-scoring box; with the test-time threshold an image could have no box of its class at all).
    ``test_settings`` (not with ``top_per_class``): other test-time ``score_thresh``, ``detections_per_img`` or
    ``nms_thresh`` than the model's config for this call (re-localisation, :mod:`pipeline.relocalize`).
    """
    from tqdm import tqdm

    device = torch.device(device)
    model.to(device).eval()
    use_amp = bool(model.config.amp and device.type == "cuda")
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=_collate,
                                         num_workers=model.config.num_workers)
    rows, model_s = [], 0.0
    t0 = time.perf_counter()
    if top_per_class and test_settings:
        raise ValueError("detect: top_per_class sets its own test settings; pass one or the other")
    settings = (_test_settings(model, -1.0, 2 ** 31 - 1) if top_per_class
                else _test_settings(model, **test_settings) if test_settings else nullcontext())
    with settings:
        for imgs, props, _, ids in tqdm(loader, total=len(batches), desc="detect", leave=False,
                                        disable=not progress):
            imgs = [i.to(device) for i in imgs]
            props = [p.to(device) for p in props]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                out = model(imgs, props)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            model_s += time.perf_counter() - t1
            for image_id, o in zip(ids, out):
                b = o["boxes"].float().cpu().numpy()
                s = o["scores"].float().cpu().numpy()
                lab = o["labels"].cpu().numpy()
                keep = np.arange(len(s))
                if top_per_class:  # first (= highest-scoring, outputs are sorted by score) box of each class
                    keep = np.sort(np.unique(lab, return_index=True)[1])
                for k in keep:
                    rows.append((image_id, model.classes[int(lab[k]) - 1], float(s[k]), *map(float, b[k])))
    seconds = time.perf_counter() - t0
    dets = pd.DataFrame(rows, columns=["image_id", "class", "score"] + BOX)
    n = len(dataset)
    stats = {"images": n, "seconds": round(seconds, 3), "model_seconds": round(model_s, 3),
             "fps": n / seconds if seconds > 0 else float("nan"),
             "model_fps": n / model_s if model_s > 0 else float("nan"), "device": str(device)}
    return dets, stats


def top_detections(dets: pd.DataFrame) -> pd.DataFrame:
    """The highest-scoring detection per (image, class): the boxes CorLoc of a detector scores."""
    return (dets.sort_values("score", ascending=False, kind="mergesort")
            .drop_duplicates(["image_id", "class"]).reset_index(drop=True))
