"""Helpers of the scale/reliability tests (tests/test_luigid.py, test_kill_resume.py, test_determinism.py,
test_bad_input.py) and of bench/kill_resume.py: run the luigi pipeline in subprocesses, a real ``luigid`` on a
loopback port, the list of files each stage publishes, and a digest of a run's products that ignores timings and
absolute paths (so two runs in different output roots compare equal when their results are equal).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

#: the chain in the order it runs (one worker); FusePseudoBoxes/PseudoLabels need tasks.main
STAGES = ("PrepareDataset", "SelectiveSearchShard", "SelectiveSearch", "SelectProposals", "TrainClassifier",
          "GenerateCAMsShard", "GenerateCAMs", "FusePseudoBoxes", "PseudoLabels")

#: files (glob patterns) every published ``<Stage>/<hash>/`` directory must hold: a bare-hash directory with
#: fewer is "complete-looking with partial content"
STAGE_FILES: dict[str, tuple[str, ...]] = {
    "PrepareDataset": ("params.json", "images.csv", "objects.csv", "clicks.csv", "manifest.json", "summary.csv"),
    "SelectiveSearchShard": ("params.json", "proposals.h5"),
    "SelectiveSearch": ("params.json", "report.json", "proposals_*.h5"),
    "SelectProposals": ("params.json", "selected.parquet", "report.json"),
    "TrainClassifier": ("params.json", "model.pt", "train_log.csv", "report.json"),
    "GenerateCAMsShard": ("params.json", "plan.json", "index.csv", "summary.json"),
    "GenerateCAMs": ("params.json", "cams-*.h5", "index.csv", "summary.json", "summary.md"),
    "FusePseudoBoxes": ("params.json", "pseudo_labels.csv", "Annotations/*.xml", "coco.json", "metrics.json",
                        "per_class.csv", "summary.md"),
    "PseudoLabels": ("params.json", "summary.json", "summary.md"),
    "BackgroundSet": ("params.json", "background.csv", "report.json", "contact_sheet.png", "index.html"),
    "TrainBC": ("params.json", "model.pt", "train_log.csv", "report.json"),
    "BCMaps": ("params.json", "cams-*.h5", "index.csv", "summary.json"),
    "MILBoxes": ("params.json", "pseudo_labels.csv", "Annotations/*.xml", "coco.json", "metrics.json",
                 "per_class.csv", "summary.md", "mil.json"),
}

#: the tiny fast configuration: 8 trainval images of 128 px, 4 proposal shards, a random-weight classifier
#: trained 1 epoch on 64 px crops, 4 CAM shards of one 2-image part each. The whole chain takes ~8 s of compute on one core.
TINY = {
    "synth-trainval": 8, "synth-test": 2, "synth-image-px": 128, "ss-splits": '["trainval"]', "ss-shards": 4,
    "classifier-weights": "random", "classifier-epochs": 1, "classifier-input-px": 64,
    "classifier-batch-size": 16, "device": "cpu", "report-images": 0, "report-worst": 0, "cam-images-per-part": 2,
}

#: keys of JSON outputs that describe one run (timings, memory, this run's work) rather than its result
VOLATILE_KEYS = {"seconds", "finished", "seconds_this_run", "crops_per_s", "computed_crops", "task_id",
                 "peak_rss_mb", "peak_rss_children_mb", "cpu_seconds", "cores", "cpu_util"}


def tiny_args(data_root: str | os.PathLike, **overrides) -> list[str]:
    """Command-line parameters of the tiny configuration (``overrides`` use python names: ss_shards=4)."""
    params = dict(TINY)
    params.update({k.replace("_", "-"): v for k, v in overrides.items()})
    params["data-root"] = str(data_root)
    args: list[str] = []
    for k, v in params.items():
        args += [f"--{k}", str(v)]
    return args


def pipeline_env(outputs: str | os.PathLike, **extra: str) -> dict:
    env = {**os.environ, "CLICKSCALE_OUTPUTS": str(outputs), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
           "PYTHONHASHSEED": "0", "TQDM_DISABLE": "1"}
    env.update(extra)
    return env


def luigi_cmd(task: str, args: Sequence[str], *, workers: int = 1, port: int | None = None,
              module: str = "tasks.main") -> list[str]:
    """``python -m luigi --module tasks.main <task> ...`` with the local scheduler, or ``port``'s luigid.

    ``tasks.main`` imports the package (every stage) and PseudoLabels."""
    cmd = [PYTHON, "-m", "luigi", "--module", module, task, *args, "--workers", str(workers)]
    if port is None:
        cmd.append("--local-scheduler")
    else:  # several worker processes: --no-lock (luigi refuses a second identical command line on a host by
        # default), keep-alive (wait while another worker runs a dependency; luigi.cfg sets keep_alive=false),
        # short polls (luigi's default adds up to 5 s of random jitter to each 1 s wait)
        cmd += ["--scheduler-host", "127.0.0.1", "--scheduler-port", str(port), "--no-lock", "--worker-keep-alive",
                "--worker-wait-interval", "0.2", "--worker-wait-jitter", "0.2"]
    return cmd


def run_luigi(task: str, args: Sequence[str], outputs: str | os.PathLike, *, timeout: float = 300,
              workers: int = 1, port: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(luigi_cmd(task, args, workers=workers, port=port), cwd=REPO,
                          env=env or pipeline_env(outputs), capture_output=True, text=True, timeout=timeout)


# -- luigid -------------------------------------------------------------------------------------------------
#: exit codes (luigi.cfg [retcode]) of a worker process that ran without failure when other workers share its
#: graph: 0, 10 (already_running: another worker ran some of its tasks), 25 (not_run: the scheduler gave a task
#: it had scheduled to another worker)
SHARED_GRAPH_OK = (0, 10, 25)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def luigid(workdir: str | os.PathLike, startup_timeout: float = 30.0) -> Iterator[int]:
    """A real central scheduler on 127.0.0.1:<free port> with its state under ``workdir``; yields the port and
    always stops the server (SIGTERM, then SIGKILL after 10 s)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (workdir / "luigid.log").open("w")
    proc = subprocess.Popen([PYTHON, "-c", "import sys; from luigi.cmdline import luigid; luigid(sys.argv[1:])",
                             "--address", "127.0.0.1", "--port", str(port),
                             "--state-path", str(workdir / "luigid.pickle"), "--logdir", str(workdir)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"luigid exited with {proc.returncode}: {(workdir / 'luigid.log').read_text()}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"luigid did not listen on 127.0.0.1:{port} within {startup_timeout} s")
            time.sleep(0.1)
        yield port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


_RUN_LINE = re.compile(r"Worker Worker\(.*?pid=(\d+)\) running\s+(\w+)\((.*)\)\s*$")


def task_runs(log_text: str) -> list[tuple[str, str, str]]:
    """``(pid, family, params)`` of every task a luigi worker started, from its INFO log."""
    return [(m.group(1), m.group(2), m.group(3)) for m in map(_RUN_LINE.search, log_text.splitlines()) if m]


# -- published outputs ----------------------------------------------------------------------------------
def stage_dirs(outputs: str | os.PathLike) -> list[Path]:
    """Every published (bare-hash) stage directory under ``outputs``."""
    return sorted(d for d in Path(outputs).glob("*/*") if d.is_dir() and not d.name.endswith(".partial"))


def incomplete_outputs(outputs: str | os.PathLike) -> list[str]:
    """Problems of published directories: a missing file of :data:`STAGE_FILES`, a leftover temporary file, a
    params.json without ``finished``. Empty when every bare-hash directory is complete."""
    problems = []
    for d in stage_dirs(outputs):
        stage = d.parent.name
        for pattern in STAGE_FILES.get(stage, ("params.json",)):
            if not list(d.glob(pattern)):
                problems.append(f"{stage}/{d.name}: no {pattern}")
        for tmp in d.rglob(".*.tmp*"):
            problems.append(f"{stage}/{d.name}: temporary file {tmp.relative_to(d)}")
        try:
            if "finished" not in json.loads((d / "params.json").read_text()):
                problems.append(f"{stage}/{d.name}: params.json has no 'finished'")
        except (OSError, ValueError) as e:
            problems.append(f"{stage}/{d.name}: params.json unreadable ({e})")
    return problems


def _drop_volatile(obj):
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def _h5_digest(path: Path) -> str:
    import h5py
    import numpy as np

    h = hashlib.sha1()

    def visit(name, obj):
        h.update(name.encode())
        if isinstance(obj, h5py.Dataset):
            data = obj[()]
            if isinstance(data, np.ndarray) and data.dtype != object:
                h.update(np.ascontiguousarray(data).tobytes())
            else:  # strings (object arrays hold pointers: hash their values)
                h.update(repr(data.tolist() if isinstance(data, np.ndarray) else data).encode())
        for k in sorted(obj.attrs):
            h.update(f"{k}={obj.attrs[k]!r}".encode())

    with h5py.File(path, "r") as f:
        visit("/", f)
        f.visititems(visit)
    return h.hexdigest()


def file_digest(path: Path, roots: Sequence[tuple[str, str]]) -> str | None:
    """Digest of a product file's result content (None: not compared, e.g. a drawing or a timing summary);
    ``roots``: ``(absolute path, label)`` replaced in text content, longest first."""
    def norm(text: str) -> str:
        for r, label in roots:
            text = text.replace(r, label)
        return text

    suffix = path.suffix
    if suffix in (".h5",):
        return _h5_digest(path)
    if suffix == ".pt":
        import torch

        payload = torch.load(path, map_location="cpu", weights_only=True)
        h = hashlib.sha1()
        for k, v in sorted(payload["state_dict"].items()):
            h.update(k.encode())
            h.update(v.numpy().tobytes())
        h.update(json.dumps(_drop_volatile(payload.get("meta", {})), sort_keys=True).encode())
        return norm(h.hexdigest())
    if suffix == ".parquet":
        import pandas as pd

        return hashlib.sha1(norm(pd.read_parquet(path).to_csv(index=False)).encode()).hexdigest()
    if suffix == ".json":
        obj = json.loads(norm(path.read_text()))
        return hashlib.sha1(json.dumps(_drop_volatile(obj), sort_keys=True).encode()).hexdigest()
    if suffix == ".csv":
        import pandas as pd

        df = pd.read_csv(io.StringIO(norm(path.read_text())))
        df = df.drop(columns=[c for c in df.columns if c in VOLATILE_KEYS])
        return hashlib.sha1(df.to_csv(index=False).encode()).hexdigest()
    if suffix == ".xml":
        return hashlib.sha1(norm(path.read_text()).encode()).hexdigest()
    return None  # .md (timings), report/ drawings


def products(outputs: str | os.PathLike, extra_roots: Sequence[str | os.PathLike] = ()) -> dict[str, str]:
    """``{"<Stage>/<hash>/<file>": digest}`` over every published stage directory: the run's results with
    timings and absolute paths (``outputs`` and ``extra_roots``, e.g. the data root) taken out."""
    outputs = Path(outputs)
    labelled = {}
    for label, r in [("<OUT>", outputs)] + [(f"<ROOT{i}>", r) for i, r in enumerate(extra_roots)]:
        labelled[str(Path(r).resolve())] = labelled[str(Path(r))] = label
    roots = sorted(labelled.items(), key=lambda kv: len(kv[0]), reverse=True)
    out = {}
    for d in stage_dirs(outputs):
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            if f.name == "params.json":
                meta = json.loads(f.read_text())
                out[f"{d.parent.name}/{d.name}/params"] = json.dumps([meta["params"], meta["upstream"]])
                continue
            dig = file_digest(f, roots)
            if dig is not None:
                out[f"{d.parent.name}/{d.name}/{f.relative_to(d)}"] = dig
    return out


def diff_products(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def pseudo_labels(outputs: str | os.PathLike) -> "pd.DataFrame":  # noqa: F821
    import pandas as pd

    (d,) = [p for p in stage_dirs(outputs) if p.parent.name == "FusePseudoBoxes"]
    return pd.read_csv(d / "pseudo_labels.csv", dtype={"image_id": str})


# -- kill and resume ------------------------------------------------------------------------------------
def kill_in_stage(cmd: list[str], env: dict, outputs: Path, stage: str, delay: float, timeout: float = 120,
                  poll: float = 0.01, later: Sequence[str] = ()) -> dict:
    """Start ``cmd``; when a new ``<stage>/`` entry appears (its ``<hash>.partial`` work directory, or already
    its published ``<hash>`` when the stage was faster than the poll), wait ``delay`` seconds and SIGKILL the
    process group; sooner if one of the ``later`` stages (those the job runs after ``stage``) gets a new entry
    during the wait, so that a delay longer than this run's stage (the durations come from another run) never
    lets the job run on past the next stage's start, whose own kill would then find it already published.
    Returns ``{"killed": bool (the process died of the signal), "in_stage": bool (the stage's
    work directory still existed at the kill), "rc": exit code, "log": output}``."""
    log = tempfile.TemporaryFile("w+")

    def entries(name: str) -> set[Path]:
        d = outputs / name
        return {w for w in d.iterdir() if w.suffix != ".lock"} if d.is_dir() else set()

    before = entries(stage)  # the stage's lock (tasks.base.stage_lock) comes first: not an entry
    later_before = {name: entries(name) for name in later}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    res = {"killed": False, "in_stage": False}
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(cmd[:6])}... did not reach {stage} within {timeout} s")
            new = entries(stage) - before
            if new:
                until = time.monotonic() + delay
                while time.monotonic() < until and proc.poll() is None:
                    if any(entries(name) - later_before[name] for name in later):
                        break
                    time.sleep(min(poll, max(until - time.monotonic(), 0.0)))
                res["in_stage"] = any(w.name.endswith(".partial") and w.exists() for w in new)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(poll)
        res["rc"] = proc.wait(30)
        res["killed"] = res["rc"] == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.seek(0)
        res["log"] = log.read()
        log.close()
    return res


def rmtree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)


_REFERENCE: dict = {}


def reference_run(task: str = "PseudoLabels") -> tuple[Path, Path]:
    """``(outputs, data_root)`` of one uninterrupted one-worker run of the tiny configuration, computed once per
    process (shared by the test modules; deleted at exit)."""
    if task not in _REFERENCE:
        import atexit

        root = Path(tempfile.mkdtemp(prefix="clickscale-ref-"))
        atexit.register(rmtree, root)
        outputs, data = root / "outputs", root / "data"
        res = run_luigi(task, tiny_args(data), outputs, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"reference run of {task} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        _REFERENCE[task] = (outputs, data)
    return _REFERENCE[task]


def stage_seconds(outputs: str | os.PathLike, sum_shards: bool = False) -> dict[str, float]:
    """Run time of each stage in a finished run (params.json ``seconds``): the longest of its directories, or with
    ``sum_shards`` for the ``*Shard`` stages, which one worker runs one after another, all shards together (so a
    kill's random moment falls anywhere in the sequence of shards, often after some have finished)."""
    out: dict[str, float] = {}
    for d in stage_dirs(outputs):
        sec = json.loads((d / "params.json").read_text()).get("seconds", 0.0)
        stage = d.parent.name
        if sum_shards and stage.endswith("Shard"):
            out[stage] = out.get(stage, 0.0) + sec
        else:
            out[stage] = max(out.get(stage, 0.0), sec)
    return out


def published(outputs: str | os.PathLike) -> dict[str, int]:
    """``{"<Stage>/<hash>": mtime (ns) of its params.json}`` of every published directory."""
    out = {}
    for d in stage_dirs(outputs):
        try:
            out[f"{d.parent.name}/{d.name}"] = (d / "params.json").stat().st_mtime_ns
        except OSError:
            pass
    return out


def kill_each_stage(outputs: Path, data_root: Path, rng, stages: Sequence[str] = STAGES,
                    durations: dict[str, float] | None = None, timeout: float = 300) -> list[dict]:
    """Run the tiny PseudoLabels job, SIGKILLing it once inside each stage in turn (a uniformly random moment of
    the stage's usual duration after its work directory appears), each time restarting it; after every kill
    check that no published directory is incomplete. Finally run it to the end (tests/test_kill_resume.py;
    bench/kill_resume.py over several seeds). Returns one record per stage: ``{"stage", "delay", "killed",
    "in_stage" (the first new work directory still existed at the kill), "work_dirs_left" (the stage's
    ``*.partial`` directories after a kill: for shard stages, any shard's), "incomplete": [...], "published":
    [...]}``; the last record is the final run's ``{"stage": "<final>", "rc", "log", "incomplete",
    "leftover_partial", "recomputed"}`` (``recomputed``: directories published before some kill whose
    ``params.json`` changed by the end; finished work is never redone)."""
    durations = durations or {}
    cmd = luigi_cmd("PseudoLabels", tiny_args(data_root))
    env = pipeline_env(outputs)
    records, first_seen = [], {}
    for i, stage in enumerate(stages):
        delay = rng.uniform(0.0, 0.9 * max(durations.get(stage, 0.05), 0.01))
        res = kill_in_stage(cmd, env, outputs, stage, delay, timeout=timeout, later=stages[i + 1:])
        if not res["killed"] and res["rc"] != 0:
            raise RuntimeError(f"run before the kill in {stage} failed ({res['rc']}):\n{res['log'][-3000:]}")
        now = published(outputs)
        first_seen.update({k: v for k, v in now.items() if k not in first_seen})
        left = sorted(p.name for p in outputs.glob(f"{stage}/*.partial")) if res["killed"] else []
        records.append({"stage": stage, "delay": round(delay, 3), "killed": res["killed"],
                        "in_stage": res["in_stage"], "work_dirs_left": left,
                        "incomplete": incomplete_outputs(outputs), "published": sorted(now)})
    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    end = published(outputs)
    records.append({"stage": "<final>", "rc": final.returncode, "log": final.stderr[-3000:],
                    "incomplete": incomplete_outputs(outputs),
                    "leftover_partial": sorted(str(p.relative_to(outputs)) for p in outputs.glob("*/*.partial")),
                    "recomputed": sorted(k for k, t in first_seen.items() if end.get(k) != t)})
    return records


def voc_sample_copy(sample_root: Path, tmp_path: Path, n: int, empty_test_list: bool = False
                    ) -> tuple[Path, list[str]]:
    """The first ``n`` trainval images of the real sample (``sample_root``: voc07-sample) copied as a VOC root
    ``tmp_path/VOC2007`` with its trainval list, and an empty test list or (default) none. Returns (root, ids)."""
    import shutil

    src = Path(sample_root) / "VOC2007"
    ids = (src / "ImageSets/Main/trainval.txt").read_text().split()[:n]
    dst = Path(tmp_path) / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True)
    for i in ids:
        shutil.copy(src / "JPEGImages" / f"{i}.jpg", dst / "JPEGImages")
        shutil.copy(src / "Annotations" / f"{i}.xml", dst / "Annotations")
    (dst / "ImageSets/Main/trainval.txt").write_text("\n".join(ids) + "\n")
    if empty_test_list:
        (dst / "ImageSets/Main/test.txt").write_text("")
    return dst, ids
