"""The training engine (pipeline.engine): resume equals an uninterrupted run, the non-finite guard, the checkpoint
format (weights_only=True, args checked on resume), the rank sampler's shares and the DDP loss weights, and the
frozen-BatchNorm / normalisation helpers."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline import distributed as D
from pipeline.engine import (CheckpointError, EpochStats, FitSpec, NonFiniteLossError, Step, check_plain, fit,
                             freeze_batchnorm, load_checkpoint, normalize, rank_weight, save_checkpoint)

import nets


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


# --------------------------------------------------------------------------------------------------- a toy task
class Killed(Exception):
    pass


class ToyTask:
    """Regression of y = x . w on 24 fixed points; a seeded shuffle per epoch; dropout in the model, so the
    engine's per-epoch seeding matters. ``poison(epoch, it)`` True makes that iteration's loss NaN."""

    def __init__(self, model: nn.Module, batch_size: int = 6, poison=lambda epoch, it: False):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(24, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        self.model, self.batch_size, self.poison = model, batch_size, poison
        self.epoch, self.it, self.mse = 0, 0, 0.0

    def start_epoch(self, epoch):
        self.model.train()
        self.epoch, self.it, self.mse = epoch, 0, 0.0

    def batches(self, epoch):
        order = np.random.default_rng([0, epoch]).permutation(len(self.x))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def step(self, net, batch):
        loss = nn.functional.mse_loss(net(self.x[batch]), self.y[batch])
        if self.poison(self.epoch, self.it):
            loss = loss * float("nan")
        self.it += 1
        return Step(loss, len(batch), {"mse": loss.detach()})

    def record(self, step, share):
        self.mse += float(step.logs["mse"]) * share

    def describe(self, batch, step):
        return f", rows {batch.tolist()}"

    def end_epoch(self, stats: EpochStats) -> dict:
        return {"epoch": stats.epoch + 1, "loss": stats.loss_sum / stats.items, "mse": self.mse / stats.iterations,
                "lr": stats.lr_start["0"], "items": stats.items}


def toy_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))


def toy_spec(path, model=None, epochs=3, args=None, **kw) -> FitSpec:
    model = model or toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 / (1 + 0.1 * it))
    task = kw.pop("task", None) or ToyTask(model, **kw.pop("task_kw", {}))
    return FitSpec(model, opt, task, Path(path), args if args is not None else {"lr": 0.01, "epochs": epochs},
                   epochs, torch.device("cpu"), scheduler=sched, name="toy", **kw)


# ------------------------------------------------------------------------------------------------------- resume
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    full = toy_spec(tmp_path / "full.pt")
    rng_before = torch.get_rng_state()
    iters = []
    want = fit(full, progress=False, on_iteration=iters.append)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's generator is left as it was
    assert [r["epoch"] for r in want] == [1, 2, 3] and want[-1]["loss"] < want[0]["loss"]
    assert len(iters) == 12 and set(iters[0]) == {"epoch", "iteration", "items", "loss", "lr", "mse"}
    assert iters[4]["epoch"] == 2 and iters[4]["iteration"] == 1 and iters[4]["items"] == 6
    assert not full.model.training  # left in eval mode

    def kill_after_first(epoch, row):
        if epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        fit(toy_spec(tmp_path / "run.pt"), progress=False, on_epoch_end=kill_after_first)
    assert torch.load(tmp_path / "run.pt", weights_only=True)["epoch"] == 0
    resumed = toy_spec(tmp_path / "run.pt")  # a fresh process: new model and optimizer
    got = fit(resumed, progress=False)
    assert got == want  # the log rows of the first epoch come from the checkpoint
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert resumed.scheduler.last_epoch == full.scheduler.last_epoch == 12
    # a finished run trains nothing; resume=False starts over (and removes the old checkpoint first)
    assert fit(toy_spec(tmp_path / "run.pt"), progress=False) == want
    fresh = fit(toy_spec(tmp_path / "run.pt", epochs=1, args={"lr": 0.01, "epochs": 3}), resume=False, progress=False)
    assert fresh == want[:1]


def test_log_csv_and_epoch_scheduler(tmp_path):
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = FitSpec(model, opt, ToyTask(model), tmp_path / "c.pt", {}, 3, torch.device("cpu"),
                   scheduler=torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), scheduler_interval="epoch",
                   log_csv=tmp_path / "log.csv")
    rows = fit(spec, progress=False)
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.05, 0.025])
    assert pd.read_csv(tmp_path / "log.csv").epoch.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="scheduler_interval"):
        FitSpec(model, opt, ToyTask(model), tmp_path / "c.pt", {}, 1, torch.device("cpu"), scheduler_interval="x")


# ------------------------------------------------------------------------------------------------ micro-batches
class MicroToyTask(ToyTask):
    """ToyTask whose batches are stepped in pieces of ``micro`` rows (the engine sums their gradients)."""

    def __init__(self, model, micro: int, **kw):
        super().__init__(model, **kw)
        self.micro = micro

    def micro_batches(self, batch):
        return [(batch[i:i + self.micro], len(batch[i:i + self.micro])) for i in range(0, len(batch), self.micro)]


@pytest.mark.parametrize("micro", [1, 4])  # 4: pieces of 4 and 2 rows of each batch of 6
def test_micro_batches_take_the_steps_of_whole_batches(tmp_path, micro):
    """Pieces of a batch forwarded and backpropagated one at a time give the whole batch's optimizer steps up to
    rounding (the toy model's dropout draws the same masks piece by piece), and the same logged losses."""
    whole_iters, micro_iters = [], []
    whole = toy_spec(tmp_path / "whole.pt")
    want = fit(whole, progress=False, on_iteration=whole_iters.append)
    model = toy_model()
    spec = toy_spec(tmp_path / "micro.pt", model=model, task=MicroToyTask(model, micro))
    got = fit(spec, progress=False, on_iteration=micro_iters.append)
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(spec.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and a["items"] == b["items"] == 24
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["mse"] == pytest.approx(b["mse"], rel=1e-5)
    assert [(r["iteration"], r["items"]) for r in micro_iters] == [(r["iteration"], r["items"]) for r in whole_iters]
    assert [r["mse"] for r in micro_iters] == pytest.approx([r["mse"] for r in whole_iters], rel=1e-5)


@pytest.mark.parametrize("micro", [0, 4])  # 0: whole batches
def test_clip_grad_norm_steps_along_the_clipped_gradient(tmp_path, micro):
    """With ``clip_grad_norm`` the first step is plain SGD on the gradient scaled to that norm (its norm on the toy
    batch is far above the limit), whole batches and micro-batches alike; without it, the unclipped gradient."""
    limit = 0.05
    for clip in (limit, None):
        model = nn.Sequential(nn.Linear(4, 1))
        torch.manual_seed(3)
        nn.init.normal_(model[0].weight)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        task = MicroToyTask(model, micro) if micro else ToyTask(model)
        batch = task.batches(0)[0]
        model.zero_grad()
        nn.functional.mse_loss(model(task.x[batch]), task.y[batch]).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        assert norm > 10 * limit
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        spec = FitSpec(model, opt, task, tmp_path / f"clip{clip}.pt", {"clip": clip}, 1, torch.device("cpu"),
                       clip_grad_norm=clip, name="toy")
        steps = []
        loop_first_step_only(spec, steps)
        scale = min(1.0, limit / float(norm)) if clip else 1.0
        for k, g in grads.items():
            torch.testing.assert_close(steps[0][k], before[k] - 0.1 * scale * g, rtol=1e-5, atol=1e-6, msg=k)


def loop_first_step_only(spec: FitSpec, steps: list) -> None:
    """Run ``fit`` and keep the weights after its first optimizer step (a post-hook on the steps)."""
    def post(opt, args, kwargs):
        if not steps:
            steps.append({k: v.clone() for k, v in spec.model.state_dict().items()})
    spec.optimizer.register_step_post_hook(post)
    fit(spec, progress=False)


def test_a_non_finite_micro_batch_stops_before_the_step(tmp_path):
    model = toy_model()
    task = MicroToyTask(model, 2, poison=lambda epoch, it: epoch == 1 and it == 5)  # 2nd iteration's last piece
    spec = toy_spec(tmp_path / "c.pt", model=model, task=task)
    saved = {}
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, iteration 2/4.*\(after epoch 1\) is kept"):
        fit(spec, progress=False, on_epoch_end=lambda e, r: saved.setdefault("bytes", (tmp_path / "c.pt").read_bytes()))
    assert (tmp_path / "c.pt").read_bytes() == saved["bytes"]


# ------------------------------------------------------------------------------------------------ non-finite guard
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    saved = {}
    spec = toy_spec(tmp_path / "c.pt", task_kw={"poison": lambda epoch, it: epoch == 1 and it == 2})
    with pytest.raises(NonFiniteLossError, match=r"non-finite toy loss \(loss is nan at epoch 2, iteration 3/4, lr "
                                                 r".*rows \[.*c\.pt \(after epoch 1\) is kept"):
        fit(spec, progress=False, on_epoch_end=lambda e, r: saved.setdefault("bytes", (tmp_path / "c.pt").read_bytes()))
    assert (tmp_path / "c.pt").read_bytes() == saved["bytes"]
    # before any checkpoint: says so; the error class is the trainer's choice
    class MyError(RuntimeError):
        pass

    spec = toy_spec(tmp_path / "d" / "c.pt", task_kw={"poison": lambda epoch, it: True}, nonfinite_error=MyError)
    with pytest.raises(MyError, match="no checkpoint was written yet in .*d"):
        fit(spec, progress=False)
    assert not (tmp_path / "d" / "c.pt").exists()


def test_non_finite_weights_after_a_finite_last_step_keep_the_checkpoint(tmp_path):
    fit(toy_spec(tmp_path / "c.pt", epochs=1, args={}, task_kw={"batch_size": 24}), progress=False)
    saved = (tmp_path / "c.pt").read_bytes()
    spec = toy_spec(tmp_path / "c.pt", epochs=2, args={}, task_kw={"batch_size": 24})
    spec.model[3].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteLossError, match=r"non-finite toy weights after epoch 2 \(e\.g\. \['3\.weight'\]\)"):
        fit(spec, progress=False)
    assert (tmp_path / "c.pt").read_bytes() == saved


# ------------------------------------------------------------------------------------------------- checkpoints
def test_resume_with_other_args_names_the_differing_keys(tmp_path):
    fit(toy_spec(tmp_path / "c.pt", epochs=1, args={"lr": 0.05, "epochs": 1, "workers": 0}), progress=False)
    spec = toy_spec(tmp_path / "c.pt", epochs=2, args={"lr": 0.1, "epochs": 2, "workers": 4, "momentum": 0.9},
                    runtime_args=("workers",))
    with pytest.raises(CheckpointError, match=r"c\.pt: checkpoint was written with other training arguments") as e:
        fit(spec, progress=False)
    msg = str(e.value)
    assert "'epochs': '1 (checkpoint) != 2'" in msg and "'lr': '0.05 (checkpoint) != 0.1'" in msg
    assert "'momentum': 'None (checkpoint) != 0.9'" in msg and "workers" not in msg
    # runtime args may differ; other entries (classes) must be equal
    ok = toy_spec(tmp_path / "c.pt", epochs=2, args={"lr": 0.05, "epochs": 2, "workers": 4},
                  runtime_args=("workers", "epochs"))
    assert len(fit(ok, progress=False)) == 2
    other = toy_spec(tmp_path / "c.pt", epochs=2, args={"lr": 0.05, "epochs": 2}, runtime_args=("workers", "epochs"),
                     extra={"classes": ["a"]}, error=KeyError)
    with pytest.raises(KeyError, match=r"checkpoint classes None differ from this run's \['a'\]"):
        fit(other, progress=False)


def test_checkpoints_hold_plain_data_only(tmp_path):
    with pytest.raises(TypeError, match=r"\['log'\]\[0\]\['loss'\] is a numpy.float64"):
        save_checkpoint(tmp_path / "c.pt", {"log": [{"loss": np.float64(1.0)}]})
    with pytest.raises(TypeError, match=r"\['args'\] is a pathlib"):
        check_plain({"args": tmp_path}, "x")
    assert not (tmp_path / "c.pt").exists()
    # a pickle of other objects is refused on load (nothing runs from the file)
    torch.save({"model": {}, "args": D.DistInfo()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt: unreadable checkpoint \(UnpicklingError"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


def _images(tmp_path, n, size=48):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        p = tmp_path / f"im{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8))
        rows.append((f"im{i}", "trainval", size + 8, size, str(p)))
    return pd.DataFrame(rows, columns=["image_id", "split", "width", "height", "path"])


def test_both_trainers_checkpoints_load_with_weights_only(tmp_path):
    from pipeline.classifier import TrainConfig, selection_dataset, train_classifier
    from pipeline.detector import (DetectionDataset, DetectorError, build_detector, load_checkpoint as det_load,
                                   preset, strip_checkpoint, train_detector)

    images = _images(tmp_path, 4)
    sel = pd.DataFrame([(i, f"im{i // 2}", "ab"[i % 2], 4 + i, 5, 30, 40) for i in range(8)],
                       columns=["click_id", "image_id", "class", "x1", "y1", "x2", "y2"])
    model = nets.tiny_classifier(2, input_size=24)
    ds = selection_dataset(sel, images, ("a", "b"), input_size=24, mean=model.mean, std=model.std, seed=0)
    train_classifier(model, ds, tmp_path / "cls", TrainConfig(epochs=1, batch_size=4, workers=0, device="cpu"),
                     progress=False)
    ckpt = torch.load(tmp_path / "cls" / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "args", "log"}

    boxes = pd.DataFrame([(f"im{i}", "a", 5.0, 6.0, 30.0, 40.0) for i in range(2)],
                         columns=["image_id", "class", "x1", "y1", "x2", "y2"])
    props = {f"im{i}": np.array([[5, 6, 30, 40], [0, 0, 20, 20], [10, 10, 50, 45]], np.float32) for i in range(2)}
    det_ds = DetectionDataset(images.iloc[:2], props, ("a", "b"), boxes)
    cfg = preset("cpu", weights="random", min_size=64, max_size=96, epochs=1, max_proposals=10)
    train_detector(build_detector(("a", "b"), cfg), det_ds, tmp_path / "det.pth", progress=False)
    ckpt = torch.load(tmp_path / "det.pth", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "args", "classes", "log"}
    assert ckpt["lr_scheduler"]["milestones"] == {6: 1}  # a Counter: on the weights-only allow list
    strip_checkpoint(tmp_path / "det.pth")
    assert "optimizer" not in torch.load(tmp_path / "det.pth", weights_only=True)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorError, match="bad.pth: unreadable checkpoint"):
        det_load(tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------------ rank sampler shares
@pytest.mark.parametrize("n,batch,world,drop_last,cap", [(23, 7, 2, True, None), (23, 7, 3, False, None),
                                                         (7, 3, 2, False, None), (10, 4, 3, False, 2),
                                                         (5, 5, 2, False, None), (9, 2, 2, False, None)])
def test_rank_sampler_pieces_cover_each_global_batch(n, batch, world, drop_last, cap):
    order = list(range(100, 100 + n))
    single = D.RankBatchSampler(order, batch, drop_last, max_batches=cap)
    ranks = [D.RankBatchSampler(order, batch, drop_last, r, world, max_batches=cap) for r in range(world)]
    pieces = [list(s) for s in ranks]
    glob = single.global_batches()
    assert len({len(s) for s in ranks} | {len(p) for p in pieces}) == 1  # every rank takes every step
    for step, whole in enumerate(ranks[0].global_batches()):
        parts = [p[step] for p in pieces]
        assert sum(parts, []) == whole and all(parts)  # contiguous pieces, in order, each rank at least one item
        shares = [len(p) / len(whole) for p in parts]
        assert sum(shares) == pytest.approx(1.0) and max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    # one process's batches, but a last batch with fewer items than ranks joins the one before it
    flat = [i for b in glob for i in b]
    assert [i for b in ranks[0].global_batches() for i in b] == flat
    if not drop_last and cap is None:
        assert flat == order


def test_share_weights_make_the_ddp_gradient_the_global_batch_gradient():
    """DDP averages the ranks' gradients; each rank's mean loss times rank_weight gives the global batch's mean."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g), torch.randn(7, generator=g)
    w = torch.randn(3, generator=g, requires_grad=True)
    (((x @ w - y) ** 2).mean()).backward()
    want, w.grad = w.grad.clone(), None
    grads = []
    for piece in D.RankBatchSampler(list(range(7)), 7, False, 0, 3).global_batches()[0:1]:
        for r in range(3):
            start, stop = D.shard_bounds(len(piece), r, 3)
            idx = piece[start:stop]
            loss = ((x[idx] @ w - y[idx]) ** 2).mean() * rank_weight(len(idx), len(piece), 3)
            grads.append(torch.autograd.grad(loss, w)[0])
    torch.testing.assert_close(sum(grads) / 3, want)
    assert rank_weight(3, 7, 2) == 3 * 2 / 7 and rank_weight(5, 5, 1) == 1.0


# --------------------------------------------------------------------------------------------------- helpers
def test_freeze_batchnorm_stats_and_affine():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)), nn.ReLU())
    net.train()
    freeze_batchnorm(net)
    assert not net[1].training and not net[2][0].training and net[0].training
    assert all(p.requires_grad for p in net.parameters())
    freeze_batchnorm(net, stats=False, affine=True)
    assert [p.requires_grad for p in net.parameters()] == [True, True, False, False, False, False]


def test_normalize_numpy_and_torch_forms():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 6, 3)).astype(np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    a = normalize(img, mean, std)
    b = normalize(torch.from_numpy(img).permute(2, 0, 1)[None], mean, std)
    assert a.dtype == np.float32 and b.dtype == torch.float32 and b.shape == (1, 3, 5, 6)
    np.testing.assert_allclose(a, (img / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b[0].permute(1, 2, 0).numpy(), a, rtol=1e-5, atol=1e-5)
    # the numpy form is exactly the crop dataset's x * scale + shift
    scale = (1.0 / (255.0 * np.array(std, dtype=np.float32))).astype(np.float32)
    shift = -np.array(mean, dtype=np.float32) / np.array(std, dtype=np.float32)
    assert np.array_equal(a, img * scale + shift)
    assert normalize(torch.tensor([0.0, 127.5, 255.0]).view(1, 3, 1, 1), (0.5,) * 3, (0.5,) * 3).flatten().tolist() \
        == [-1.0, 0.0, 1.0]
