import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import luigi
import pytest

from pipeline.io import atomic_path, read_json, write_json
from tasks.base import invalidate

from toy_tasks import ToyA, ToyB

REPO = Path(__file__).resolve().parents[1]


def build(*tasks):
    return luigi.build(list(tasks), local_scheduler=True, detailed_summary=True, log_level="WARNING")


def test_hash_follows_significant_params_and_upstream(outputs):
    assert ToyA(value=1).stage_dir == ToyA(value=1, note="x").stage_dir  # insignificant param
    assert ToyA(value=1).stage_dir != ToyA(value=2).stage_dir
    assert ToyB(value=1).stage_dir != ToyB(value=2).stage_dir  # upstream change -> new downstream dir
    assert ToyB(value=1).stage_dir != ToyB(value=1, scale=3).stage_dir
    assert ToyA(value=1).stage_dir.parent == outputs / "ToyA"


def test_one_hash_policy_own_params_and_upstream_refs(outputs):
    # ToyB's own parameters are those of its class statement; @inherits adds ToyA's, hashed only through ToyA's ref
    assert ToyB.own_param_names() == {"scale", "fail"} and ToyB.inherited_param_names() == {"value", "note", "sleep"}
    assert ToyB(value=3).significant_params() == {"scale": "10"}
    assert ToyB(value=3).hash_refs() == [ToyA(value=3).stage_ref]


def test_every_stage_hashes_only_its_own_params():
    import tasks
    from tasks.detector import CompareDetectors
    from tasks.mil import MILBoxes

    stages = [tasks.PrepareDataset, tasks.SelectiveSearchShard, tasks.SelectiveSearch, tasks.SelectProposals,
              tasks.TrainClassifier, tasks.GenerateCAMsShard, tasks.GenerateCAMs, tasks.FusePseudoBoxes,
              MILBoxes, tasks.ProposalFreeBoxes, tasks.ImageExtentBoxes, tasks.PseudoLabels, tasks.TrainFastRCNN,
              tasks.EvaluateVOC07, CompareDetectors, tasks.Detect, tasks.RelocalizeDetector, tasks.RelocalizeBoxes]
    owners: dict[str, list[str]] = {}
    for cls in stages:
        for name in cls.own_param_names():
            owners.setdefault(name, []).append(cls.task_family)
    # each parameter has one owning stage, but for a shard and its merge, the pseudo-box stages' shared box and
    # export settings (the same parameter objects), the seed of the trainings, and the re-localisation stages: the
    # fold detector is a TrainFastRCNN, it and the round share the round, and they and PseudoLabels the choice of
    # the pseudo-box stage (tasks/relocalize.py BoxSource)
    shared = {k: v for k, v in owners.items() if len(v) > 1}
    box_stages = {"FusePseudoBoxes", "MILBoxes", "ProposalFreeBoxes", "ImageExtentBoxes", "RelocalizeBoxes"}
    relocalize = ({"TrainFastRCNN", "RelocalizeDetector"}, {"RelocalizeDetector", "RelocalizeBoxes"},
                  {"PseudoLabels", "RelocalizeDetector", "RelocalizeBoxes"})
    assert all(set(v) in ({"SelectiveSearchShard", "SelectiveSearch"}, {"GenerateCAMsShard", "GenerateCAMs"},
                          *relocalize)
               or set(v) <= box_stages for k, v in shared.items() if k not in ("seed", "device")), shared
    assert set(owners["seed"]) == {"TrainClassifier", "TrainFastRCNN", "RelocalizeDetector"}
    assert set(owners["relocalize_round"]) == {"RelocalizeDetector", "RelocalizeBoxes"}
    assert "relocalize_min_score" not in tasks.RelocalizeDetector.own_param_names()  # its input's, not its own
    assert tasks.EvaluateVOC07.own_param_names() == {"eval_split", "eval_corloc", "eval_batch", "eval_train_map"}
    assert "eval_holdout" in tasks.PrepareDataset.own_param_names()  # a dataset parameter: it changes the splits
    # --cam-layers is GenerateCAMs' (all layers in one pass); FusePseudoBoxes passes it on resolved per backbone
    assert "cam_layers" in tasks.GenerateCAMs.own_param_names()
    assert "cam_layers" not in tasks.FusePseudoBoxes.own_param_names()
    assert "cam_layers" in tasks.PseudoLabels.get_param_names() and "cam_layer" not in tasks.GenerateCAMs.get_param_names()


