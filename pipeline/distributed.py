"""Several training processes (torch DDP under ``torchrun``): the environment torchrun sets, the process group,
rank-sharded batches, and the entry point the processes run.

One process per GPU, started by ``torchrun --standalone --nproc_per_node N -m pipeline.distributed JOB``
(:func:`launch` builds that command and runs it). Each process reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (:func:`env_info`), joins the process group (:func:`init`: NCCL on CUDA, each rank on
``cuda:LOCAL_RANK``; gloo on the CPU) and calls the job's function (``module:function``, a plain pipeline
function such as :func:`pipeline.classifier.train_classifier`) with the job's arguments. Without torchrun's
variables everything here is a no-op for one process: ``world_size() == 1``, ``is_main()``, ``barrier()`` returns.

Batches: :class:`RankBatchSampler` cuts each *global* batch of a sampler's order into ``world_size`` contiguous
pieces, one per rank, so the ranks together see exactly the batches one process would (same optimizer steps,
same samples per step); :mod:`pipeline.engine` weights each rank's loss by its share of the batch.
"""
from __future__ import annotations

import collections
import importlib
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .device import resolve_device
from .io import atomic_path
from .proposals import shard_bounds  # a rank's contiguous piece of a batch, as a shard's of a split

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_NAME = "ddp_job.pt"
ERROR_NAME = "ddp_error_rank{rank}.txt"


class DistributedError(RuntimeError):
    """A multi-process run could not start or one of its processes failed."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info(environ: Mapping[str, str] | None = None) -> DistInfo:
    """This process's place in a torchrun job (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``);
    one process (rank 0 of 1) when they are not set."""
    env = os.environ if environ is None else environ
    values = {}
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", None)):
        raw = env.get(key)
        if raw is None or raw == "":
            values[key] = default
            continue
        try:
            values[key] = int(raw)
        except ValueError:
            raise DistributedError(f"environment variable {key}={raw!r} is not an integer") from None
    world = values["WORLD_SIZE"]
    local_world = values["LOCAL_WORLD_SIZE"] if values["LOCAL_WORLD_SIZE"] is not None else world
    info = DistInfo(values["RANK"], world, values["LOCAL_RANK"], local_world)
    if world < 1 or not 0 <= info.rank < world or not 0 <= info.local_rank < max(local_world, 1):
        raise DistributedError(f"inconsistent torchrun environment: RANK={info.rank} WORLD_SIZE={world} "
                               f"LOCAL_RANK={info.local_rank} LOCAL_WORLD_SIZE={local_world}")
    return info


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device: str | torch.device = "auto") -> torch.device:
    """The device this process computes on: ``cuda:LOCAL_RANK`` for a CUDA run of several processes, else the
    resolved ``device``."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cuda" and env_info().world_size > 1:
        return torch.device("cuda", env_info().local_rank)
    return dev


