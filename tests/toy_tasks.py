"""Tiny stages used by the framework tests (tests/test_framework.py)."""
import os
import time
from pathlib import Path

import luigi
from luigi.util import inherits

from pipeline.io import atomic_path, write_text
from tasks.base import StageTask


class ToyA(StageTask):
    value = luigi.IntParameter(default=1)
    note = luigi.Parameter(default="", significant=False)
    sleep = luigi.FloatParameter(default=0.0, significant=False)

    def requires(self):
        return []

    def run_stage(self, work: Path) -> None:
        counter = Path(os.environ["TOY_COUNTER"]) if "TOY_COUNTER" in os.environ else None
        if counter:
            with counter.open("a") as f:
                f.write(f"A{self.value}\n")
        # a multi-part output: a kill between the parts must not leave a complete-looking stage
        write_text(work / "part1.txt", f"{self.value}\n")
        if self.sleep:
            Path(os.environ.get("TOY_READY", "/dev/null")).touch()
            time.sleep(self.sleep)
        write_text(work / "part2.txt", f"{self.value * 2}\n")


@inherits(ToyA)
class ToyB(StageTask):
    scale = luigi.IntParameter(default=10)
    fail = luigi.BoolParameter(default=False, significant=False)

    def requires(self):
        return self.clone(ToyA)

    def run_stage(self, work: Path) -> None:
        if self.fail:
            raise RuntimeError("ToyB asked to fail")
        a = int((self.input_dir() / "part2.txt").read_text())
        write_text(work / "b.txt", f"{a * self.scale}\n")


class ToyParts(StageTask):
    """Writes ``parts`` files of ``part_kb`` KiB one after the other, each slowly (``pause`` seconds inside its
    atomic write, as a large file is written): a stage whose work directory is busy for a while (the concurrent-run
    tests, tests/test_concurrent_stage.py). ``TOY_READY``, when set, is touched when the stage starts writing."""
    parts = luigi.IntParameter(default=40)
    part_kb = luigi.IntParameter(default=16)
    pause = luigi.FloatParameter(default=0.005, significant=False)

    def requires(self):
        return []

    def run_stage(self, work: Path) -> None:
        if "TOY_READY" in os.environ:
            Path(os.environ["TOY_READY"]).touch()
        for i in range(self.parts):
            line = f"part {i} of {self.parts}\n"
            with atomic_path(work / f"part{i:03d}.txt") as tmp:
                tmp.write_text(line * (self.part_kb * 1024 // len(line)))
                time.sleep(self.pause)


class ToyMemory(StageTask):
    """Holds ``mb`` megabytes of touched memory for a moment (peak RSS bookkeeping)."""

    mb = luigi.IntParameter(default=0)

    def requires(self):
        return []

    def run_stage(self, work: Path) -> None:
        import numpy as np

        block = np.ones(self.mb * 2**20 // 8) if self.mb else None
        write_text(work / "done.txt", f"{0 if block is None else block.nbytes}\n")


class ToyChildCPU(StageTask):
    """Busy-loops ``busy_s`` seconds of CPU time in a child process (CPU-time bookkeeping): a subprocess it waits
    for (``how=subprocess``), or a worker of a forkserver pool (``how=forkserver``: a grandchild, reaped by the
    forkserver, which lives on), as selective search's workers."""

    busy_s = luigi.FloatParameter(default=0.5)
    how = luigi.Parameter(default="subprocess")

    def requires(self):
        return []

    def run_stage(self, work: Path) -> None:
        import subprocess
        import sys

        if self.how == "forkserver":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
                pool.submit(busy, self.busy_s).result()
        else:
            subprocess.run([sys.executable, "-c", f"import toy_tasks; toy_tasks.busy({self.busy_s})"], check=True,
                           cwd=Path(__file__).parent)
        write_text(work / "done.txt", "1\n")


def busy(seconds: float) -> None:
    """Spend ``seconds`` of CPU time."""
    import time

    t = time.process_time()
    while time.process_time() - t < seconds:
        pass