def test_parameters_added_later_are_hashed_only_when_set():
    """``unhashed_values``: a stage's outputs from before such a parameter existed keep their directory (the value
    that reproduces them is not hashed); any other value is."""
    import tasks

    for cls, name, value in ((tasks.PrepareDataset, "eval_holdout", 5), (tasks.TrainFastRCNN, "det_arch", "faster_rcnn"),
                             (tasks.EvaluateVOC07, "eval_train_map", True),
                             (tasks.PseudoLabels, "relocalize_rounds", 1)):
        assert name in cls.unhashed_values and name in cls.own_param_names()
        assert name not in cls().significant_params()
        assert name in cls(**{name: value}).significant_params()
        assert cls(**{name: value}).stage_dir != cls().stage_dir
    # a default that changed the result (--cam-paste grid): the new default is hashed, the former value is not
    for cls in (tasks.GenerateCAMsShard, tasks.GenerateCAMs):
        assert cls().significant_params()["cam_paste"] == "grid"
        assert "cam_paste" not in cls(cam_paste="resize").significant_params()
        assert cls(cam_paste="resize").stage_dir != cls().stage_dir
    image_level = dict(classifier_mode="image_labels")
    assert "classifier_image_pooling" not in tasks.TrainClassifier(**image_level).significant_params()
    assert tasks.TrainClassifier(**image_level, classifier_image_pooling="spam").significant_params()[
        "classifier_image_pooling"] == "spam"
    # --classifier-epochs 0 resolves to the mode's default and is hashed as that number: the crop classifier keeps
    # its directory, the image-level networks (a longer default) get new ones
    from tasks.defaults import TUNED

    crops = tasks.TrainClassifier()
    assert crops.epochs == TUNED.classifier_epochs and crops.significant_params()["classifier_epochs"] == "3"
    assert tasks.TrainClassifier(classifier_epochs=3).stage_dir == crops.stage_dir
    image = tasks.TrainClassifier(**image_level)
    assert image.epochs == TUNED.classifier_image_epochs > TUNED.classifier_epochs
    assert image.train_config().epochs == image.epochs
    assert tasks.TrainClassifier(**image_level, classifier_epochs=3).stage_dir != image.stage_dir
    assert tasks.TrainClassifier(**image_level, classifier_epochs=image.epochs).stage_dir == image.stage_dir
    # --box-area-prior auto resolves by the clicks per object and is hashed as resolved: one click keeps the
    # directory of the earlier default "off", two clicks hash as "learned"
    one, two = tasks.FusePseudoBoxes(), tasks.FusePseudoBoxes(clicks_per_object="2")
    assert one.significant_params()["box_area_prior"] == "off" and one.area_prior() == "off"
    assert one.stage_dir == tasks.FusePseudoBoxes(box_area_prior="off").stage_dir
    assert two.area_prior() == "learned"
    assert two.stage_dir == tasks.FusePseudoBoxes(clicks_per_object="2", box_area_prior="learned").stage_dir
    assert two.stage_dir != tasks.FusePseudoBoxes(clicks_per_object="2", box_area_prior="off").stage_dir


def test_reuse_and_params_json(outputs, tmp_path, monkeypatch):
    counter = tmp_path / "count.txt"
    monkeypatch.setenv("TOY_COUNTER", str(counter))
    res = build(ToyB(value=3))
    assert res.status.name == "SUCCESS"
    b = ToyB(value=3)
    assert (b.stage_dir / "b.txt").read_text() == "60\n"
    params = read_json(b.stage_dir / "params.json")
    assert params["params"]["scale"] == "10" and params["upstream"] == [ToyA(value=3).stage_ref]
    assert not b.work_dir.exists()
    build(ToyB(value=3))  # same parameters: reuses, runs nothing
    assert counter.read_text() == "A3\n"
    build(ToyB(value=4))  # changed parameter: new directories
    assert counter.read_text() == "A3\nA4\n"
    assert len(list((outputs / "ToyB").iterdir())) == 2


