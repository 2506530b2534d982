"""bench/pipeline_speed.py's bookkeeping (its table, ratios and targets) on hand-made stage rows, and
bench/gpu_check.sh's syntax (the GPU check itself needs a CUDA machine and is never run by the tests)."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import pipeline_speed as ps  # noqa: E402


def _stages(rows):
    return pd.DataFrame([{"family": f, "dir": f"/x/{f}/{i}", "seconds": s, "cpu_seconds": c, "cores": 2,
                          "peak_rss_mb": m, "finished": f"T{i:02d}", "params": {}} for i, (f, s, c, m) in enumerate(rows)])


def test_stage_outputs_in_the_order_the_job_finished_them(tmp_path):
    from pipeline.io import write_json

    for fam, h, done in (("B", "1", "2026-01-01T00:00:03"), ("A", "2", "2026-01-01T00:00:05"),
                         ("B", "3", "2026-01-01T00:00:01"), ("C", "4", "2026-01-01T00:00:02")):
        write_json(tmp_path / fam / h / "params.json", {"seconds": 1.0, "cpu_seconds": 1.0, "cores": 2,
                                                         "peak_rss_mb": 1.0, "finished": done, "params": {}})
    df = ps.stage_outputs(tmp_path)
    assert list(df.family) == ["B", "B", "C", "A"] and list(df.finished.str[-1]) == ["1", "3", "2", "5"]


def test_stage_table_ratios_and_targets():
    stages = _stages([("PrepareDataset", 2.0, 1.0, 300.0),
                      ("SelectiveSearchShard", 10.0, 19.0, 400.0), ("SelectiveSearchShard", 10.0, 19.0, 500.0),
                      ("TrainClassifier", 40.0, 60.0, 2000.0),
                      ("GenerateCAMsShard", 15.0, 29.0, 1500.0), ("GenerateCAMsShard", 15.0, 29.0, 1600.0)])
    floors = {"SelectiveSearchShard": 16.0, "TrainClassifier": 32.0, "GenerateCAMsShard": 12.0}
    table = ps.stage_table(stages, floors, {"trainval": 100, "SelectiveSearchShard": 120}, cores=2)
    t = table.set_index("stage")
    # shards are summed (luigi ran them one after the other), peak memory is the largest output's
    assert t.loc["SelectiveSearchShard", "seconds"] == 20.0 and t.loc["SelectiveSearchShard", "outputs"] == 2
    assert t.loc["SelectiveSearchShard", "ratio"] == pytest.approx(20 / 16)
    assert t.loc["SelectiveSearchShard", "images_per_s"] == pytest.approx(120 / 20)
    assert t.loc["SelectiveSearchShard", "cpu_util"] == pytest.approx(38 / 20 / 2)
    assert t.loc["GenerateCAMsShard", "peak_rss_mb"] == 1600.0
    assert t.loc["TrainClassifier", "cpu_util"] == pytest.approx(0.75)
    assert pd.isna(t.loc["PrepareDataset", "ratio"]) and pd.isna(t.loc["PrepareDataset", "floor_seconds"])
    md = ps.markdown(table)
    assert "| TrainClassifier | 1 | 40.0 | 32.0 (classifier) | 1.25 | 2.50 | 75 | 2000 |" in md
    assert "| PrepareDataset | 1 | 2.0 | - | - | 50.00 | 25 | 300 |" in md
    job = {"wall": 95.0, "ratio": float(table.seconds.sum()) / sum(floors.values())}  # 92 / 60
    passes = {"layers": ["a", "b"], "lowest": "a", "ratio": 1.05}
    missed = ps.check_targets(table, job, passes, synthetic=False)
    # the job ratio (1.53 > 1.3) and the classifier's 75% CPU over 40 s; the 2-layer pass and the rest are fine
    assert len(missed) == 2 and missed[0].startswith("job ratio 1.53") and "TrainClassifier: CPU" in missed[1]
    # synthetic runs: the wall-time target instead of the job ratio; a slow two-layer pass is reported
    missed = ps.check_targets(table, {**job, "wall": 250.0}, {**passes, "ratio": 1.2}, synthetic=True)
    assert [m.split(" ")[0] for m in missed] == ["2-layer", "synthetic", "TrainClassifier:"]


def test_gpu_check_script_parses():
    res = subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
