"""Re-localisation by detectors trained on the pseudo boxes (pipeline/relocalize.py, tasks/relocalize.py): the fold
assignment (no image re-localised by a detector that trained on it), the choice rule on hand-built detections, the
stages' hashes, and a killed round that resumes to the same boxes."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline import relocalize as R
from pipeline.relocalize import (RelocalizeParams, choose_boxes, expected_areas, fold_assignment, held_out_image_ids,
                                 paired_iou, relocalize_round, training_image_ids)

BOX = ["x1", "y1", "x2", "y2"]


# -- folds ----------------------------------------------------------------------------------------------------
def test_fold_assignment_is_balanced_seeded_and_disjoint():
    ids = [f"{i:06d}" for i in range(11)]
    folds = fold_assignment(ids, 2, seed=0)
    assert sorted(folds.value_counts().tolist()) == [5, 6]
    assert folds.equals(fold_assignment(list(reversed(ids)), 2, seed=0))  # the set decides, not the order
    assert not folds.equals(fold_assignment(ids, 2, seed=1))
    three = fold_assignment(ids, 3, seed=0)
    assert sorted(three.value_counts().tolist()) == [3, 4, 4]
    for f in range(3):
        train, held = set(training_image_ids(three, f)), set(held_out_image_ids(three, f))
        assert not train & held and train | held == set(ids) and held == set(three.index[three == f])
    with pytest.raises(ValueError, match="at least 2 folds"):
        fold_assignment(ids, 1, seed=0)
    with pytest.raises(ValueError, match="cannot fill 3 folds"):
        fold_assignment(ids[:2], 3, seed=0)


def _clicks_and_boxes(ids):
    clicks = pd.DataFrame({"click_id": range(len(ids)), "image_id": ids, "class": "cat", "x": 50.0, "y": 50.0})
    boxes = pd.DataFrame({"image_id": ids, "class": "cat", "x1": 0.0, "y1": 0.0, "x2": 100.0, "y2": 100.0,
                          "score": 1.0, "click_id": range(len(ids)), "fallback": False, "status": "ok"})
    images = pd.DataFrame({"image_id": ids, "path": [f"/nonexistent/{i}.jpg" for i in ids], "width": 100,
                           "height": 100})
    return clicks, boxes, images


def test_each_fold_detector_runs_only_on_images_it_did_not_train_on(monkeypatch):
    """The round hands fold f's held-out images to fold f's detector: a detector here is the set of images it
    trained on, and the detection fails when it is given one of them (as it would if the round paired a fold's
    images with another fold's detector)."""
    ids = [f"im{i}" for i in range(9)]
    clicks, boxes, images = _clicks_and_boxes(ids)
    folds = fold_assignment(ids, 3, seed=4)
    seen = {}

    def fake_detections(model, imgs, proposals, params, device, progress):
        trained = model
        assert not set(imgs.image_id) & trained, "a detector re-localises an image it trained on"
        for i in imgs.image_id:
            seen[i] = frozenset(trained)
        return pd.DataFrame({"image_id": list(imgs.image_id), "class": "cat", "score": 0.9, "x1": 40.0,
                             "y1": 40.0, "x2": 60.0, "y2": 60.0})

    monkeypatch.setattr(R, "fold_detections", fake_detections)
    detectors = {f: set(training_image_ids(folds, f)) for f in range(3)}
    out, dets, report = relocalize_round(clicks, boxes, images, folds, detectors.__getitem__, None,
                                         RelocalizeParams(folds=3), trained_on=detectors)
    assert set(seen) == set(ids) and report["relocalized"] == 9 and report["moved"] == 9
    assert (dets.fold.to_numpy() == folds.loc[dets.image_id].to_numpy()).all()
    assert (out.fold.to_numpy() == folds.loc[out.image_id].to_numpy()).all()
    # a detector that trained on an image of its own fold is refused
    leaky = {**detectors, 0: detectors[0] | {held_out_image_ids(folds, 0)[0]}}
    with pytest.raises(ValueError, match="detector of fold 0 trained on 1 of the images"):
        relocalize_round(clicks, boxes, images, folds, leaky.__getitem__, None, RelocalizeParams(folds=3),
                         trained_on=leaky)


# -- the choice rule --------------------------------------------------------------------------------------------
def _hand_case():
    clicks = pd.DataFrame({"click_id": [1, 2, 3, 4], "image_id": ["a", "a", "b", "b"],
                           "class": ["cat", "cat", "cat", "dog"], "x": [50.0, 80, 10, 30], "y": [50.0, 80, 10, 30]})
    boxes = pd.DataFrame({"image_id": ["a", "a", "b", "b"], "class": ["cat", "cat", "cat", "dog"],
                          "x1": [0.0, 70, 0, 0], "y1": [0.0, 70, 0, 0], "x2": [100.0, 90, 20, 60],
                          "y2": [100.0, 90, 20, 61], "score": [0.8, 0.7, 0.6, 0.5], "click_id": [1, 2, 3, 4],
                          "fallback": [False, True, False, False], "status": ["ok", "small", "ok", "ok"]})
    dets = pd.DataFrame([
        ("a", "cat", 0.99, 60, 60, 90, 90),   # C: click 1 outside it; click 2's choice
        ("a", "dog", 0.95, 45, 45, 55, 55),   # D: another class
        ("a", "cat", 0.90, 20, 20, 100, 100),  # A: contains both clicks, off-centre
        ("a", "cat", 0.60, 40, 40, 60, 60),   # B: centred on click 1
        ("b", "cat", 0.40, 0, 0, 20, 20),     # not confident: click 3 keeps its box
        ("b", "dog", 0.70, 0, 0, 60, 60),     # click 4's, nearly its input box
    ], columns=["image_id", "class", "score", *BOX])
    folds = pd.Series([0, 1], index=pd.Index(["a", "b"], name="image_id"), name="fold")
    return clicks, boxes, dets, folds


def test_choice_rule_on_hand_built_detections():
    clicks, boxes, dets, folds = _hand_case()
    out, report = choose_boxes(clicks, boxes, dets, folds, RelocalizeParams(min_score=0.5, sigma_bc=0.15))
    out = out.set_index("click_id")
    # click 1 at (50, 50): A = log .9 - (sqrt(200) / 80)^2 / (2 * .15^2) = -0.7998; B = log .6 + 0 = -0.5108 -> B
    assert out.loc[1, BOX].tolist() == [40, 40, 60, 60]
    assert out.loc[1, "score"] == pytest.approx(0.6) and out.loc[1, "s_bc"] == pytest.approx(1.0)
    # click 2 at (80, 80): A = log .9 - (sqrt(800) / 80)^2 / .045 = -2.8831; C = log .99 - (sqrt(50) / 30)^2 / .045
    # = -1.2446 -> C, though the fallback it was
    assert out.loc[2, BOX].tolist() == [60, 60, 90, 90]
    assert out.loc[2, "score"] == pytest.approx(math.exp(math.log(0.99) - (50 / 900) / 0.045), rel=1e-9)
    assert out.loc[2, "det_score"] == pytest.approx(0.99)
    assert not out.loc[2, "fallback"] and out.loc[2, "status"] == "ok"
    # click 3: its only detection scores 0.4 < 0.5: the input box, score and status stay; no detector scores
    assert out.loc[3, BOX].tolist() == [0, 0, 20, 20] and out.loc[3, "score"] == 0.6
    assert not out.loc[3, "relocalized"] and np.isnan(out.loc[3, "det_score"])
    # click 4: re-localised onto a box of IoU 3600/3660 with its input: not moved
    assert out.loc[4, "relocalized"] and not out.loc[4, "moved"]
    assert out.moved.tolist() == [True, True, False, False]
    assert out.fold.tolist() == [0, 0, 1, 1]
    assert report == {"clicks": 4, "relocalized": 3, "kept": 1, "moved": 2, "candidates": 5, "area_score": False,
                      "moved_iou": 0.5}
    # a lower threshold makes click 3's detection a candidate
    low, _ = choose_boxes(clicks, boxes, dets, folds, RelocalizeParams(min_score=0.3))
    assert low.set_index("click_id").loc[3, "relocalized"]


def test_area_score_can_overrule_the_centre():
    """Two clicks: an expected area of A's (80 x 80, sigma 0.5) makes B (20 x 20: log-area gap 2.77, s_ba
    exp(-15.4)) lose to A for click 1."""
    clicks, boxes, dets, folds = _hand_case()
    mu = np.array([math.log(6400), np.nan, np.nan, np.nan])
    sigma = np.array([0.5, np.nan, np.nan, np.nan])
    out, report = choose_boxes(clicks, boxes, dets, folds, RelocalizeParams(), mu, sigma)
    one = out.set_index("click_id").loc[1]
    assert one[BOX].tolist() == [20, 20, 100, 100] and one.s_ba == pytest.approx(1.0)
    assert one.score == pytest.approx(0.9 * math.exp(-(200 / 6400) / 0.045))
    assert report["area_score"]
    assert out.set_index("click_id").loc[2, BOX].tolist() == [60, 60, 90, 90]  # no pair: as before


def test_expected_areas_only_with_click_pairs():
    clicks, boxes, _, _ = _hand_case()
    assert expected_areas(clicks, boxes, RelocalizeParams()) == (None, None)


def test_expected_areas_are_fitted_on_the_other_images_boxes_without_fallbacks():
    """Pairs whose (non-fallback) boxes all have area 4 d^2 give, with the slope fixed at 2, the intercept log 4 in
    every fold and the floor spread 0.1: mu = log(4 d^2) for every pair. The fallback box, 100 times too large, and
    the lone click (no pair) do not enter the fit (else the intercept would move)."""
    n = 14
    d = np.arange(1, n + 1) * 10.0
    clicks = pd.DataFrame({"click_id": range(n), "image_id": [f"i{k}" for k in range(n)], "class": "cat",
                           "x": 200.0, "y": 200.0, "n_clicks": 2, "x_a": 200.0 - d / 2, "y_a": 200.0,
                           "x_b": 200.0 + d / 2, "y_b": 200.0})
    clicks.loc[n - 1, ["n_clicks", "x_b", "y_b"]] = [1, np.nan, np.nan]
    side = 2 * d
    side[0] *= 10  # a fallback: area 100 x 4 d^2
    boxes = pd.DataFrame({"image_id": clicks.image_id, "class": "cat", "x1": 0.0, "y1": 0.0, "x2": side, "y2": side,
                          "score": 1.0, "click_id": clicks.click_id, "fallback": [True] + [False] * (n - 1),
                          "status": ["small"] + ["ok"] * (n - 1)})
    mu, sigma = expected_areas(clicks, boxes, RelocalizeParams())
    np.testing.assert_allclose(mu[:-1], np.log(4 * d[:-1] ** 2), rtol=1e-9)
    assert np.isnan(mu[-1]) and np.allclose(sigma, 0.1)


def test_paired_iou():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 1, 1]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [2, 2, 3, 3]], float)
    np.testing.assert_allclose(paired_iou(a, b), [1.0, 50 / 150, 0.0])


