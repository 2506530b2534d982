"""Global pooling heads of the image-level classifier and its single-pass class activation maps (seeds 003, 004).

Seed 003 (Gudi et al., "Object Extent Pooling", Sec. 3.1-3.2) puts a **CAM layer** after the last convolutional
layer: a 1x1 convolution with one output map per class, *then* a global pooling of each map to the class's score
(pooling after the weights, unlike Zhou et al.'s GAP + fully connected layer), trained with a presence / absence
loss per class. Here the loss is ``BCEWithLogitsLoss`` on the pooled scores (a two-class softmax per class, as the
paper's, is the same function of one logit). At inference the pooling is dropped and the 1x1 convolution's maps
*are* the CAMs, read in one forward pass, no backward (:func:`cam_forward`).

Poolings (:func:`global_pool`):

- ``gmp``: global max pooling (seed 004, Oquab et al., "Is object localization for free?"; the paper's Eq. 1).
- ``gap``: global average pooling (Eq. 2).
- ``spam``: Spatial Pyramid Averaged Max pooling (Eq. 3, Fig. 6): local average pools of kernel ``K_p x K_p`` for
  each pyramid step (:data:`SPAM_KERNELS`: the paper's 1, 2, 5 and N, N the map's size), each followed by a global
  max, the P maxima averaged. The paper does not give the local pools' stride; stride 1 without padding
  (every ``K_p x K_p`` window) is used here, so step 1 is GMP and step N is GAP, as its Fig. 12 says. A map
  smaller than a kernel is pooled with the kernel cut to the map (``min(K_p, H) x min(K_p, W)``).

Networks: :func:`with_cam_head` turns a :class:`pipeline.backbones.ClassifierNet` into body (up to the feature
layer, :func:`feature_layer`) + :class:`CamPoolHead`. Today's GAP classifier (linear head after global average
pooling; the crop classifier, and ``classifier_mode=image_labels`` with ``--classifier-image-pooling gap``) also has
single-pass maps: its linear head applied at every position of the feature layer (Zhou et al.'s CAM), whose mean
is its logit (linearity; dropout is off in eval mode).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ClassifierNet

POOLINGS = ("gap", "gmp", "spam")
#: SPAM's pyramid (seed 003, Sec. 4.1 and 4.2: 1x1, 2x2, 5x5 and NxN); 0 stands for N, the whole map
SPAM_KERNELS: tuple[int, ...] = (1, 2, 5, 0)
#: the layer a CAM head goes after: the last convolutional layer (seed 003 replaces VGG16's fully connected layers)
FEATURE_LAYERS = {"vgg16": "conv5_3"}


def gmp(maps: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C)``: the maximum of each map."""
    return maps.amax(dim=(-2, -1))


def gap(maps: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C)``: the mean of each map."""
    return maps.mean(dim=(-2, -1))


def spam(maps: torch.Tensor, kernels: Sequence[int] = SPAM_KERNELS) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C)``: SPAM pooling (module docstring): for each kernel size ``k`` (0: the whole
    map), the maximum of the ``k x k`` local averages (stride 1), then the mean over the kernels."""
    if not len(kernels):
        raise ValueError("spam: needs at least one kernel size")
    h, w = maps.shape[-2:]
    steps = []
    for k in kernels:
        if k < 0:
            raise ValueError(f"spam: kernel sizes must be >= 1, or 0 for the whole map; got {k}")
        size = (h, w) if k == 0 else (min(k, h), min(k, w))
        steps.append(gmp(F.avg_pool2d(maps, size, stride=1)))
    return torch.stack(steps).mean(0)