def init(device: str | torch.device = "auto") -> DistInfo:
    """Join torchrun's process group (once; NCCL for CUDA, gloo for the CPU) and, on CUDA, make
    ``cuda:LOCAL_RANK`` this process's device. Returns the process's :class:`DistInfo`; for one process nothing
    is initialised."""
    info = env_info()
    if info.world_size == 1 or is_initialized():
        return info
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if info.local_rank >= n:
            raise DistributedError(f"process with LOCAL_RANK {info.local_rank} needs a GPU of its own but this "
                                   f"machine shows {n} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
        torch.cuda.set_device(info.local_rank)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(key):
            raise DistributedError(f"WORLD_SIZE={info.world_size} but {key} is not set: start the processes with "
                                   "torchrun (pipeline.distributed.launch)")
    dist.init_process_group(backend_for(dev), rank=info.rank, world_size=info.world_size)
    log.info("rank %d/%d joined the %s process group on %s", info.rank, info.world_size, backend_for(dev),
             local_device(dev))
    return info


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (no-op for one process); returns ``t``."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class RankBatchSampler(Sampler):
    """Global batches of ``batch_size`` consecutive items of ``sampler``'s order, of which this rank yields its
    contiguous piece (:func:`shard_bounds`): the one rank sampler of both trainers.

    Global batches: at most ``max_batches`` of them; a last, smaller one is dropped with ``drop_last``; a last one
    with fewer items than ranks joins the batch before it, so every rank has an item at every step (one rank never
    meets that case: what it yields is exactly ``DataLoader(batch_size=..., sampler=..., drop_last=...)``'s
    batches, cut at ``max_batches``). The classifier (``drop_last`` unless the whole set is one batch, of at least
    ``world`` items) never meets it either; the detector (never ``drop_last``: every image every epoch) does, and
    always joined such a batch. ``len()`` is the number of global batches, the same on every rank. A batch that
    still has fewer items than ranks (a set smaller than ``world``) is a ValueError."""

    def __init__(self, sampler, batch_size: int, drop_last: bool, rank: int = 0, world: int = 1,
                 max_batches: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size < world:
            raise ValueError(f"batch size {batch_size} is smaller than the {world} processes: each needs at least "
                             "one item per step")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), bool(drop_last)
        self.rank, self.world = int(rank), int(world)
        self.max_batches = None if max_batches is None else int(max_batches)

    def __len__(self) -> int:
        n, b = len(self.sampler), self.batch_size
        full, rest = divmod(n, b)
        count = full if self.drop_last or not rest else full + 1
        if self.max_batches is not None and count > self.max_batches:
            return self.max_batches  # cut before the end: the last batch kept is a full one
        if rest and not self.drop_last and full and rest < self.world:
            count -= 1  # joins the batch before it
        return count

    def global_batches(self) -> list[list]:
        batches, batch = [], []
        for item in self.sampler:
            batch.append(item)
            if len(batch) == self.batch_size:
                batches.append(batch)
                batch = []
        if batch and not self.drop_last:
            batches.append(batch)
        if self.max_batches is not None:
            batches = batches[:self.max_batches]
        if len(batches) > 1 and len(batches[-1]) < self.world:
            batches = batches[:-2] + [batches[-2] + batches[-1]]
        return batches

    def __iter__(self) -> Iterator[list]:
        for batch in self.global_batches():
            if len(batch) < self.world:
                raise ValueError(f"a batch of {len(batch)} items cannot be split over {self.world} processes")
            start, stop = shard_bounds(len(batch), self.rank, self.world)
            yield batch[start:stop]


# -- launching ----------------------------------------------------------------------------------------------
def check_processes(nproc: int, device: torch.device, batch_size: int, what: str = "batch size") -> None:
    """ValueError when ``nproc`` training processes cannot run: fewer GPUs than processes on CUDA, or a global
    batch smaller than the number of processes (each needs a piece of every batch)."""
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise ValueError(f"{nproc} training processes need {nproc} GPUs; this machine shows "
                         f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')})")
    if batch_size < nproc:
        raise ValueError(f"{what} {batch_size} is smaller than the {nproc} training processes")


def torchrun_command(nproc: int, job: str | os.PathLike) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m pipeline.distributed JOB`` (through this interpreter)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(int(nproc)),
            "-m", "pipeline.distributed", str(job)]


# torchrun's agent gets SIGTERM when the process that launched it dies (and passes it on to the ranks), so a
# killed luigi worker leaves no training running against its work directory
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # PR_SET_PDEATHSIG
                    "if os.getppid() != int(sys.argv[1]): sys.exit(143)\n"
                    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n")


def launch(target: str, kwargs: dict, nproc: int, workdir: str | os.PathLike, *, device: str = "auto",
           env: Mapping[str, str] | None = None, tail_lines: int = 40) -> None:
    """Run ``target`` (``"package.module:function"``) with ``kwargs`` in ``nproc`` processes under torchrun.

    The job (target, kwargs, device; pickled with ``torch.save``) is written to ``workdir/ddp_job.pt``, which the
    processes load; each joins the process group (:func:`init`) and calls ``function(**kwargs)``. Output of the
    processes goes to this process's stderr. Raises :class:`DistributedError` with the last lines of that output
    when a process fails. The job file is removed after a successful run.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    module, _, func = target.partition(":")
    if not module or not func:
        raise ValueError(f"target {target!r} is not 'module:function'")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / JOB_NAME
    for old in workdir.glob(ERROR_NAME.format(rank="*")):
        old.unlink()
    with atomic_path(job) as tmp:
        torch.save({"target": target, "kwargs": kwargs, "device": str(device)}, tmp)
    cmd = torchrun_command(nproc, job)
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd[1:]]
    run_env = dict(os.environ if env is None else env)
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), run_env.get("PYTHONPATH", "")) if p)
    run_env.setdefault("OMP_NUM_THREADS", "1")
    log.info("starting %d training processes: torchrun --standalone --nproc_per_node %d -m pipeline.distributed %s",
             nproc, nproc, job)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
        rc = proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    errors = sorted(workdir.glob(ERROR_NAME.format(rank="*")))
    if rc != 0 or errors:
        first = "\n".join(f"{p.stem.rsplit('_', 1)[-1]}: {p.read_text().strip()}" for p in errors[:2])
        for p in errors:
            p.unlink()
        raise DistributedError(f"torchrun with {nproc} processes running {target} failed (exit code {rc}): "
                               + (first if first else "last output:\n" + "\n".join(tail)))
    job.unlink(missing_ok=True)


def _die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: this process gets ``sig`` when its parent (torchrun's agent) dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))


def run_job(job_path: str | os.PathLike) -> object:
    """What each torchrun process does: load the job, join the process group, call the target, leave."""
    job_path = Path(job_path)
    try:
        job = torch.load(job_path, map_location="cpu", weights_only=False)  # our own file, written by launch()
        module, _, func = job["target"].partition(":")
        fn = getattr(importlib.import_module(module), func)
        init(job.get("device", "auto"))
        try:
            result = fn(**job["kwargs"])
            barrier()
            return result
        finally:
            cleanup()
    except BaseException as e:  # the launcher reports this rank's error, not only torchrun's summary
        with atomic_path(job_path.parent / ERROR_NAME.format(rank=env_info().rank)) as tmp:
            tmp.write_text(f"{type(e).__name__}: {e}\n")
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: torchrun --standalone --nproc_per_node N -m pipeline.distributed JOB.pt", file=sys.stderr)
        return 2
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {env_info().rank}] %(levelname)s %(name)s: %(message)s")
    run_job(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
