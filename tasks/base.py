"""The stage framework: parameter-hashed, atomically published output directories (gokart style).

A stage's output is the directory ``<outputs_root>/<Stage>/<hash>/`` where ``hash`` covers the task's own
significant parameters and the refs of the stages it requires (one policy, :meth:`StageTask.significant_params` and
:meth:`StageTask.hash_refs`), so any upstream change gives a new directory and the same parameters reuse the old
one. A stage's own parameters are those its class defines (its body and its parameter mixins); the ones
``@inherits`` adds reach the hash only through the upstream stages that own them. ``run()`` works in
``<hash>.partial/`` (kept across kills, so a stage can resume from checkpoints or finished parts it wrote there),
writes ``params.json``, calls :meth:`StageTask.run_stage`, and renames the work directory to ``<hash>/`` only when
the stage finished: a directory named by a bare hash is always complete. The whole run holds an exclusive ``flock``
on ``<hash>.lock`` (:func:`stage_lock`), so processes that run the same stage on one outputs root take turns on the
work directory; one that gets the lock after the output was published does nothing.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

import luigi
import luigi.util
from luigi.task import flatten

from pipeline.device import (cpu_cores, cpu_seconds, keep_freed_memory, peak_rss_mb, release_freed_memory,
                             reset_peak_rss)
from pipeline.io import read_json, write_json

from .defaults import TUNED

log = logging.getLogger("clickscale")


class clickscale(luigi.Config):  # noqa: N801 (luigi config sections are named by class)
    """``[clickscale]`` section of luigi.cfg."""

    outputs_root = luigi.Parameter(default="outputs", description="root of all stage output directories")


class TrainingSeed:
    """``seed``, a parameter mixin of the stages that train (TrainClassifier, TrainFastRCNN): each hashes it as its
    own, since either may run without the other upstream. The dataset's randomness has ``data_seed``."""

    seed = luigi.IntParameter(default=TUNED.seed, description="seed of the training: head initialisation, crop "
                                                              "subsample, order, augmentation (the report's sample "
                                                              "too); the dataset has --data-seed")


