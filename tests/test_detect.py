"""Faster R-CNN (``--det-arch faster_rcnn``: torchvision's RPN on the project's backbones), the ``Detect`` stage on a
folder of new images (COCO results, VOC XML with scores, HTML overlays) and the held-out evaluation split
(``--eval-holdout``)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from xml.etree import ElementTree as ET

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.detector import (DetectionDataset, FastRCNN, FasterRCNN, build_detector, detect, load_checkpoint,
                               load_detector, train_detector)
from test_detector import CLASSES, _dataset, small_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _flatten_tasks(task) -> list:
    from luigi.task import flatten

    out, todo = [], [task]
    while todo:
        t = todo.pop()
        out.append(t)
        todo += flatten(t.requires())
    return out


# --------------------------------------------------------------------------------------------- faster_rcnn
def test_faster_rcnn_architecture_and_config_round_trip():
    cfg = small_cfg(arch="faster_rcnn")
    model = build_detector(CLASSES, cfg)
    assert isinstance(model, FasterRCNN) and type(build_detector(CLASSES, small_cfg())) is FastRCNN
    # one RPN head on the trunk's reduced channels: 5 sizes x 3 aspect ratios per location
    assert model.rpn.head.cls_logits.out_channels == 15 and model.rpn.head.conv[0][0].in_channels == 128
    assert model.rpn._post_nms_top_n == {"training": 2000, "testing": 300}
    # the trunk, pooler and box head are the fast_rcnn ones, built alike from the same seed
    fast = build_detector(CLASSES, small_cfg()).state_dict()
    shared = [k for k in fast if not k.startswith("rpn.")]
    assert all(torch.equal(fast[k], model.state_dict()[k]) for k in shared)
    with pytest.raises(ValueError, match="unknown detector architecture"):
        build_detector(CLASSES, small_cfg(arch="yolo"))
    # checkpoint args written before the field existed read as fast_rcnn
    from pipeline.detector import DetectorConfig

    d = cfg.resolved().to_dict()
    assert DetectorConfig.from_dict(d) == cfg.resolved()
    old = {k: v for k, v in d.items() if k != "arch" and not k.startswith("rpn_")}
    assert DetectorConfig.from_dict(old).arch == "fast_rcnn"


@pytest.mark.slow
def test_faster_rcnn_trains_resumes_and_detects_without_proposals(tmp_path):
    ds, _ = _dataset(tmp_path, [(120, 160), (160, 120), (100, 100)], flip=True)
    ds.proposals = None  # the RPN proposes: the dataset has none
    cfg = small_cfg(arch="faster_rcnn", epochs=2, lr_steps=(1,))
    full = build_detector(CLASSES, cfg)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    log = train_detector(full, ds, tmp_path / "full.pth", progress=False)
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"} <= set(log.columns)
    assert np.isfinite(log.loss).all()
    changed = {k for k in before if not torch.equal(before[k], full.state_dict()[k])}
    assert "rpn.head.cls_logits.weight" in changed and "roi_heads.box_predictor.cls_score.weight" in changed
    # killed after epoch 1 and resumed: the same weights as uninterrupted (engine checkpoint, seeded epochs)
    part = build_detector(CLASSES, replace(cfg, epochs=1))
    train_detector(part, ds, tmp_path / "part.pth", progress=False)
    resumed = build_detector(CLASSES, cfg)
    train_detector(resumed, ds, tmp_path / "part.pth", progress=False)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert load_checkpoint(tmp_path / "full.pth")["args"]["arch"] == "faster_rcnn"
    model = load_detector(tmp_path / "full.pth")
    assert isinstance(model, FasterRCNN)
    model.roi_heads.score_thresh = 0.0
    dets, stats = detect(model, DetectionDataset(ds.images, None, CLASSES), progress=False)
    assert stats["images"] == 3 and len(dets) and set(dets["class"]) <= set(CLASSES)
    assert dets.groupby("image_id").size().max() <= 100 and (dets.x2 > dets.x1).all()


def test_faster_rcnn_task_graph_has_no_selective_search(outputs):
    from tasks.detector import EvaluateVOC07, TrainFastRCNN

    def families(task):
        return {(t.task_family, tuple(getattr(t, "ss_splits", ()))) for t in _flatten_tasks(task)}

    gt = families(EvaluateVOC07(synth_trainval=8, det_arch="faster_rcnn", det_box_source="gt"))
    assert not any(f.startswith("SelectiveSearch") for f, _ in gt)
    # the pseudo boxes need trainval proposals; the test images never do
    pseudo = families(EvaluateVOC07(synth_trainval=8, det_arch="faster_rcnn"))
    assert {s for f, s in pseudo if f == "SelectiveSearch"} == {("trainval",)}
    assert ("SelectiveSearch", ("test",)) in families(EvaluateVOC07(synth_trainval=8))
    # the new parameter is hashed only when set: fast_rcnn detectors keep their directories
    assert "det_arch" not in TrainFastRCNN().significant_params()
    assert TrainFastRCNN(det_arch="faster_rcnn").stage_dir != TrainFastRCNN().stage_dir
    assert TrainFastRCNN(det_arch="faster_rcnn").detector_config().bg_iou_lo == 0.0


# -------------------------------------------------------------------------------------------------- holdout
def test_holdout_split_is_deterministic_and_drops_its_clicks():
    from pipeline.dataset import DatasetError, Manifest, hold_out

    ids = [f"{i:06d}" for i in range(20)]
    images = pd.DataFrame({"image_id": ids + ["t1"], "split": ["trainval"] * 20 + ["test"], "width": 10,
                           "height": 10, "path": "x"})
    objects = pd.DataFrame({"image_id": ids, "object_index": 0, "class": "cat", "x1": 0, "y1": 0, "x2": 5, "y2": 5,
                            "difficult": False, "truncated": False})
    clicks = pd.DataFrame({"click_id": range(20), "image_id": ids, "class": "cat", "x": 2, "y": 2, "annotator": 1,
                           "object_index": 0})
    m = Manifest(images, objects, clicks, ("cat",))
    a, b, c = hold_out(m, 5, 0), hold_out(m, 5, 0), hold_out(m, 5, 1)
    held = set(a.split("holdout").image_id)
    assert len(held) == 5 and held == set(b.split("holdout").image_id) != set(c.split("holdout").image_id)
    assert set(a.split("trainval").image_id) == set(ids) - held and list(a.split("test").image_id) == ["t1"]
    assert not set(a.clicks.image_id) & held and len(a.clicks) == 15 and a.report["holdout"]["clicks_dropped"] == 5
    # reordering the rows does not change the choice
    shuffled = Manifest(images.iloc[::-1], objects, clicks, ("cat",))
    assert set(hold_out(shuffled, 5, 0).split("holdout").image_id) == held
    assert hold_out(m, 0, 0) is m
    with pytest.raises(DatasetError, match="cannot hold out 20 of the 20"):
        hold_out(m, 20, 0)
    with pytest.raises(DatasetError, match="needs ground truth"):
        hold_out(Manifest(images, objects.iloc[:0], clicks, ("cat",)), 5, 0)


def test_eval_holdout_scores_the_holdout_split(outputs):
    from tasks.dataset import PrepareDataset
    from tasks.detector import EvaluateVOC07

    task = EvaluateVOC07(synth_trainval=8, eval_holdout=3)
    assert task.scored_split == "holdout" and task.requires()["test_proposals"].ss_splits == ("holdout",)
    assert "eval_holdout" not in PrepareDataset().significant_params()
    assert PrepareDataset(eval_holdout=3).images_ref != PrepareDataset().images_ref
    with pytest.raises(ValueError, match="--eval-holdout must be >= 0"):
        PrepareDataset(eval_holdout=-1)


# ---------------------------------------------------------------------------------------------------- Detect
def _coco_eval(images_file, results_file, gt_file):
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(str(gt_file))
    dt = gt.loadRes(str(results_file))
    ev = COCOeval_faster(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


@pytest.mark.slow
def test_detect_on_a_folder_writes_coco_voc_and_html(outputs, tmp_path):
    """The chain's tiniest detector (faster_rcnn on the ground truth of 8 synthetic images, random weights, 2 short
    epochs), then ``Detect`` on a folder of 3 test images; and a fast_rcnn checkpoint given by path (its proposals
    computed on the folder)."""
    import luigi

    from pipeline.dataset import Manifest
    from pipeline.export import to_coco
    from tasks.detect import Detect

    chain = dict(data_root=str(tmp_path / "data"), synth_trainval=8, synth_test=4, synth_image_px=192,
                 det_arch="faster_rcnn", det_box_source="gt", det_weights="random", det_epochs=2, det_max_iters=2,
                 det_image_min_px=160, det_image_max_px=256, device="cpu")
    folder = tmp_path / "new_images"
    # the folder: three test images of the synthetic set (built by the dataset stage)
    from tasks.dataset import PrepareDataset

    prep = PrepareDataset(**{k: v for k, v in chain.items() if k in PrepareDataset.get_param_names()})
    assert luigi.build([prep], local_scheduler=True, log_level="WARNING")
    manifest = Manifest.load(prep.stage_dir)
    test = manifest.split("test").head(3)
    (folder / "sub").mkdir(parents=True)
    for k, r in enumerate(test.itertuples()):
        shutil.copy(r.path, folder / ("sub" if k == 2 else "") / f"{r.image_id}.jpg")
    ids = [str(i) for i in test.image_id[:2]] + [f"sub/{test.image_id.iloc[2]}"]

    task = Detect(detect_images=str(folder), detect_score_min=0.0, detect_report_images=2, **chain)
    assert "detector" in task.requires()  # no model given: the chain's TrainFastRCNN
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    out = task.stage_dir
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 3 and report["arch"] == "faster_rcnn" and report["images_per_s"] > 0
    assert report["proposal_seconds"] == 0.0
    results = json.loads((out / "coco_results.json").read_text())
    images_file = json.loads((out / "coco_images.json").read_text())
    assert len(results) == report["detections"] > 0
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert sorted(i["image_key"] for i in images_file["images"]) == sorted(ids)
    assert [c["name"] for c in images_file["categories"]] == list(manifest.classes)
    # the COCO results agree with detections.csv (bbox = x1, y1, w, h)
    dets = pd.read_csv(out / "detections.csv", dtype={"image_id": str})
    key = {i["id"]: i["image_key"] for i in images_file["images"]}
    first = results[0]
    row = dets[(dets.image_id == key[first["image_id"]]) & (dets.score.round(6) == first["score"])].iloc[0]
    assert first["bbox"] == pytest.approx([row.x1, row.y1, row.x2 - row.x1, row.y2 - row.y1], abs=1e-3)
    # COCOeval (faster-coco-eval) runs against a ground-truth file of the same images
    objs = manifest.objects.assign(image_id=lambda d: d.image_id.map(
        {str(i): j for i, j in zip(test.image_id, ids)}))
    objs = objs.dropna(subset=["image_id"])
    gt_images = pd.DataFrame([{"image_id": i["image_key"], "width": i["width"], "height": i["height"]}
                              for i in sorted(images_file["images"], key=lambda i: i["id"])])
    gt = to_coco(objs, gt_images, manifest.classes)
    assert [i["id"] for i in gt["images"]] == sorted(key)  # the same numbering as the results'
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    stats = _coco_eval(out / "coco_images.json", out / "coco_results.json", tmp_path / "gt.json")
    assert len(stats) >= 12 and -1.0 <= stats[0] <= 1.0
    # one VOC file per image, naming it, with scores
    for image_id, r in zip(ids, test.itertuples()):
        root = ET.parse(out / "Annotations" / f"{image_id}.xml").getroot()
        assert root.findtext("filename") == f"{r.image_id}.jpg"
        scores = [float(o.findtext("score")) for o in root.iter("object")]
        assert len(scores) == (dets.image_id == image_id).sum() and all(0 <= s <= 1 for s in scores)
    page = (out / "index.html").read_text()
    assert all(i in page for i in ids) and page.count("<img") == 2  # overlays for the first 2 only
    assert len(list((out / "overlays").glob("*.png"))) == 2

    # a fast_rcnn checkpoint by path: selective search runs on the folder's images
    ds, _ = _dataset(tmp_path, [(120, 160), (160, 120)])
    fast = build_detector(manifest.classes, small_cfg(epochs=1))
    ds.classes = manifest.classes
    train_detector(fast, DetectionDataset(ds.images, ds.proposals, manifest.classes,
                                          pd.DataFrame({"image_id": ["im0"], "class": [manifest.classes[0]],
                                                        "x1": [10.0], "y1": [10.0], "x2": [80.0], "y2": [90.0]})),
                   tmp_path / "fast" / "model.pth", progress=False)
    by_path = Detect(detect_images=str(folder), detect_model=str(tmp_path / "fast"), detect_score_min=0.0,
                     **chain)
    assert by_path.requires() == {}
    assert luigi.build([by_path], local_scheduler=True, log_level="WARNING")
    r2 = json.loads((by_path.stage_dir / "report.json").read_text())
    assert r2["arch"] == "fast_rcnn" and r2["proposal_seconds"] > 0 and r2["images"] == 3
    assert r2["model"] == str((tmp_path / "fast" / "model.pth").resolve())


@pytest.mark.slow
def test_evaluate_on_held_out_images_with_a_faster_rcnn(outputs, tmp_path):
    """EvaluateVOC07 --eval-holdout 3 --det-arch faster_rcnn --eval-train-map on 10 synthetic trainval images: the
    ground-truth detector trains on the other 7, is scored on the 3 (and on its own 7), no selective search runs."""
    import luigi

    from pipeline.dataset import Manifest
    from tasks.detector import EvaluateVOC07

    task = EvaluateVOC07(data_root=str(tmp_path / "data"), synth_trainval=10, synth_test=2, synth_image_px=160,
                         eval_holdout=3, det_arch="faster_rcnn", det_box_source="gt", det_weights="random",
                         det_epochs=1, det_max_iters=2, det_image_min_px=128, det_image_max_px=192,
                         eval_train_map=True, device="cpu")
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    assert not (outputs / "SelectiveSearch").exists()
    manifest = Manifest.load(task.find_upstream("PrepareDataset").stage_dir)
    held = set(manifest.split("holdout").image_id)
    assert len(held) == 3 and not held & set(manifest.clicks.image_id)
    trained = set(pd.read_csv(task.requires()["detector"].stage_dir / "train_boxes.csv", dtype={"image_id": str})
                  .image_id)
    assert trained and not trained & held and trained <= set(manifest.split("trainval").image_id)
    m = json.loads((task.stage_dir / "metrics.json").read_text())
    assert m["split"] == "holdout" and m["test_images"] == 3 and 0 <= m["mAP"] <= 1
    assert m["train_images"]["test_images"] == len(trained) and 0 <= m["train_images"]["mAP"] <= 1
    assert "training images" in (task.stage_dir / "summary.md").read_text()
    dets = pd.read_csv(task.stage_dir / "detections_test.csv", dtype={"image_id": str})
    assert set(dets.image_id) <= held


@pytest.mark.slow
def test_detect_on_the_real_test_images(outputs, tmp_path, sample_root):
    """``Detect`` on a folder holding voc07-sample's 18 real test images (links), with a faster_rcnn checkpoint of
    VOC's 20 classes (random weights, one training step on two real images: the files' contract, not quality): one
    XML per image, COCO results that faster-coco-eval scores against the images' VOC ground truth."""
    import luigi

    from pipeline.export import to_coco
    from pipeline.voc import VOC_CLASSES, load_voc
    from tasks.detect import Detect

    voc = sample_root / "VOC2007"
    images, objects = load_voc(voc, ("trainval", "test"), VOC_CLASSES)
    test = images[images.split == "test"]
    folder = tmp_path / "test_images"
    folder.mkdir()
    for r in test.itertuples():
        (folder / f"{r.image_id}.jpg").symlink_to(r.path)
    train = images[images.split == "trainval"].head(2)
    boxes = objects[objects.image_id.isin(set(train.image_id))]
    model = build_detector(VOC_CLASSES, small_cfg(arch="faster_rcnn", epochs=1))
    train_detector(model, DetectionDataset(train, None, VOC_CLASSES, boxes), tmp_path / "m" / "model.pth",
                   max_iters_per_epoch=1, progress=False)
    task = Detect(detect_images=str(folder), detect_model=str(tmp_path / "m" / "model.pth"), detect_score_min=0.0,
                  detect_report_images=3, device="cpu")
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    out = task.stage_dir
    assert sorted(p.stem for p in (out / "Annotations").glob("*.xml")) == sorted(test.image_id)
    images_file = json.loads((out / "coco_images.json").read_text())
    id_of = {i["image_key"]: i["id"] for i in images_file["images"]}
    assert set(id_of) == set(test.image_id) and len(json.loads((out / "coco_results.json").read_text())) > 0
    gt_images = pd.DataFrame(sorted(({"image_id": i["image_key"], "width": i["width"], "height": i["height"]}
                                     for i in images_file["images"]), key=lambda d: id_of[d["image_id"]]))
    gt = to_coco(objects[objects.image_id.isin(set(test.image_id))], gt_images, VOC_CLASSES)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    stats = _coco_eval(out / "coco_images.json", out / "coco_results.json", tmp_path / "gt.json")
    assert len(stats) >= 12 and 0.0 <= stats[1] <= 1.0  # AP at IoU 0.5 of an untrained detector: low, but scored
    page = (out / "index.html").read_text()
    assert all(i in page for i in test.image_id)