@pytest.mark.slow  # luigi subprocess
def test_failure_exit_code_and_nothing_published(outputs):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}
    p = subprocess.run([sys.executable, "-m", "luigi", "--module", "toy_tasks", "ToyB", "--fail",
                        "--local-scheduler"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 30, p.stderr[-2000:]  # luigi.cfg [retcode] task_failed
    assert "ToyB asked to fail" in p.stderr
    assert ToyA().stage_dir.is_dir()            # upstream result kept
    assert not ToyB(fail=True).stage_dir.exists()


@pytest.mark.slow  # luigi subprocess
def test_killed_run_leaves_no_complete_output_and_reruns(outputs, tmp_path):
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}", "TOY_READY": str(ready)}
    proc = subprocess.Popen([sys.executable, "-m", "luigi", "--module", "toy_tasks", "ToyA", "--value", "7",
                             "--sleep", "30", "--local-scheduler"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ready.exists():
        assert time.time() - t0 < 60 and proc.poll() is None, "toy task did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    a = ToyA(value=7)
    assert not a.stage_dir.exists()                    # nothing looks complete
    assert (a.work_dir / "part1.txt").is_file() and not (a.work_dir / "part2.txt").exists()
    assert not a.complete()
    assert build(ToyA(value=7)).status.name == "SUCCESS"  # a rerun finishes it
    assert (a.stage_dir / "part2.txt").read_text() == "14\n" and not a.work_dir.exists()


def test_invalidate_removes_downstream(outputs):
    build(ToyB(value=5), ToyA(value=6))
    removed = invalidate([ToyA(value=5).stage_ref])
    assert set(removed) == {ToyA(value=5).stage_ref, ToyB(value=5).stage_ref}
    assert not ToyB(value=5).stage_dir.exists() and ToyA(value=6).stage_dir.exists()


@pytest.mark.slow  # luigi subprocess
def test_rerun_cli_recomputes_stage_and_dependents(outputs, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}", "TOY_COUNTER": str(tmp_path / "c")}
    code = "import sys, toy_tasks; from tasks.cli import main; sys.exit(main(sys.argv[1:]))"
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", code, "rerun", "ToyA", "ToyB", "--value", "2"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "c").read_text() == "A2\nA2\n"
    assert (ToyB(value=2).stage_dir / "b.txt").read_text() == "40\n"


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1


def test_params_json_records_each_stage_peak_rss(outputs):
    """A stage's params.json holds the peak resident memory of its run (a 400 MB stage raises it by 400 MB over
    the process's memory before the stage)."""
    from pipeline.device import peak_rss_mb, reset_peak_rss
    from toy_tasks import ToyMemory

    reset_peak_rss()
    before = peak_rss_mb()["process"]
    big = ToyMemory(mb=400)
    assert luigi.build([big], local_scheduler=True, log_level="WARNING")
    meta = read_json(big.stage_dir / "params.json")
    assert meta["peak_rss_mb"] >= before + 390, (before, meta["peak_rss_mb"])


@pytest.mark.slow  # subprocess
def test_peak_rss_is_reset_when_a_stage_starts():
    """After a 400 MB block is freed (returned to the kernel: default malloc) and the peak reset, the peak is the
    memory held now, not the earlier 400 MB."""
    code = ("import numpy as np; from pipeline.device import peak_rss_mb, reset_peak_rss\n"
            "a = np.ones(400 * 2**20 // 8); high = peak_rss_mb()['process']; del a\n"
            "assert reset_peak_rss(); low = peak_rss_mb()['process']\n"
            "print(high, low); assert high > low + 350, (high, low)")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, env={**os.environ, "CLICKSCALE_MALLOC": "default"}, timeout=60)
    assert res.returncode == 0, res.stderr


def test_stage_rows_and_table(tmp_path):
    """Per-stage seconds and peak memory come from each output's params.json; the table lists them in the order
    they finished, a stage without params.json last, with dashes."""
    from tasks.main import stage_rows, stage_table

    for name, sec, done in (("A", 1.5, "2026-01-01T00:00:02"), ("B", 2.0, "2026-01-01T00:00:01")):
        write_json(tmp_path / name / "params.json", {"seconds": sec, "peak_rss_mb": 1000.0, "cpu_seconds": 2.7,
                                                     "cores": 2, "peak_rss_children_mb": 5.0, "finished": done})
    rows = stage_rows({"A": str(tmp_path / "A"), "B": str(tmp_path / "B"), "C": str(tmp_path / "C")})
    assert [r["stage"] for r in rows] == ["A", "B", "C"] and rows[0]["seconds"] == 1.5 and rows[2]["seconds"] is None
    assert rows[0]["cpu_util"] == pytest.approx(2.7 / 1.5 / 2) and rows[2]["cpu_util"] is None
    lines = stage_table(rows).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["B", "A", "C"]
    # A: 2.7 CPU s in 1.5 s on 2 cores = 90 %; B: 2.7 / 2.0 / 2 = 68 %
    assert lines[3] == "| A | 1.5 | 90 | 1000 | 5 | 2026-01-01T00:00:02 |" and lines[4] == "| C | - | - | - | - | - |"
    assert lines[2].split("|")[3].strip() == "68"


@pytest.mark.slow  # runs a tiny luigi chain per start method
@pytest.mark.parametrize("how", ["subprocess", "forkserver"])
def test_params_json_records_each_stage_cpu_time(outputs, how):
    """A stage's params.json holds its CPU time, its descendants' included: a stage that busy-loops 0.6 s in a
    child process it waits for, or in a forkserver's worker (a grandchild the forkserver reaps, as selective
    search's workers), records at least that much, and the cores of the machine."""
    from toy_tasks import ToyChildCPU

    task = ToyChildCPU(busy_s=0.6, how=how)
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    meta = read_json(task.stage_dir / "params.json")
    assert meta["cpu_seconds"] >= 0.55 and meta["cores"] >= 1, meta
    assert meta["cpu_seconds"] <= meta["seconds"] * meta["cores"] + 0.5
