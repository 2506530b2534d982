"""CAM methods (pytorch-grad-cam style): Grad-CAM (paper Eq. 1-2) and SA-CAM (Eq. 3, = LayerCAM).

One base class owns the hook machinery; each method is a tiny subclass overriding one method. A CAM object is a
context manager that removes its hook on exit::

    with SACAM(net, "conv5_2") as cam:
        maps = cam(crops, classes)       # (B, h, w) float32 raw maps, on the crops' device

All crops in ``crops`` go through ONE forward and ONE backward of the summed per-sample class scores (the model
must be in eval mode, so sample b's score depends only on sample b and the summed gradient is per-sample).
Efficient path (default): the layers below the CAM layer run without autograd (the hook cuts the graph there and
switches autograd on for the rest), and the backward runs only from the class scores down to the CAM layer,
computing no weight gradients. Common CAM libraries instead backpropagate one crop at a time through the whole
network to the input (``efficient=False`` keeps the graph below, for comparison).

Several layers in one pass: ``SACAM(net, layers=("stage5_expand", "stage6"))`` hooks each layer; the graph is cut
at the lowest one reached in the forward pass, and the one backward from the class scores yields every layer's
gradient on its way down (``autograd.grad`` with all the layers' activations as inputs). Each layer's map comes
from its own activation and gradient, exactly as a pass of its own would compute it::

    with SACAM(net, layers=("stage5_expand", "stage6")) as cam:
        by_layer = cam.forward_layers(crops, classes)   # {"stage5_expand": (B, h5, w5), "stage6": (B, h6, w6)}
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


# -- targets ------------------------------------------------------------------------------------------------
class ClassifierOutputTarget:
    """The score of one class: ``target(logits_row) -> scalar`` (as pytorch-grad-cam's target of that name)."""

    def __init__(self, category: int):
        self.category = int(category)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output[..., self.category]


def _target_scores(logits: torch.Tensor, targets) -> torch.Tensor:
    """Per-sample target scores ``(B,)``; ``targets`` are class indices (one per sample) or callables."""
    if isinstance(targets, torch.Tensor) or (len(targets) and not callable(targets[0])):
        idx = torch.as_tensor(targets, dtype=torch.long, device=logits.device).reshape(-1)
        if idx.numel() != logits.shape[0]:
            raise ValueError(f"{idx.numel()} targets for a batch of {logits.shape[0]}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= logits.shape[1]):
            raise ValueError(f"target class out of range 0..{logits.shape[1] - 1}: {idx.tolist()}")
        return logits.gather(1, idx[:, None])[:, 0]
    if len(targets) != logits.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]}")
    return torch.stack([t(row) for t, row in zip(targets, logits)])


def _n_targets(targets) -> int:
    return targets.numel() if isinstance(targets, torch.Tensor) else len(targets)


def _repeat_targets(targets):
    """``targets`` of a one-sample batch for the same sample twice."""
    if isinstance(targets, torch.Tensor):
        return targets.reshape(-1).repeat(2)
    return list(targets) * 2


# -- hooks --------------------------------------------------------------------------------------------------
class ActivationsAndGradients:
    """A forward hook on one module that keeps its output ``activations`` for a later ``autograd.grad``.

    With ``cut_below`` the output is replaced by a detached leaf that requires grad, and autograd is switched on
    from there: run the model under ``torch.no_grad()`` and only the layers above the hooked module build a graph.
    The hook acts only while ``active`` (set by the CAM for its own forward pass), so other uses of the model
    while a CAM object exists are untouched.
    """

    def __init__(self, module: nn.Module, cut_below: bool = True):
        self.cut_below = cut_below
        self.active = False
        self.activations: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor):
        if not self.active:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"CAM layer {type(module).__name__} returns {type(output).__name__}, not a tensor")
        # cut only where autograd is still off: the lowest hooked layer of the pass (a higher layer of the same
        # pass is already in the graph; another CAM's hook on this same layer may have cut it already)
        if self.cut_below and not torch.is_grad_enabled():
            if not (output.is_leaf and output.requires_grad):
                output = output.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # restored by the caller's no_grad() on exit
        self.activations = output
        return output

    def release(self) -> None:
        self.handle.remove()
        self.activations = None