def gpu_resource() -> str:
    """Name of this machine's GPU resource for luigi's scheduler."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
    return f"gpu_{host}"


def outputs_root() -> Path:
    return Path(os.environ.get("CLICKSCALE_OUTPUTS") or clickscale().outputs_root)


class StageTask(luigi.Task):
    """Base class of every clickscale stage. Subclasses implement :meth:`run_stage`."""

    #: bump to invalidate every output of a stage after a change of its on-disk format
    stage_version = 1
    #: stages that run on a GPU when one is present declare it: luigi then never runs two of them at once on one
    #: machine (resource ``gpu_<host>``; luigi counts an unconfigured resource as 1 unit, so one GPU stage per
    #: machine by default; give a machine with several GPUs ``gpu_<host> = N`` in luigid's [resources])
    uses_gpu = False

    @property
    def resources(self) -> dict:
        return {gpu_resource(): 1} if self.uses_gpu else {}

    def gpu_units(self, nproc: int) -> dict:
        """Resources of a stage that trains in ``nproc`` processes (torch DDP, one GPU each): ``nproc`` units of the
        machine's GPU resource, at most as many as luigi.cfg's ``[resources] gpu_<host>`` gives it (1 when unset),
        so it never waits forever."""
        res = StageTask.resources.fget(self)
        if nproc > 1:
            res = {k: max(1, min(nproc, luigi.configuration.get_config().getint("resources", k, 1))) for k in res}
        return res

    # -- identity -----------------------------------------------------------------------------------------
    #: upstream stages this one reads only part of: task family -> the property naming that part in the hash
    #: (the proposal stages: ``{"PrepareDataset": "images_ref"}``, the images without the clicks)
    reads_part_of: dict[str, str] = {}
    #: parameters added to a stage later, left out of its hash while they hold the (serialised) value that gives the
    #: stage's earlier outputs, so those keep their directories: name -> value
    unhashed_values: dict[str, str] = {}
    _own_params: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs):
        """Record the stage's own parameters: those of its class statement (body, parameter mixins, a stage class
        it subclasses), taken before a decorator (``@inherits``) adds the upstream ones."""
        super().__init_subclass__(**kwargs)
        inherited = set()
        for base in cls.__mro__[1:]:
            if isinstance(base, type) and issubclass(base, StageTask):
                inherited |= base.inherited_param_names()
        # (not get_params(): ABCMeta has not finished the class yet, so no dunder lookups)
        names = {n for n in dir(cls) if not n.startswith("__") and isinstance(getattr(cls, n, None), luigi.Parameter)}
        cls._own_params = frozenset(names - inherited)

    @classmethod
    def own_param_names(cls) -> frozenset[str]:
        return cls._own_params

    @classmethod
    def inherited_param_names(cls) -> frozenset[str]:
        """Parameters added by ``@inherits``: they configure upstream stages and are hashed there."""
        return frozenset(name for name, _ in cls.get_params()) - cls._own_params

    def significant_params(self) -> dict:
        """The stage's own significant parameters: with :meth:`hash_refs`, all its hash covers."""
        params = {name: p.serialize(getattr(self, name))
                  for name, p in self.get_params() if p.significant and name in self._own_params}
        return {k: v for k, v in params.items() if self.unhashed_values.get(k) != v}

    def upstream(self) -> list[luigi.Task]:
        return flatten(self.requires())

    def hash_refs(self) -> list[str]:
        """What identifies the upstream stages in this stage's hash: their ``stage_ref``, or for a family in
        :attr:`reads_part_of` the part of its output this stage reads (see ``PrepareDataset.images_ref``)."""
        return [getattr(t, self.reads_part_of.get(t.task_family, "stage_ref")) if isinstance(t, StageTask)
                else t.task_id for t in self.upstream()]

    @property
    def stage_hash(self) -> str:
        cached = self.__dict__.get("_stage_hash")
        if cached is None:
            ups = sorted(self.hash_refs())
            blob = json.dumps({"stage": self.task_family, "version": self.stage_version,
                               "params": self.significant_params(), "upstream": ups}, sort_keys=True)
            cached = hashlib.md5(blob.encode()).hexdigest()[:12]
            self.__dict__["_stage_hash"] = cached
        return cached

    @property
    def stage_ref(self) -> str:
        """``<Stage>/<hash>``: how downstream stages and params.json refer to this output."""
        return f"{self.task_family}/{self.stage_hash}"

    @property
    def stage_dir(self) -> Path:
        return outputs_root() / self.task_family / self.stage_hash

    @property
    def work_dir(self) -> Path:
        return self.stage_dir.with_name(self.stage_hash + ".partial")

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir))

    # -- upstream access ----------------------------------------------------------------------------------
    def input_dir(self, key=None) -> Path:
        """Final directory of the required stage (``key`` for dict/list ``requires()``)."""
        req = self.requires()
        task = req[key] if key is not None else req
        if isinstance(task, (list, tuple, dict)):
            raise ValueError(f"{self.task_family}.requires() holds several tasks: pass a key to input_dir()")
        return Path(task.output().path)

    def find_upstream(self, family: str) -> "StageTask":
        """The nearest upstream task of a family (breadth first through requires())."""
        queue = list(self.upstream())
        while queue:
            t = queue.pop(0)
            if t.task_family == family:
                return t
            queue.extend(flatten(t.requires()))
        raise LookupError(f"{self.task_family} does not depend on a {family} stage")

    def manifest(self):
        from pipeline.dataset import Manifest

        if self.task_family == "PrepareDataset":
            return Manifest.load(self.stage_dir)
        return Manifest.load(self.find_upstream("PrepareDataset").output().path)

    # -- running ------------------------------------------------------------------------------------------
    def run_stage(self, work: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def lock_path(self) -> Path:
        """``<hash>.lock`` beside the output: held (``flock``) by the process that runs the stage."""
        return self.stage_dir.with_name(self.stage_hash + ".lock")

    def run(self) -> None:
        """Run the stage under its lock: one process at a time works in ``<hash>.partial/``; a process that finds
        the output published once it holds the lock does nothing."""
        keep_freed_memory()  # glibc: no mmap/munmap (and page faults) per large tensor (pipeline/device.py)
        with stage_lock(self.lock_path, self.stage_ref):
            if self.stage_dir.exists():
                log.warning("%s: already done by another process -> %s", self.stage_ref, self.stage_dir)
                return
            self._run_locked()

    def _run_locked(self) -> None:
        work = self.work_dir
        work.mkdir(parents=True, exist_ok=True)
        stale = remove_temporaries(work)  # pipeline.io.atomic_path temporaries of a killed run
        if stale:
            log.info("%s: removed %d temporary file(s) of an interrupted run", self.stage_ref, stale)
        resumed = any(p.name != "params.json" for p in work.iterdir())
        params = {"stage": self.task_family, "hash": self.stage_hash, "task_id": self.task_id,
                  "params": self.significant_params(),
                  "upstream": sorted(t.stage_ref for t in self.upstream() if isinstance(t, StageTask))}
        write_json(work / "params.json", params)
        log.info("%s: %s %s", self.stage_ref, "resuming in" if resumed else "running in", work)
        t0, cpu0 = time.time(), cpu_seconds()
        reset_peak_rss()
        self.run_stage(work)
        rss = peak_rss_mb()
        cpu = cpu_seconds() - cpu0  # this process and the children it waited for (e.g. selective search's)
        release_freed_memory()  # the next stage in this process starts without this one's retained heap
        write_json(work / "params.json", {**params, "seconds": round(time.time() - t0, 3),
                                          "cpu_seconds": round(cpu, 3), "cores": cpu_cores(),
                                          "peak_rss_mb": rss["process"], "peak_rss_children_mb": rss["children"],
                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        left = remove_temporaries(work)  # never part of the product
        if left:
            log.warning("%s: removed %d temporary file(s) the stage left behind", self.stage_ref, left)
        if self.stage_dir.exists():  # published by a process that does not take the lock: keep the first
            log.warning("%s already exists; discarding this run's copy", self.stage_dir)
            shutil.rmtree(work)
            return
        os.replace(work, self.stage_dir)
        log.info("%s: done in %.1fs -> %s", self.stage_ref, time.time() - t0, self.stage_dir)


def inherits(*upstream: type[luigi.Task], without: tuple[str, ...] = ()):
    """``luigi.util.inherits`` (every parameter of ``upstream`` on the decorated class, so ``clone`` passes them down
    the chain), less the names in ``without``: an upstream parameter that a stage sets itself for each task it
    requires (set by it on each ``clone``, so not a parameter of its own)."""
    def decorate(cls):
        before = set(dir(cls))
        cls = luigi.util.inherits(*upstream)(cls)
        for name in without:
            if name not in before:
                delattr(cls, name)
        return cls
    return decorate


def remove_temporaries(directory: Path) -> int:
    """Delete the :func:`pipeline.io.atomic_path` temporaries (``.*.tmp*``) under ``directory``; how many."""
    n = 0
    for tmp in sorted(directory.rglob(".*.tmp*"), reverse=True):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        n += 1
    return n


@contextlib.contextmanager
def stage_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent); blocks, saying so, while another process holds
    it. The kernel releases the lock when its holder dies, so a killed run never leaves a stuck lock (its file stays
    behind, unlocked). The holder deletes the file when it leaves; a waiter that then gets the lock of the deleted
    file sees that ``path`` is no longer that file and locks ``path`` anew, so only one process at a time holds the
    lock of the file that ``path`` names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("%s: another process is running it; waiting for its lock %s", what, path)
                t0 = time.time()
                fcntl.flock(fd, fcntl.LOCK_EX)
                log.info("%s: got the lock after %.1fs", what, time.time() - t0)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    yield
                finally:
                    os.unlink(path)
                return
        finally:
            os.close(fd)  # releases the lock


# -- invalidation (make rerun) -----------------------------------------------------------------------------
def invalidate(stage_refs: list[str], root: Path | None = None, dry_run: bool = False) -> list[str]:
    """Remove the given stage outputs (``<Stage>/<hash>``) and, recursively, every output computed from them
    (found through the ``upstream`` lists of params.json files). Returns what was removed."""
    root = root or outputs_root()
    dependents: dict[str, list[str]] = {}
    for pj in root.glob("*/*/params.json"):
        if pj.parent.name.endswith(".partial"):
            continue
        try:
            meta = read_json(pj)
        except (OSError, ValueError):
            continue
        ref = f"{pj.parent.parent.name}/{pj.parent.name}"
        for up in meta.get("upstream", []):
            dependents.setdefault(up, []).append(ref)
    removed, todo = [], list(stage_refs)
    while todo:
        ref = todo.pop()
        if ref in removed:
            continue
        removed.append(ref)
        todo.extend(dependents.get(ref, []))
        for d in (root / ref, root / (ref + ".partial")):
            if d.exists() and not dry_run:
                shutil.rmtree(d)
    return removed
