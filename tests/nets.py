"""Tiny networks for tests: real ClassifierNet instances small enough to run in milliseconds on CPU."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from pipeline.backbones import ClassifierNet, LayerInfo


def tiny_classifier(num_classes: int = 3, seed: int = 0, *, scale: float = 0.5, input_size: int = 32,
                    conv2_stride: int = 2, names: tuple[str, str] = ("conv1", "conv2")) -> ClassifierNet:
    """Two 3x3 convolutions (stride 2, then ``conv2_stride``), global average pooling and a linear head, with
    seeded normal weights times ``scale``; no dropout or batch norm (so several processes can match one exactly).
    CAM layers ``conv1`` (stride 2) and ``conv2`` (stride 2 * ``conv2_stride``, the default), or the two
    ``names`` given (stand-ins for a real backbone's layers). Built only from torch modules, so torchrun's processes
    can unpickle it without this module. In eval mode."""
    g = torch.Generator().manual_seed(seed)
    body = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 3, stride=2, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 8, 3, stride=conv2_stride, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten(1))]))
    head = nn.Linear(8, num_classes)
    with torch.no_grad():
        for p in list(body.parameters()) + list(head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return ClassifierNet("tiny", body, head, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=input_size,
                         layers={names[0]: LayerInfo("relu1", 8, 2), names[1]: LayerInfo("relu2", 8, 2 * conv2_stride)},
                         cam_layers=tuple(names), default_cam_layer=names[1]).eval()
