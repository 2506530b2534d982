"""Tiny stages used by the framework tests (tests/test_framework.py)."""
import os
import time
from pathlib import Path

import luigi
from luigi.util import inherits

from pipeline.io import write_text
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
