"""Start one luigi command line in several processes at once (tests/test_concurrent_stage.py).

``python tests/concurrent_runs.py <spec.json>`` imports luigi and the task module once, then forks one process per
run; each child redirects its output to a log file and calls luigi's command-line entry point
(``luigi.cmdline.luigi_run``, what ``python -m luigi`` runs) with the spec's arguments, so every run is a separate
process with its own luigi scheduler and worker, started within milliseconds of the others, without paying the
package import (torch) once per run. Prints a JSON list with one record per round.

Spec: ``{"module": "toy_tasks", "argv": [...luigi args...], "rounds": [{"outputs": dir, "procs": n,
"kill_ready_after": seconds or null}, ...]}``. With ``kill_ready_after`` each child gets its own ``TOY_READY``
file; when the first of them appears (the child is inside the stage), that child is SIGKILLed after the given
delay (``at_kill``: the ``<Stage>/`` entries then), and the others are left to finish. Each child logs the stage
framework's INFO lines (logger ``clickscale``) too.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def _child(argv: list[str], outputs: str, log: str, ready: str | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["CLICKSCALE_OUTPUTS"] = outputs
    if ready:
        os.environ["TOY_READY"] = ready
    import logging

    handler = logging.StreamHandler()  # the stage framework's INFO lines (running in / resuming in ...) too
    handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
    logging.getLogger("clickscale").addHandler(handler)
    logging.getLogger("clickscale").setLevel(logging.INFO)
    logging.getLogger("clickscale").propagate = False
    code = 0
    try:
        from luigi.cmdline import luigi_run

        luigi_run(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report it through the exit code and the log
        import traceback

        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_round(n: int, argv: list[str], outputs: Path, procs: int, kill_ready_after: float | None,
              timeout: float = 120) -> dict:
    """Round ``n``: its logs and ready files lie beside ``outputs``."""
    outputs.mkdir(parents=True, exist_ok=True)
    logs = [outputs.parent / f"round{n}.run{i}.log" for i in range(procs)]
    readies = [outputs.parent / f"round{n}.ready{i}" for i in range(procs)]
    pids = []
    for i in range(procs):
        pid = os.fork()
        if pid == 0:
            _child(argv, str(outputs), str(logs[i]), str(readies[i]) if kill_ready_after is not None else None)
        pids.append(pid)
    killed, at_kill = None, []
    if kill_ready_after is not None:
        deadline = time.monotonic() + timeout
        while killed is None and time.monotonic() < deadline:
            for i, r in enumerate(readies):
                if r.exists():
                    time.sleep(kill_ready_after)
                    os.kill(pids[i], signal.SIGKILL)
                    killed = i
                    at_kill = sorted(str(p.relative_to(outputs)) for p in outputs.glob("*/*"))
                    break
            time.sleep(0.002)
    rcs = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        rcs.append(os.waitstatus_to_exitcode(status))
    return {"outputs": str(outputs), "rcs": rcs, "killed": killed, "at_kill": at_kill, "logs": [str(p) for p in logs]}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    importlib.import_module(spec["module"])  # once, before forking
    records = [run_round(n, spec["argv"], Path(r["outputs"]), r["procs"], r.get("kill_ready_after"))
               for n, r in enumerate(spec["rounds"])]
    print(json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1])
