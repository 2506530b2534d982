"""Several processes run the same stage on one outputs root (tasks.base.StageTask.run's lock): every run exits 0,
exactly one computes, the published directory equals a single run's and holds only the stage's files; a run
killed inside the stage is taken over by the one waiting. The runs are separate luigi processes (local scheduler,
luigi's pid lock off) forked at once by tests/concurrent_runs.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness as H

pytestmark = pytest.mark.slow  # forks luigi runs (tests/concurrent_runs.py)

REPO = Path(__file__).resolve().parents[1]
STAGE = "ToyParts"
ARGV = ["--module", "toy_tasks", STAGE, "--local-scheduler", "--no-lock"]


def run_rounds(tmp_path: Path, rounds: list[dict], argv=ARGV) -> list[dict]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"module": "toy_tasks", "argv": argv, "rounds": rounds}))
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    env.pop("CLICKSCALE_OUTPUTS", None)
    p = subprocess.run([sys.executable, str(REPO / "tests" / "concurrent_runs.py"), str(spec)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    records = json.loads(p.stdout)
    for r in records:
        r["log_text"] = [Path(lg).read_text() for lg in r["logs"]]
    return records


def published(outputs: Path) -> dict[str, object]:
    """``{relative path: content}`` of every file under ``outputs``: bytes, params.json without its volatile
    fields (timings, luigi task id)."""
    out = {}
    for f in sorted(p for p in outputs.rglob("*") if p.is_file()):
        rel = str(f.relative_to(outputs))
        if f.name == "params.json":
            out[rel] = {k: v for k, v in json.loads(f.read_text()).items() if k not in H.VOLATILE_KEYS}
        else:
            out[rel] = f.read_bytes()
    return out


def entries(outputs: Path) -> list[str]:
    """Everything under ``outputs`` (directories, lock files, temporaries included)."""
    return sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*"))


def only(ref: dict) -> list[str]:
    """The entries of an outputs root that holds the published directory of ``ref`` and nothing else."""
    return sorted({str(Path(k).parent) for k in ref} | {STAGE} | set(ref))


def test_four_identical_runs_at_once_publish_one_clean_output(tmp_path):
    rounds = [{"outputs": str(tmp_path / "single"), "procs": 1}]
    rounds += [{"outputs": str(tmp_path / f"race{i}"), "procs": 4} for i in range(10)]
    single, *races = run_rounds(tmp_path, rounds)
    assert single["rcs"] == [0], single["log_text"][0][-3000:]
    ref = published(Path(single["outputs"]))
    (out_dir,) = {k.split("/")[1] for k in ref}
    assert sorted(ref) == [f"{STAGE}/{out_dir}/params.json"] + [f"{STAGE}/{out_dir}/part{i:03d}.txt" for i in range(40)]
    assert entries(Path(single["outputs"])) == only(ref)  # no lock file, no work directory left
    for r in races:
        outputs = Path(r["outputs"])
        logs = "\n".join(r["log_text"])
        assert r["rcs"] == [0, 0, 0, 0], logs[-4000:]
        # exactly one process computed it; the others waited for it or found it complete
        assert logs.count("running in") == 1, logs[-4000:]
        assert entries(outputs) == only(ref), entries(outputs)  # nothing but the stage's files
        assert published(outputs) == ref


@pytest.mark.parametrize("delay", [0.15, 0.3])
def test_killed_run_is_taken_over_by_the_waiting_one(tmp_path, delay):
    """Two runs at once; the one inside the stage is SIGKILLed mid-stage: the other, waiting on the lock, gets it,
    resumes in the work directory and publishes; a rerun does nothing; the result equals a single run's."""
    argv = ARGV + ["--pause", "0.02"]  # 40 parts, ~1 s in the stage (--pause is not significant: same hash)
    out = tmp_path / "outputs"
    single, killed, rerun = run_rounds(tmp_path, [
        {"outputs": str(tmp_path / "single"), "procs": 1},
        {"outputs": str(out), "procs": 2, "kill_ready_after": delay},
        {"outputs": str(out), "procs": 1},
    ], argv=argv)
    assert single["rcs"] == [0]
    k = killed["killed"]
    other = 1 - k
    assert killed["rcs"][k] == -9 and killed["rcs"][other] == 0, killed["log_text"][other][-3000:]
    (hash_,) = {e.split("/")[1].split(".")[0] for e in killed["at_kill"]}
    assert f"{STAGE}/{hash_}.partial" in killed["at_kill"] and f"{STAGE}/{hash_}" not in killed["at_kill"]
    survivor = killed["log_text"][other]
    assert "another process is running it; waiting for its lock" in survivor, survivor[-3000:]
    assert f"resuming in {out / STAGE / hash_}.partial" in survivor, survivor[-3000:]
    assert rerun["rcs"] == [0] and "running in" not in rerun["log_text"][0]
    ref = published(Path(single["outputs"]))
    assert entries(out) == only(ref), entries(out)
    assert published(out) == ref