class BaseCAM:
    """Shared machinery: hooks, one batched forward/backward, per-method map from (activations, gradients).

    ``model``: a :class:`pipeline.backbones.ClassifierNet` (``layer`` by name, default its default CAM layer; or
    ``layers``, several names, all computed in one pass) or any ``nn.Module`` with ``target_layer`` (or
    ``target_layers``) given as modules. Maps are raw (unnormalised) and float32.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, *, layers: Sequence[str] | None = None,
                 target_layer: nn.Module | None = None, target_layers: Sequence[nn.Module] | None = None,
                 efficient: bool = True):
        self.model = model
        if target_layer is not None or target_layers is not None:
            modules = [target_layer] if target_layer is not None else list(target_layers)
            names = list(layers) if layers else ([layer] if layer else [type(m).__name__ for m in modules])
        else:
            if not hasattr(model, "layer_module"):
                raise TypeError("pass target_layer= for a model that is not a ClassifierNet")
            names = list(layers) if layers else [layer or model.default_cam_layer]
            modules = [model.layer_module(n) for n in names]
        if not names or len(names) != len(modules) or len(set(names)) != len(names):
            raise ValueError(f"CAM layers {names}: each layer once, one name per module")
        if len({id(m) for m in modules}) != len(modules):
            raise ValueError(f"CAM layers {names} name the same module twice")
        self.layers: tuple[str, ...] = tuple(names)
        self.layer = self.layers[0]
        self.efficient = efficient
        self._hooks = [ActivationsAndGradients(m, cut_below=efficient) for m in modules]
        self.outputs: torch.Tensor | None = None  # the model's logits of the last call (pytorch-grad-cam's name)

    # the one method a CAM variant overrides (either of them) ----------------------------------------------
    def get_cam_weights(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cam_image(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """``(B, K, h, w)`` activations and gradients -> ``(B, h, w)`` map: ReLU(sum_k w_k A_k)."""
        weights = self.get_cam_weights(activations, grads)
        return F.relu((weights * activations).sum(1))

    # ---------------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, targets) -> torch.Tensor:
        return self.forward(x, targets)

    def forward(self, x: torch.Tensor, targets) -> torch.Tensor:
        """The maps ``(B, h, w)`` of a one-layer CAM (:meth:`forward_layers` for several layers)."""
        if len(self.layers) != 1:
            raise ValueError(f"a CAM of layers {self.layers} gives one map per layer: call forward_layers()")
        return self.forward_layers(x, targets)[self.layer]

    def forward_layers(self, x: torch.Tensor, targets) -> dict[str, torch.Tensor]:
        """``{layer: (B, h, w) maps}`` of every layer, from one forward and one backward pass."""
        if x.device.type == "cpu" and x.shape[0] == 1 and _n_targets(targets) == 1:
            # a pass of ONE crop runs as two copies of it: on a CPU, oneDNN's batch-1 kernels (with several
            # threads) round differently from the batched ones, and where that flips a ReLU6 gate the map moves by
            # up to ~1% of its maximum, so a crop's map would depend on the size of the pass it lands in (the
            # last pass of a part, --cam-batch-size 1). Batches of 2 and more take the batched kernels.
            maps = self._one_pass(torch.cat([x, x]), _repeat_targets(targets))
            self.outputs = self.outputs[:1]
            return {k: m[:1] for k, m in maps.items()}
        return self._one_pass(x, targets)

    def _one_pass(self, x: torch.Tensor, targets) -> dict[str, torch.Tensor]:
        if self.model.training:
            raise RuntimeError("CAMs need the model in eval mode (batch norm in train mode mixes the samples of a "
                               "batch); call model.eval() first")
        for h in self._hooks:
            h.activations = None
        grad_ctx = torch.no_grad() if self.efficient else torch.enable_grad()
        try:
            with grad_ctx:
                for h in self._hooks:
                    h.active = True
                logits = self.model(x)
                self.outputs = logits.detach()
                for h in self._hooks:
                    h.active = False
                acts = [h.activations for h in self._hooks]
                missing = [n for n, a in zip(self.layers, acts) if a is None]
                if missing:
                    raise RuntimeError(f"the CAM layer(s) {missing} were not reached in the forward pass")
                scores = _target_scores(logits, targets)
                # one backward, from the class scores down to the lowest layer, every layer's gradient on the way
                grads = torch.autograd.grad(scores.sum(), acts)
        finally:
            for h in self._hooks:
                h.active = False
                h.activations = None
        with torch.no_grad():
            return {n: self.cam_image(a.detach().float(), g.float()).float()
                    for n, a, g in zip(self.layers, acts, grads)}

    def release(self) -> None:
        for h in self._hooks:
            h.release()

    def __enter__(self) -> "BaseCAM":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class GradCAM(BaseCAM):
    """Eq. 1-2: ``w_k = mean_ij dy_c/dA_k[i,j]``; ``M = ReLU(sum_k w_k A_k)``."""

    def get_cam_weights(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads.mean(dim=(2, 3), keepdim=True)


class SACAM(BaseCAM):
    """Eq. 3 (spatial-aware CAM, = LayerCAM): ``M[i,j] = ReLU(sum_k ReLU(dy_c/dA_k[i,j]) * A_k[i,j])``.

    The outer ReLU is LayerCAM's (pytorch-grad-cam applies it to every method); it changes nothing where the
    activations are non-negative (VGG16's post-ReLU layers, where this is exactly Eq. 3) and keeps the map
    non-negative at layers with signed activations (efficientnet_lite0's stage outputs)."""

    def cam_image(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return F.relu((F.relu(grads) * activations).sum(1))


LayerCAM = SACAM
CAM_METHODS: dict[str, type[BaseCAM]] = {"sacam": SACAM, "gradcam": GradCAM}


class InputGradient(BaseCAM):
    """Not a CAM: seed 002's Eq. 1, the gradient of the target score with respect to the input pixels,
    ``max_c |d y / d x_c|`` at the crop's resolution (the BC model's foreground map, :mod:`pipeline.bcct`). Its one
    "layer" is ``input``; the whole network is backpropagated (nothing to cut below)."""

    def __init__(self, model: nn.Module, layer: str | None = None, *, layers: Sequence[str] | None = None,
                 **kwargs):
        names = list(layers) if layers else [layer or "input"]
        if names != ["input"]:
            raise ValueError(f"the input gradient has one layer, 'input', not {names}")
        self.model, self.layers, self.layer, self.efficient, self._hooks = model, ("input",), "input", False, []
        self.outputs: torch.Tensor | None = None

    def _one_pass(self, x: torch.Tensor, targets) -> dict[str, torch.Tensor]:
        if self.model.training:
            raise RuntimeError("input gradients need the model in eval mode")
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            self.outputs = logits.detach()
            (grad,) = torch.autograd.grad(_target_scores(logits, targets).sum(), x)
        return {"input": grad.abs().amax(1).float()}


#: every map a CAM store can hold: the CAM methods and the BC model's input gradient
MAP_METHODS: dict[str, type[BaseCAM]] = {**CAM_METHODS, "input_gradient": InputGradient}


def make_cam(method: str, model: nn.Module, layer: str | None = None, **kwargs) -> BaseCAM:
    """A CAM object of ``method`` (a name of :data:`MAP_METHODS`); ``layers=(...)`` for several layers."""
    try:
        cls = MAP_METHODS[method.lower()]
    except KeyError:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {tuple(MAP_METHODS)}") from None
    return cls(model, layer, **kwargs)