def test_params_are_checked():
    with pytest.raises(ValueError, match="at least 2 folds"):
        RelocalizeParams(folds=1)
    with pytest.raises(ValueError, match="min_score"):
        RelocalizeParams(min_score=1.5)


# -- stages -------------------------------------------------------------------------------------------------------
def test_round_stages_hashes_and_chain(outputs):
    from tasks.main import PseudoLabels
    from tasks.relocalize import RelocalizeBoxes, RelocalizeDetector

    base = dict(synth_trainval=8)
    d1 = RelocalizeDetector(**base)
    # round 1's detectors train on the pseudo-box stage's boxes: the choice parameters and the TrainFastRCNN
    # parameters they do not read leave them where they are
    assert d1.stage_dir == RelocalizeDetector(**base, relocalize_min_score=0.3, det_epochs=3,
                                              det_box_source="gt").stage_dir
    assert d1.requires()["pseudo"].task_family == "FusePseudoBoxes"
    assert "relocalize_det_labels" not in d1.significant_params()  # the default keeps the hash of before
    for other in (dict(relocalize_fold=1), dict(relocalize_det_epochs=3), dict(relocalize_folds=3),
                  dict(box_symmetry="min"), dict(det_image_min_px=256), dict(relocalize_det_labels="gt")):
        assert RelocalizeDetector(**base, **other).stage_dir != d1.stage_dir, other
    # round 2's train on round 1's boxes, which do depend on the choice
    d2 = RelocalizeDetector(**base, relocalize_round=2)
    assert d2.requires()["pseudo"].task_family == "RelocalizeBoxes"
    assert d2.stage_dir != RelocalizeDetector(**base, relocalize_round=2, relocalize_min_score=0.3).stage_dir
    # PseudoLabels: round 0 is the pseudo-box stage (the hash as before the parameter), N the N-th round
    p0 = PseudoLabels(**base)
    assert p0.requires().task_family == "FusePseudoBoxes" and "relocalize_rounds" not in p0.significant_params()
    r2 = PseudoLabels(**base, relocalize_rounds=2, relocalize_folds=3).requires()
    assert isinstance(r2, RelocalizeBoxes) and r2.relocalize_round == 2
    assert sorted(k for k in r2.requires() if k.startswith("fold")) == ["fold0", "fold1", "fold2"]
    assert [r2.requires()[f"fold{f}"].relocalize_fold for f in range(3)] == [0, 1, 2]
    r1 = r2.requires()["input"]
    assert r1.relocalize_round == 1 and r1.requires()["input"].task_family == "FusePseudoBoxes"
    assert PseudoLabels(**base, relocalize_rounds=1, box_method="mil").requires().requires()["input"].task_family \
        == "MILBoxes"
    # the ground-truth upper bound: its own detectors, so its own round directory
    assert RelocalizeBoxes(**base, relocalize_det_labels="gt").stage_dir != RelocalizeBoxes(**base).stage_dir
    with pytest.raises(ValueError, match="faster_rcnn"):
        PseudoLabels(**base, relocalize_rounds=1, proposals="none")
    assert PseudoLabels(**base, relocalize_rounds=1, proposals="none", det_arch="faster_rcnn").requires() \
        .requires()["input"].task_family == "ProposalFreeBoxes"


