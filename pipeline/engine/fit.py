"""The training loop shared by the crop classifier and the Fast R-CNN detector.

A trainer is a model, an optimizer and a :class:`TrainTask` (its data as one batch iterator per epoch, its loss
and its log row); :func:`fit` runs epochs of ``forward -> loss -> backward -> step`` with

* resume from the per-epoch checkpoint (its ``args`` checked against this run's; a resumed run ends with the
  weights of an uninterrupted one, bit for bit on the CPU);
* per-epoch seeding of torch's global generator inside a ``fork_rng`` (dropout, RoI sampling: the same stream
  whether resumed or not; the caller's generator state is left as it was);
* AMP (float16 autocast + ``GradScaler``) when ``FitSpec.amp``;
* DDP under torchrun (:mod:`pipeline.distributed`): the model is wrapped in ``DistributedDataParallel``, every
  rank's batch is its piece of one global batch and its loss is weighted by its share of that batch
  (:func:`rank_weight`), so the ranks take the optimizer steps of one process; logged losses are the global
  batches'; only rank 0 writes;
* micro-batches (one process): a task with a ``micro_batches(batch)`` method (see :class:`TrainTask`) has each
  batch forwarded and backpropagated in pieces, the gradients summed before the one optimizer step, so a step
  holds one piece's activations (:meth:`_Loop.accumulated_iteration`);
* a guard against non-finite losses and weights (:class:`NonFiniteLossError`; the last good checkpoint is kept);
* optional clipping of the gradient's total norm before each step (``FitSpec.clip_grad_norm``);
* an lr schedule: a torch scheduler stepped per iteration or per epoch, and an optional per-iteration hook
  (warmup) run before each step;
* a checkpoint dict ``{model, optimizer, lr_scheduler, scaler, epoch, args, ..., log}`` written atomically after
  every epoch (:mod:`pipeline.engine.checkpoint`), and a per-iteration log row for ``on_iteration``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from .. import distributed as D
from ..io import write_csv
from .checkpoint import CheckpointError, check_args, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss (or the weights) became NaN or infinite; training stopped and the last good checkpoint
    was kept."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of torch's global generator for ``epoch`` of a run seeded ``seed`` (rank 0; rank r adds r)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), 3]).generate_state(1)[0])


def rank_weight(n_local: int, n_global: int, world: int) -> float:
    """Factor on a rank's mean loss so that DDP's average of the ranks' gradients is the global batch's: the rank's
    share of the batch (``n_local / n_global``) times ``world``."""
    return n_local * world / n_global


@dataclass
class Step:
    """One forward pass of a rank's batch: ``loss`` (mean over its ``n`` items, what is backpropagated) and
    ``logs`` (detached scalars for the per-iteration row and the task's own bookkeeping)."""

    loss: torch.Tensor
    n: int
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EpochStats:
    """What the loop measured in one epoch (items and loss over all ranks)."""

    epoch: int                   # 0-based
    iterations: int
    items: int                   # global batch items seen
    loss_sum: float              # sum over iterations of (global batch mean loss x global batch items), float64
    seconds: float
    lr_start: dict[str, float]   # each param group's lr (by its "name", else its index) at the epoch's start
    lr_end: list[float]          # each param group's lr at the last iteration (before an epoch scheduler steps)


class TrainTask(Protocol):
    """The model-specific part of a training run.

    Optional: ``micro_batches(batch) -> [(micro_batch, items), ...]``, the batch in pieces for :meth:`step`, each
    forwarded and backpropagated on its own (one process only; under DDP each rank's batch is stepped whole). The
    pieces' gradients add up to the batch's only when the forward treats samples independently (no BatchNorm in
    train mode). Floating-point ``Step.logs`` are then averaged over the pieces by their items, integer ones
    (counts) summed."""

    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's batches: train mode (frozen layers), the data's epoch."""

    def batches(self, epoch: int) -> Iterable:
        """This rank's batches of ``epoch`` (with ``len``); called after the epoch's seeding."""

    def step(self, net: nn.Module, batch) -> Step:
        """Forward pass and loss (under autocast when AMP is on)."""

    def record(self, step: Step, share: float) -> None:
        """Book-keep one iteration; ``share`` is this rank's share of the global batch (1.0 for one process)."""

    def describe(self, batch, step: Step) -> str:
        """More words for the non-finite loss error (e.g. the batch's images); may be empty."""

    def end_epoch(self, stats: EpochStats) -> dict:
        """The epoch's log row (the task reduces its own bookkeeping over the ranks here)."""


@dataclass
class FitSpec:
    """One training run: the parts, where it writes, and the rules a trainer picks."""

    model: nn.Module                    # on ``device`` already
    optimizer: torch.optim.Optimizer
    task: TrainTask
    checkpoint: Path
    args: dict                          # stored as ``args``; a resume with other values (outside runtime_args) fails
    epochs: int
    device: torch.device
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scheduler_interval: str = "iteration"   # "iteration" | "epoch": when ``scheduler.step()`` runs
    lr_hook: Callable[[torch.optim.Optimizer, int, int], None] | None = None  # (optimizer, epoch, it), pre-step
    seed: Callable[[int, int], int] | None = None  # (epoch, rank) -> torch seed; default epoch_seed(0, e) + rank
    amp: bool = False
    runtime_args: Sequence[str] = ()    # args that do not change the result and may differ when resuming
    extra: Mapping = field(default_factory=dict)  # more checkpoint entries, equal on resume (e.g. classes)
    broadcast_buffers: bool = True      # DDP: send rank 0's buffers before each forward (not for frozen BN)
    clip_grad_norm: float | None = None  # clip the gradient's total L2 norm to this before each step (None: off)
    log_csv: Path | None = None         # rank 0 writes the log table here after every epoch
    name: str = "model"                 # in messages
    error: type[Exception] = CheckpointError          # checkpoint problems
    nonfinite_error: type[Exception] = NonFiniteLossError

    def __post_init__(self):
        if self.scheduler_interval not in ("iteration", "epoch"):
            raise ValueError(f"scheduler_interval must be 'iteration' or 'epoch', got {self.scheduler_interval!r}")
        self.checkpoint = Path(self.checkpoint)


def fit(spec: FitSpec, *, resume: bool = True, progress: bool = True,
        on_epoch_end: Callable[[int, dict], None] | None = None,
        on_iteration: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``spec.model`` for the epochs ``spec.checkpoint`` does not hold yet; returns the log rows of every
    epoch (those read from the checkpoint included). With ``resume`` an existing checkpoint is continued; without,
    it is removed first. ``on_epoch_end(epoch, row)`` runs on every rank after the epoch's checkpoint is written;
    ``on_iteration(row)`` gets each iteration's row (epoch, iteration, items, loss, lr, the step's logs). The
    model is left in eval mode."""
    return _Loop(spec, progress, on_iteration).run(resume, on_epoch_end)


class _Loop:
    def __init__(self, spec: FitSpec, progress: bool, on_iteration: Callable[[dict], None] | None):
        self.spec, self.on_iteration = spec, on_iteration
        self.world, self.rank = D.world_size(), D.rank()
        self.main = self.rank == 0
        self.progress = progress and self.main
        self.net = spec.model  # what batches go through: the model or its DDP wrapper (same parameters)
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                spec.model, device_ids=[spec.device.index] if spec.device.type == "cuda" else None,
                broadcast_buffers=spec.broadcast_buffers)
        self.scaler = torch.amp.GradScaler("cuda", enabled=spec.amp)
        self.rows: list[dict] = []
        self.last_good = 0  # epochs (1-based count) in the checkpoint on disk

    def run(self, resume: bool, on_epoch_end) -> list[dict]:
        spec = self.spec
        start = self.resume() if resume else self.start_fresh()
        D.barrier()  # every rank has read the checkpoint before rank 0 may replace it
        # the epochs re-seed the global generator: inside a fork, the caller's state is untouched
        with torch.random.fork_rng(devices=[spec.device] if spec.device.type == "cuda" else []):
            for epoch in range(start, spec.epochs):
                row = self.epoch(epoch)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, row)
                D.barrier()
        if self.main and spec.log_csv is not None and not spec.log_csv.is_file():
            write_csv(pd.DataFrame(self.rows), spec.log_csv)
        D.barrier()  # the checkpoint and log are complete when any rank returns
        spec.model.eval()
        return self.rows

    def start_fresh(self) -> int:
        if self.main and self.spec.checkpoint.exists():
            self.spec.checkpoint.unlink()
        return 0

    def resume(self) -> int:
        """Load the checkpoint when there is one; the first epoch to train."""
        spec = self.spec
        if not spec.checkpoint.is_file():
            return 0
        ckpt = load_checkpoint(spec.checkpoint, error=spec.error, hint="; delete it to start over")
        missing = [k for k in ("model", "epoch", "args") if k not in ckpt]
        if missing:
            raise spec.error(f"{spec.checkpoint}: not a training checkpoint (no {missing[0]!r}); delete it to start "
                             "over")
        check_args(spec.checkpoint, ckpt, spec.args, ignore=spec.runtime_args, extra=spec.extra, error=spec.error)
        spec.model.load_state_dict(ckpt["model"])
        start = int(ckpt["epoch"]) + 1
        if start < spec.epochs:
            if "optimizer" not in ckpt or (spec.scheduler is not None and "lr_scheduler" not in ckpt):
                raise spec.error(f"{spec.checkpoint}: holds no optimizer state (a stripped final model of {start} "
                                 f"epochs); cannot continue training it to {spec.epochs}")
            spec.optimizer.load_state_dict(ckpt["optimizer"])
            if spec.scheduler is not None:
                spec.scheduler.load_state_dict(ckpt["lr_scheduler"])
            if spec.amp and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        self.rows = list(ckpt.get("log", []))
        self.last_good = start
        log.info("resuming from %s after epoch %d/%d", spec.checkpoint, start, spec.epochs)
        return start

    def epoch(self, epoch: int) -> dict:
        spec = self.spec
        seed = spec.seed(epoch, self.rank) if spec.seed is not None else epoch_seed(0, epoch) + self.rank
        torch.manual_seed(seed)  # dropout, RoI sampling: the same stream whether resumed or not
        spec.task.start_epoch(epoch)
        batches = spec.task.batches(epoch)  # (a DataLoader's iterator draws its base seed: after manual_seed)
        t0 = time.perf_counter()
        lr_start = {str(g.get("name", i)): g["lr"] for i, g in enumerate(spec.optimizer.param_groups)}
        loss_sum = torch.zeros((), dtype=torch.float64, device=spec.device)
        seen = iterations = 0
        bar = tqdm(batches, total=len(batches), desc=f"{spec.name} epoch {epoch + 1}/{spec.epochs}", unit="batch",
                   leave=False, disable=not self.progress)
        for it, batch in enumerate(bar):
            loss, n = self.iteration(batch, epoch, it, len(batches))
            seen += n
            iterations += 1
            loss_sum += loss.double() * n
            if self.progress and (it % 10 == 0 or it + 1 == len(batches)):
                bar.set_postfix(loss=f"{loss.item():.3f}", items_s=f"{seen / (time.perf_counter() - t0):.1f}")
        bar.close()
        stats = EpochStats(epoch, iterations, seen, float(loss_sum), time.perf_counter() - t0, lr_start,
                           [g["lr"] for g in spec.optimizer.param_groups])
        if spec.scheduler is not None and spec.scheduler_interval == "epoch":
            spec.scheduler.step()
        row = spec.task.end_epoch(stats)
        self.rows.append(row)
        log.info("%s epoch %d/%d: %s", spec.name, epoch + 1, spec.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch" and isinstance(v, float)))
        self.check_weights(epoch)
        self.save(epoch)
        return row

    def iteration(self, batch, epoch: int, it: int, total: int) -> tuple[torch.Tensor, int]:
        """One optimizer step on ``batch``; returns the global batch's mean loss (detached) and its items."""
        spec = self.spec
        if spec.lr_hook is not None:
            spec.lr_hook(spec.optimizer, epoch, it)
        parts = spec.task.micro_batches(batch) if self.world == 1 and hasattr(spec.task, "micro_batches") else None
        if parts is not None and len(parts) > 1:
            return self.accumulated_iteration(parts, epoch, it, total)
        with torch.autocast(spec.device.type, dtype=torch.float16, enabled=spec.amp):
            step = spec.task.step(self.net, batch)
        loss, n, step_loss, share = step.loss, step.n, step.loss, 1.0
        if self.world > 1:  # the global batch's mean loss (for the log and the guard: the same on every rank)
            stats = D.all_reduce_sum(torch.stack([loss.detach().double() * n, torch.tensor(
                float(n), dtype=torch.float64, device=loss.device)]))
            n = int(stats[1].item())
            share = step.n / n
            step_loss = loss * rank_weight(step.n, n, self.world)
            loss = (stats[0] / stats[1]).float()
        if not torch.isfinite(loss):
            self.nonfinite_loss(loss, epoch, it, total, spec.task.describe(batch, step))
        spec.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(step_loss).backward()
        self.optimizer_step()
        spec.task.record(step, share)
        if self.on_iteration is not None:
            self.on_iteration({"epoch": epoch + 1, "iteration": it + 1, "items": n, "loss": float(loss.detach()),
                               "lr": spec.optimizer.param_groups[0]["lr"],
                               **{k: float(v) for k, v in step.logs.items()}})
        return loss.detach(), n

    def optimizer_step(self) -> None:
        """The step after the backward: the gradient clipped to ``spec.clip_grad_norm`` (unscaled first under AMP),
        the optimizer's step through the grad scaler, the per-iteration scheduler."""
        spec = self.spec
        if spec.clip_grad_norm:
            self.scaler.unscale_(spec.optimizer)
            params = [p for g in spec.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, spec.clip_grad_norm)
        self.scaler.step(spec.optimizer)
        self.scaler.update()
        if spec.scheduler is not None and spec.scheduler_interval == "iteration":
            spec.scheduler.step()

    def accumulated_iteration(self, parts: Sequence[tuple[object, int]], epoch: int, it: int,
                              total: int) -> tuple[torch.Tensor, int]:
        """One optimizer step on a batch given as micro-batches ``(micro_batch, items)`` (one process): each is
        forwarded and backpropagated on its own, its mean loss weighted by its share of the batch, so the summed
        gradient is the whole batch's (up to rounding, for a model whose forward treats samples independently:
        frozen BatchNorm) while only one micro-batch's activations are held at a time."""
        spec = self.spec
        n = sum(int(k) for _, k in parts)
        spec.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=spec.device)
        logs: dict[str, torch.Tensor] = {}
        for part, _ in parts:
            with torch.autocast(spec.device.type, dtype=torch.float16, enabled=spec.amp):
                step = spec.task.step(self.net, part)
            if not torch.isfinite(step.loss):
                self.nonfinite_loss(step.loss.detach(), epoch, it, total, spec.task.describe(part, step))
            self.scaler.scale(step.loss * (step.n / n)).backward()
            loss_sum += step.loss.detach().double() * step.n
            spec.task.record(step, step.n / n)
            for k, v in step.logs.items():
                w = 1.0 if not v.is_floating_point() else step.n / n  # counts add up; means by the piece's share
                logs[k] = logs.get(k, 0.0) + v.detach().double() * w
        self.optimizer_step()
        loss = (loss_sum / n).float()
        if self.on_iteration is not None:
            self.on_iteration({"epoch": epoch + 1, "iteration": it + 1, "items": n, "loss": float(loss),
                               "lr": spec.optimizer.param_groups[0]["lr"], **{k: float(v) for k, v in logs.items()}})
        return loss, n

    def kept(self) -> str:
        if self.last_good:
            return f"the last good checkpoint {self.spec.checkpoint} (after epoch {self.last_good}) is kept"
        return f"no checkpoint was written yet in {self.spec.checkpoint.parent}"

    def nonfinite_loss(self, loss: torch.Tensor, epoch: int, it: int, total: int, detail: str) -> None:
        lr = self.spec.optimizer.param_groups[0]["lr"]
        raise self.spec.nonfinite_error(
            f"training stopped at a non-finite {self.spec.name} loss (loss is {loss.item()} at epoch {epoch + 1}, "
            f"iteration {it + 1}/{total}, lr {lr:.3g}{detail}); {self.kept()}. Lower the learning rate or check the "
            "training data")

    def check_weights(self, epoch: int) -> None:
        """A last step can make weights non-finite with a finite loss: never checkpoint those."""
        bad = [k for k, v in self.spec.model.state_dict().items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise self.spec.nonfinite_error(
                f"training stopped at non-finite {self.spec.name} weights after epoch {epoch + 1} (e.g. {bad[:3]}); "
                f"{self.kept()}")

    def save(self, epoch: int) -> None:
        spec = self.spec
        if self.main:
            save_checkpoint(spec.checkpoint, {
                "model": spec.model.state_dict(), "optimizer": spec.optimizer.state_dict(),
                "lr_scheduler": spec.scheduler.state_dict() if spec.scheduler is not None else {},
                "scaler": self.scaler.state_dict(), "epoch": epoch, "args": spec.args, **spec.extra,
                "log": self.rows})
            if spec.log_csv is not None:
                write_csv(pd.DataFrame(self.rows), spec.log_csv)
        self.last_good = epoch + 1