def global_pool(maps: torch.Tensor, pooling: str) -> torch.Tensor:
    """One of :data:`POOLINGS` over the last two dimensions."""
    if pooling == "gmp":
        return gmp(maps)
    if pooling == "gap":
        return gap(maps)
    if pooling == "spam":
        return spam(maps)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class CamPoolHead(nn.Module):
    """Seed 003's CAM layer and global pooling: ``conv`` (1x1, one map per class) on the feature maps, then
    :func:`global_pool`. ``forward`` gives the pooled scores (training, classification), :meth:`maps` the CAMs."""

    def __init__(self, in_channels: int, num_classes: int, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        self.pooling = pooling
        self.out_features = num_classes

    def maps(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return global_pool(self.conv(features), self.pooling)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}"


def feature_layer(net: ClassifierNet) -> str:
    """The layer a CAM head goes after: vgg16 ``conv5_3``, the efficientnet-lites ``conv_head`` (their last
    convolution, after its BN + ReLU6), else the network's default CAM layer."""
    return FEATURE_LAYERS.get(net.name, "conv_head" if "conv_head" in net.layers else net.default_cam_layer)


def with_cam_head(net: ClassifierNet, pooling: str, layer: str | None = None, *, seed: int = 0) -> ClassifierNet:
    """``net``'s body up to ``layer`` (default :func:`feature_layer`) and a new :class:`CamPoolHead` with
    ``net.num_classes`` maps (1x1 weights ~ N(0, 0.01), bias 0, drawn from ``seed``; the global RNG is left alone).
    The result shares the body's modules with ``net``; it has ``.pooling`` and ``.feature_layer``."""
    layer = layer or feature_layer(net)
    lower, _ = net.split(layer)
    head = CamPoolHead(net.layers[layer].channels, net.num_classes, pooling)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(head.conv.weight, std=0.01)
        nn.init.zeros_(head.conv.bias)
    layers = {k: v for k, v in net.layers.items() if v.module in lower._modules}
    cam_layers = tuple(c for c in net.cam_layers if c in layers) or (layer,)
    default = net.default_cam_layer if net.default_cam_layer in cam_layers else cam_layers[-1]
    out = ClassifierNet(net.name, lower, head, mean=net.mean, std=net.std, input_size=net.input_size, layers=layers,
                        cam_layers=cam_layers, default_cam_layer=default)
    out.pooling = pooling
    out.feature_layer = layer
    return out


def _linear_head_split(net: ClassifierNet) -> tuple[nn.Module, nn.Linear]:
    """``(body up to the feature layer, linear head)`` of a GAP classifier whose body ends in global average
    pooling (+ flatten / dropout) after the feature layer; ValueError for other networks (VGG16's fc6/fc7)."""
    layer = feature_layer(net)
    lower, upper = net.split(layer)
    rest = list(upper[0].children()) if isinstance(upper[0], nn.Sequential) else [upper[0]]
    pools = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
    ok = isinstance(net.head, nn.Linear) and all(isinstance(m, pools) or type(m).__name__ == "SelectAdaptivePool2d"
                                                 for m in rest)
    if not ok:
        raise ValueError(f"{net.name}: no single-pass CAM: the layers after {layer} are not only global average "
                         f"pooling and a linear head ({[type(m).__name__ for m in rest]}); train an image-level "
                         "network with --classifier-image-pooling spam or gmp")
    return lower, net.head


@torch.no_grad()
def cam_forward(net: ClassifierNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass, no backward: ``(scores (B, C), maps (B, C, h, w))`` of normalised inputs ``x``.

    A :class:`CamPoolHead` network: its 1x1 convolution's maps and their pooling (the network's own output). A GAP
    classifier with a linear head: the head as a 1x1 convolution on the feature layer, and the maps' mean (its
    logits in eval mode)."""
    if isinstance(net.head, CamPoolHead):
        maps = net.head.maps(net.body(x))
        return global_pool(maps, net.head.pooling), maps
    lower, linear = _linear_head_split(net)
    maps = F.conv2d(lower(x), linear.weight[:, :, None, None], linear.bias)
    return gap(maps), maps


def conv_layers(module: nn.Module) -> list[tuple[int, int, int]]:
    """``(kernel, stride, padding)`` of every convolution and pooling window of ``module`` in the order they are
    defined (for :func:`pipeline.extent.backproject`; the main path of a feed-forward network, whose residual
    shortcuts only shrink the receptive field). Dilation widens the kernel to ``d (k - 1) + 1``. Square windows
    only; ValueError for a string padding or a non-square window."""
    out = []
    for name, m in module.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        k, s, p = (m.kernel_size, m.stride, m.padding)
        d = getattr(m, "dilation", 1)
        k, s, p, d = ((v, v) if isinstance(v, int) else tuple(v) for v in (k, s, p, d))
        if isinstance(m.padding, str) or len({k[0], k[1]}) > 1 or len({s[0], s[1]}) > 1 or len({p[0], p[1]}) > 1:
            raise ValueError(f"layer {name} ({type(m).__name__}): kernel {k}, stride {s}, padding {m.padding}: only "
                             "square windows with integer padding can be back-projected")
        out.append((d[0] * (k[0] - 1) + 1, s[0], p[0]))
    return out


def feature_body(net: ClassifierNet) -> nn.Module:
    """The part of ``net`` whose output the single-pass maps are computed on."""
    return net.body if isinstance(net.head, CamPoolHead) else _linear_head_split(net)[0]


def whole_image_batches(images: pd.DataFrame, input_px: int, mean, std, batch_size: int = 16,
                        workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches ``(x, index)`` of whole images (``images``: ``image_id, width, height, path``) squashed to
    ``input_px`` squares and normalised exactly as the image-level classifier's training inputs (no
    augmentation)."""
    from .classifier import CropDataset

    t = images.drop_duplicates("image_id").reset_index(drop=True)
    boxes = np.stack([np.zeros(len(t)), np.zeros(len(t)), t["width"].to_numpy(float), t["height"].to_numpy(float)], 1)
    ds = CropDataset(t["image_id"].astype(str).tolist(), boxes, np.arange(len(t)),
                     dict(zip(t["image_id"].astype(str), t["path"])), input_size=input_px, mean=mean, std=std)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)


def whole_image_maps(net: ClassifierNet, images: pd.DataFrame, *, input_px: int | None = None,
                     batch_size: int = 16, device: torch.device | str = "cpu", workers: int = 0,
                     progress: bool = True) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Per image of ``images`` (in its order, each image once): ``(image_id, scores (C,), maps (C, h, w))`` float32,
    from one forward pass of the whole image (:func:`cam_forward`) squashed to ``input_px`` (default the network's
    input size)."""
    from tqdm import tqdm

    net.eval()
    dev = torch.device(device)
    loader = whole_image_batches(images, int(input_px or net.input_size), net.mean, net.std, batch_size, workers)
    ids = loader.dataset.image_ids
    for x, index in tqdm(loader, desc="whole-image CAMs", leave=False, disable=not progress):
        scores, maps = cam_forward(net, x.to(dev))
        scores, maps = scores.float().cpu().numpy(), maps.float().cpu().numpy()
        for k, i in enumerate(index.tolist()):
            yield ids[i], scores[k], maps[k]