def test_ground_truth_fold_detectors_train_on_the_other_folds_truth_only(outputs):
    """``--relocalize-det-labels gt`` (the upper bound): each fold's detector gets the ground truth of the images
    outside its fold, every (not difficult) object of them, and none of its own fold's."""
    import luigi

    from tasks import PrepareDataset
    from tasks.relocalize import RelocalizeDetector

    base = dict(synth_trainval=8)
    assert luigi.build([PrepareDataset(**base)], local_scheduler=True, log_level="WARNING")
    for fold in (0, 1):
        det = RelocalizeDetector(**base, relocalize_det_labels="gt", relocalize_fold=fold)
        manifest = det.manifest()
        folds = det.image_folds(manifest)
        boxes = det.training_boxes(manifest)
        own = set(held_out_image_ids(folds, fold))
        assert own and not own & set(boxes.image_id)
        truth = manifest.objects[manifest.objects.image_id.isin(set(training_image_ids(folds, fold)))
                                 & ~manifest.objects.difficult.astype(bool)]  # as the GT detector: no difficult
        assert len(boxes) == len(truth) > 0
        assert sorted(boxes[BOX].round(3).itertuples(index=False)) == sorted(truth[BOX].round(3).itertuples(
            index=False))
        assert det.box_source_name() == "gt"  # what report.json says it trained on
    assert RelocalizeDetector(**base).box_source_name() == "pseudo (round 0)"


