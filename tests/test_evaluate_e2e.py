"""The whole chain through the command line, tiny: ``luigi --module tasks EvaluateVOC07`` on 8 + 4 synthetic images
with the default box source (pseudo labels), a 1-epoch random-weight classifier and a 3-epoch efficientnet_lite0
Fast R-CNN at 128 px. The run is SIGKILLed inside TrainFastRCNN after its first epoch checkpoint and restarted: the
detector resumes from that checkpoint. The outputs are then checked against the manifest and against straightforward
recomputations (per-class NMS, the 100-per-image cap, CorLoc, the devkit results files)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.ops import box_iou

import harness as H

pytestmark = pytest.mark.slow  # luigi subprocess runs

BOX = ["x1", "y1", "x2", "y2"]
DET = {"det-epochs": 3, "det-image-min-px": 128, "det-image-max-px": 192, "det-max-proposals": 300, "det-preset": "cpu"}


def _args(data: Path) -> list[str]:
    args = H.tiny_args(data, ss_splits='["trainval", "test"]', synth_test=4)
    for k, v in DET.items():
        args += [f"--{k}", str(v)]
    return args


def _run_killed_after_first_checkpoint(cmd, env, outputs: Path, timeout: float = 300) -> dict:
    """Start ``cmd``; as soon as TrainFastRCNN's work directory holds a checkpoint, SIGKILL the process group."""
    proc = subprocess.Popen(cmd, cwd=H.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = None
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            found = list(outputs.glob("TrainFastRCNN/*.partial/model.pth"))
            if found:
                os.killpg(proc.pid, signal.SIGKILL)
                seen = found[0]
                break
            time.sleep(0.005)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return {"rc": rc, "checkpoint": seen, "stderr": proc.stderr.read()[-3000:] if proc.stderr else ""}


def _one(outputs: Path, stage: str) -> Path:
    dirs = [d for d in H.stage_dirs(outputs) if d.parent.name == stage]
    assert len(dirs) == 1, (stage, dirs)
    return dirs[0]


def test_evaluate_voc07_cli_tiny_chain_with_killed_detector(tmp_path):
    outputs, data = tmp_path / "outputs", tmp_path / "data"
    env = H.pipeline_env(outputs)
    cmd = H.luigi_cmd("EvaluateVOC07", _args(data), module="tasks")

    killed = _run_killed_after_first_checkpoint(cmd, env, outputs)
    assert killed["checkpoint"] is not None, killed["stderr"]
    assert killed["rc"] == -signal.SIGKILL
    assert [d for d in H.stage_dirs(outputs) if d.parent.name == "TrainFastRCNN"] == []  # not published yet
    ckpt = torch.load(killed["checkpoint"], map_location="cpu", weights_only=False)
    done_epochs = [row["epoch"] for row in ckpt["log"]]
    assert done_epochs == list(range(1, ckpt["epoch"] + 2)) and len(done_epochs) < 3

    final = subprocess.run(cmd, cwd=H.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert H.incomplete_outputs(outputs) == [] and not list(outputs.glob("*/*.partial"))

    # -- TrainFastRCNN: resumed (the epochs before the kill were not recomputed), trained on the pseudo labels
    train = _one(outputs, "TrainFastRCNN")
    log = pd.read_csv(train / "train_log.csv")
    assert list(log.epoch) == [1, 2, 3]
    for row in ckpt["log"]:  # same timing values: these rows come from the checkpoint, not from a second run
        assert log.loc[log.epoch == row["epoch"], "seconds"].item() == pytest.approx(row["seconds"])
    model = torch.load(train / "model.pth", map_location="cpu", weights_only=False)
    assert model["epoch"] == 2 and "optimizer" not in model and model["args"]["backbone"] == "efficientnet_lite0"
    pseudo = pd.read_csv(_one(outputs, "FusePseudoBoxes") / "pseudo_labels.csv", dtype={"image_id": str})
    trained = pd.read_csv(train / "train_boxes.csv", dtype={"image_id": str})
    key = ["image_id", "class"] + BOX
    pd.testing.assert_frame_equal(trained[key].sort_values(key).reset_index(drop=True),
                                  pseudo[key].sort_values(key).reset_index(drop=True), check_dtype=False)

    # -- EvaluateVOC07
    out = _one(outputs, "EvaluateVOC07")
    from pipeline.dataset import Manifest
    from pipeline.io import read_json
    from pipeline.voc_eval import evaluate_detections, read_voc_results_dir

    manifest = Manifest.load(_one(outputs, "PrepareDataset"))
    classes = manifest.classes
    metrics = read_json(out / "metrics.json")
    test_ids = set(manifest.split("test").image_id)
    assert metrics["test_images"] == len(test_ids) == 4
    table = pd.read_csv(out / "ap_per_class.csv")
    objs = manifest.objects
    easy = objs[objs.image_id.isin(test_ids) & ~objs.difficult.astype(bool)]
    assert list(table["class"]) == list(classes)
    assert table.set_index("class").n_gt.to_dict() == {c: int((easy["class"] == c).sum()) for c in classes}
    with_gt = table[table.n_gt > 0]
    assert metrics["mAP"] == pytest.approx(with_gt.ap.mean()) and table[table.n_gt == 0].ap.isna().all()

    dets = pd.read_csv(out / "detections_test.csv", dtype={"image_id": str})
    assert set(dets.image_id) <= test_ids and (dets.score > 0.05).all()
    assert dets.groupby("image_id").size().max() <= 100
    for _, g in dets.groupby(["image_id", "class"]):  # per-class NMS at IoU 0.3
        b = torch.tensor(g[BOX].to_numpy())
        assert (box_iou(b, b).fill_diagonal_(0) <= 0.3 + 1e-4).all()
    # the devkit results files hold the same detections (1-based, 2 decimals) and score the same mAP
    assert sorted(p.name for p in (out / "results").iterdir()) == sorted(f"comp4_det_test_{c}.txt" for c in classes)
    back = read_voc_results_dir(out / "results", classes)
    assert len(back) == len(dets)
    _, m_back = evaluate_detections(back, objs, classes, image_ids=test_ids)
    assert m_back == pytest.approx(metrics["mAP"], abs=0.02)
    assert (out / "pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # CorLoc: the top box of every class in every trainval image, recomputed here from corloc_boxes.csv
    top = pd.read_csv(out / "corloc_boxes.csv", dtype={"image_id": str})
    trainval = set(manifest.split("trainval").image_id)
    assert len(top) == len(trainval) * len(classes) and not top.duplicated(["image_id", "class"]).any()
    per_class = {}
    tv_objs = objs[objs.image_id.isin(trainval)]
    for cls in classes:
        hits = []
        for image_id, g in tv_objs[tv_objs["class"] == cls].groupby("image_id"):
            box = top[(top.image_id == image_id) & (top["class"] == cls)][BOX].to_numpy()
            hits.append(bool((box_iou(torch.tensor(box), torch.tensor(g[BOX].to_numpy())) >= 0.5).any()))
        if hits:
            per_class[cls] = np.mean(hits)
    assert metrics["corloc"] == pytest.approx(np.mean(list(per_class.values())))
    assert metrics["training"]["box_source"] == "pseudo" and metrics["test"]["fps"] > 0

    # make evaluate's last step: the summary of the finished stage
    show = subprocess.run([H.PYTHON, "-m", "tasks.cli", "show", "EvaluateVOC07", *_args(data)], cwd=H.REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0 and str(out.name) in show.stdout and "mAP (11-point, VOC2007)" in show.stdout
