"""Small command line around the luigi tasks.

    python -m tasks.cli show  <Task> [luigi params]          where a task's outputs are, and its summary
    python -m tasks.cli rerun <Stage> <Task> [luigi params]  recompute <Stage> (and everything computed from it)
                                                             in the graph of <Task>, then run <Task>
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import luigi
from luigi.cmdline_parser import CmdlineParser
from luigi.task import flatten

import tasks  # noqa: F401  (registers every task)

from .base import StageTask, invalidate


def task_from_args(task: str, params: list[str]) -> luigi.Task:
    with CmdlineParser.global_instance([task] + params) as cp:
        return cp.get_task_obj()


def walk(task: luigi.Task):
    """Every task in ``task``'s dependency graph (breadth first, each once)."""
    seen, queue = set(), [task]
    while queue:
        t = queue.pop(0)
        if t.task_id in seen:
            continue
        seen.add(t.task_id)
        yield t
        queue.extend(flatten(t.requires()))


def show(task: luigi.Task) -> int:
    if not isinstance(task, StageTask):
        print(task.task_id)
        return 0
    d = Path(task.output().path)
    if not d.exists():
        print(f"{task.task_family}: not computed yet ({d})")
        return 1
    print(f"{task.task_family} output: {d}")
    for name in ("summary.md",):
        if (d / name).is_file():
            print((d / name).read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show")
    s.add_argument("task")
    r = sub.add_parser("rerun")
    r.add_argument("stage")
    r.add_argument("task")
    r.add_argument("--dry-run", action="store_true")
    args, rest = ap.parse_known_args(argv)
    task = task_from_args(args.task, rest)
    if args.cmd == "show":
        return show(task)
    targets = [t.stage_ref for t in walk(task) if t.task_family == args.stage and isinstance(t, StageTask)]
    if not targets:
        print(f"{args.task} does not depend on a stage named {args.stage}", file=sys.stderr)
        return 2
    removed = invalidate(targets, dry_run=args.dry_run)
    print("invalidated:", *removed, sep="\n  ")
    if args.dry_run:
        return 0
    from luigi.retcodes import run_with_retcodes

    run_with_retcodes(["--module", "tasks", args.task, "--local-scheduler"] + rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