#: the tiny chain (tests/harness.py TINY) and a tiny detector schedule: 2 epochs of 2 iterations per fold
TINY = dict(synth_trainval=8, synth_test=2, synth_image_px=128, ss_splits=["trainval"], ss_shards=1,
            classifier_weights="random", classifier_epochs=1, classifier_input_px=64, classifier_batch_size=16,
            device="cpu", report_images=0, report_worst=0, cam_images_per_part=2, det_weights="random",
            det_image_min_px=96, det_image_max_px=128, det_max_iters=2, relocalize_det_epochs=2,
            relocalize_min_score=0.0)


@pytest.mark.slow
def test_a_killed_round_resumes_to_the_same_boxes(outputs, tmp_path, monkeypatch):
    """Round 1 on 8 synthetic images; then fold 1's detector is removed and re-run, killed after its first epoch,
    and run again: it resumes from its checkpoint (fold 0's detector is reused) and the round's boxes and the
    detector's weights equal the uninterrupted run's. Also: no box was re-localised by a detector that trained on
    its image (from the published files), and PseudoLabels --relocalize-rounds 1 reports the rounds."""
    import luigi
    import torch

    import tasks.detector
    from pipeline.detector import load_checkpoint, train_detector
    from pipeline.export import read_pseudo_labels
    from pipeline.io import read_json
    from tasks.base import invalidate
    from tasks.main import PseudoLabels
    from tasks.relocalize import RelocalizeBoxes

    task = RelocalizeBoxes(data_root=str(tmp_path / "data"), **TINY)
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    boxes = read_pseudo_labels(task.stage_dir / "pseudo_labels.csv")
    fold1 = task.requires()["fold1"]
    weights = load_checkpoint(fold1.stage_dir / "model.pth")["model"]
    # no image re-localised by a detector that trained on it
    folds = task.image_folds(task.manifest())
    assert (boxes.fold.to_numpy() == folds.loc[boxes.image_id].to_numpy()).all()
    for f in (0, 1):
        trained = set(pd.read_csv(task.requires()[f"fold{f}"].stage_dir / "train_boxes.csv", dtype={"image_id": str})
                      .image_id)
        assert trained and trained == set(training_image_ids(folds, f))
        assert not trained & set(boxes.image_id[boxes.fold == f])
    assert boxes.relocalized.any()  # min_score 0: any detection of the click's class around it is a candidate
    report = read_json(task.stage_dir / "relocalize.json")
    assert [r["round"] for r in report["rounds"]] == [0, 1] and report["relocalized"] == len(boxes)
    assert "Re-localisation rounds" in (task.stage_dir / "summary.md").read_text()

    # kill fold 1's detector after its first epoch
    invalidate([fold1.stage_ref])
    assert not task.stage_dir.exists() and not fold1.stage_dir.exists() and task.requires()["fold0"].complete()

    class Killed(RuntimeError):
        pass

    def killed_after_one_epoch(model, dataset, checkpoint, device, nproc=1, max_iters_per_epoch=None, **kw):
        def kill(row):
            raise Killed("killed after epoch 1")
        return train_detector(model, dataset, checkpoint, device, resume=True, max_iters_per_epoch=max_iters_per_epoch,
                              on_epoch=kill, progress=False)

    train = tasks.detector.train_detector_distributed
    monkeypatch.setattr(tasks.detector, "train_detector_distributed", killed_after_one_epoch)
    assert not luigi.build([task], local_scheduler=True, log_level="CRITICAL")
    assert load_checkpoint(fold1.work_dir / "model.pth")["epoch"] == 0 and not fold1.stage_dir.exists()
    monkeypatch.setattr(tasks.detector, "train_detector_distributed", train)  # (not undo(): CLICKSCALE_OUTPUTS)
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    assert len(pd.read_csv(fold1.stage_dir / "train_log.csv")) == 2
    for k, v in load_checkpoint(fold1.stage_dir / "model.pth")["model"].items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0, msg=k)
    pd.testing.assert_frame_equal(read_pseudo_labels(task.stage_dir / "pseudo_labels.csv"), boxes)

    main = PseudoLabels(data_root=str(tmp_path / "data"), relocalize_rounds=1, **TINY)
    assert main.requires().stage_dir == task.stage_dir
    assert luigi.build([main], local_scheduler=True, log_level="WARNING")
    summary = read_json(main.stage_dir / "summary.json")
    assert [r["round"] for r in summary["relocalize_rounds"]] == [0, 1]
    assert "re-localised" in (main.stage_dir / "summary.md").read_text()
