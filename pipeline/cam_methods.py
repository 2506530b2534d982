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
"""
from __future__ import annotations

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
        if self.cut_below:
            if not (output.is_leaf and output.requires_grad):  # (else another CAM's hook on this layer cut it)
                output = output.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # restored by the caller's no_grad() on exit
        self.activations = output
        return output

    def release(self) -> None:
        self.handle.remove()
        self.activations = None


class BaseCAM:
    """Shared machinery: hook, one batched forward/backward, per-method map from (activations, gradients).

    ``model``: a :class:`pipeline.backbones.ClassifierNet` (``layer`` by name, default its default CAM layer)
    or any ``nn.Module`` with ``target_layer`` given as a module. Maps are raw (unnormalised) and float32.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, *, target_layer: nn.Module | None = None,
                 efficient: bool = True):
        self.model = model
        if target_layer is None:
            if not hasattr(model, "layer_module"):
                raise TypeError("pass target_layer= for a model that is not a ClassifierNet")
            self.layer = layer or model.default_cam_layer
            target_layer = model.layer_module(self.layer)
        else:
            self.layer = layer or type(target_layer).__name__
        self.efficient = efficient
        self._hook = ActivationsAndGradients(target_layer, cut_below=efficient)
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
        if x.device.type == "cpu" and x.shape[0] == 1 and _n_targets(targets) == 1:
            # a pass of ONE crop runs as two copies of it: on a CPU, oneDNN's batch-1 kernels (with several
            # threads) round differently from the batched ones, and where that flips a ReLU6 gate the map moves by
            # up to ~1% of its maximum, so a crop's map would depend on the size of the pass it lands in (the
            # last pass of a part, --cam-batch-size 1). Batches of 2 and more take the batched kernels.
            maps = self.forward(torch.cat([x, x]), _repeat_targets(targets))
            self.outputs = self.outputs[:1]
            return maps[:1]
        if self.model.training:
            raise RuntimeError("CAMs need the model in eval mode (batch norm in train mode mixes the samples of a "
                               "batch); call model.eval() first")
        self._hook.activations = None
        grad_ctx = torch.no_grad() if self.efficient else torch.enable_grad()
        try:
            with grad_ctx:
                self._hook.active = True
                logits = self.model(x)
                self.outputs = logits.detach()
                self._hook.active = False
                acts = self._hook.activations
                if acts is None:
                    raise RuntimeError(f"the CAM layer {self.layer} was not reached in the forward pass")
                scores = _target_scores(logits, targets)
                (grads,) = torch.autograd.grad(scores.sum(), acts)
        finally:
            self._hook.active = False
            self._hook.activations = None
        with torch.no_grad():
            return self.cam_image(acts.detach().float(), grads.float()).float()

    def release(self) -> None:
        self._hook.release()

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


def make_cam(method: str, model: nn.Module, layer: str | None = None, **kwargs) -> BaseCAM:
    try:
        cls = CAM_METHODS[method.lower()]
    except KeyError:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {tuple(CAM_METHODS)}") from None
    return cls(model, layer, **kwargs)
