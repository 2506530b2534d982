"""Fast R-CNN parts: proposal scaling, Fast R-CNN fg/bg assignment, a real-shape training step, checkpoints and
resume, detection output, box sources."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.detector import (DetectionDataset, DetectorConfig, DetectorError, FastRCNNRoIHeads, build_detector,
                               detect, dilate_to_stride, flip_boxes, load_checkpoint, load_detector,
                               load_training_boxes, preset, strip_checkpoint, top_detections,
                               train_detector)

CLASSES = ("cat", "dog", "cow")
BOX = ["x1", "y1", "x2", "y2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def small_cfg(**kw) -> DetectorConfig:
    """efficientnet_lite0 with random weights at a small scale: the real architecture, fast enough for tests."""
    base = dict(weights="random", min_size=160, max_size=256, epochs=2, lr_steps=(1,), lr=1e-3, warmup_iters=0)
    base.update(kw)
    return preset("cpu", **base)


def random_proposals(rng, w, h, n):
    x = np.sort(rng.uniform(0, w, (n, 2)), 1)
    y = np.sort(rng.uniform(0, h, (n, 2)), 1)
    b = np.stack([x[:, 0], y[:, 0], x[:, 1] + 8, y[:, 1] + 8], 1)
    b[:, 2] = np.minimum(b[:, 2], w)
    b[:, 3] = np.minimum(b[:, 3], h)
    return b.astype(np.float32)


# ------------------------------------------------------------------------------------------ proposal scaling
@pytest.mark.parametrize("size", [(375, 500), (500, 333), (200, 1200)])  # (H, W); the last hits max_size
def test_proposal_equal_to_gt_box_stays_equal_after_resize(size):
    model = build_detector(CLASSES, preset("paper", backbone="efficientnet_lite0", weights="random"))
    h, w = size
    gt = torch.tensor([[17.0, 33.0, 211.5, 180.25], [0.0, 0.0, float(w), float(h)]])
    props = torch.cat([gt, torch.tensor([[5.0, 6.0, 50.0, 70.0]])])
    images, targets = model.transform([torch.rand(3, h, w)], [{"boxes": gt.clone(), "labels": torch.tensor([1, 2])}])
    scaled, _ = model.rpn(images, [props], [(h, w)])
    new_h, new_w = images.image_sizes[0]
    assert min(new_h, new_w) == 600 or max(new_h, new_w) == 1000  # the images were really resized
    assert torch.equal(scaled[0][:2], targets[0]["boxes"])  # bit-identical to the resized GT boxes
    f = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h])
    torch.testing.assert_close(scaled[0][2], torch.tensor([5.0, 6.0, 50.0, 70.0]) * f)


def test_external_proposals_thin_evenly_clip_and_drop_tiny():
    model = build_detector(CLASSES, small_cfg(max_proposals=4, min_proposal_size=2.0))
    images, _ = model.transform([torch.rand(3, 100, 100)])  # -> 160 x 160, factor 1.6
    props = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [2, 2, 12, 12], [3, 3, 13, 13], [4, 4, 14, 14],
                          [5, 5, 15, 15], [6, 6, 16, 16]], dtype=torch.float32)
    out, _ = model.rpn(images, [props], [(100, 100)])
    # 7 -> 4 evenly spaced (0, 2, 4, 6), not the first 4 (stores are sorted by coordinates)
    torch.testing.assert_close(out[0], props[[0, 2, 4, 6]] * 1.6)
    out, _ = model.rpn(images, [torch.tensor([[90.0, 90.0, 130.0, 120.0], [50.0, 50.0, 50.5, 60.0]])],
                       [(100, 100)])
    torch.testing.assert_close(out[0], torch.tensor([[144.0, 144.0, 160.0, 160.0]]))  # clipped; tiny one dropped


def test_flip_is_consistent_for_image_boxes_and_proposals(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    path = tmp_path / "a.jpg"
    cv2.imwrite(str(path), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])
    box = np.array([[5.0, 4.0, 25.0, 30.0]], np.float32)
    images = pd.DataFrame({"image_id": ["a"], "path": [str(path)], "width": [60], "height": [40]})
    boxes = pd.DataFrame({"image_id": ["a"], "class": ["dog"], "x1": [5.0], "y1": [4.0], "x2": [25.0], "y2": [30.0]})
    ds = DetectionDataset(images, {"a": box.copy()}, CLASSES, boxes, flip=True, seed=0)
    epochs = {e: (ds.set_epoch(e), ds.flipped(0))[1] for e in range(12)}
    assert set(epochs.values()) == {True, False}  # flips happen, not always
    e_flip = next(e for e, f in epochs.items() if f)
    ds.set_epoch(e_flip)
    im, props, target, _ = ds[0]
    np.testing.assert_array_equal(props.numpy(), [[35.0, 4.0, 55.0, 30.0]])  # x -> 60 - x, swapped
    assert torch.equal(target["boxes"], props) and target["labels"].tolist() == [2]
    plain = DetectionDataset(images, {"a": box}, CLASSES, boxes)[0][0]
    assert torch.equal(im, plain.flip(-1))
    np.testing.assert_array_equal(flip_boxes(flip_boxes(box, 60), 60), box)


# --------------------------------------------------------------------------------------------- fg/bg sampling
def test_fast_rcnn_background_range():
    model = build_detector(CLASSES, small_cfg())
    heads: FastRCNNRoIHeads = model.roi_heads
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    props = torch.tensor([
        [0.0, 0.0, 100.0, 60.0],    # IoU 0.6  -> foreground (class 3)
        [0.0, 0.0, 100.0, 50.0],    # IoU 0.5  -> foreground (>=)
        [0.0, 0.0, 100.0, 30.0],    # IoU 0.3  -> background
        [0.0, 0.0, 100.0, 10.0],    # IoU 0.1  -> background (>= 0.1)
        [0.0, 0.0, 100.0, 5.0],     # IoU 0.05 -> not sampled (torchvision would call it background)
        [200.0, 200.0, 300.0, 300.0],  # IoU 0 -> not sampled
    ])
    _, labels = heads.assign_targets_to_proposals([props], [gt], [torch.tensor([3])])
    assert labels[0].tolist() == [3, 3, 0, 0, -1, -1]
    # with the torchvision range (bg_iou_lo = 0) the last two are background
    model0 = build_detector(CLASSES, small_cfg(bg_iou_lo=0.0))
    _, labels0 = model0.roi_heads.assign_targets_to_proposals([props], [gt], [torch.tensor([3])])
    assert labels0[0].tolist() == [3, 3, 0, 0, 0, 0]


def test_config_resolution_and_errors():
    cfg = DetectorConfig().resolved()
    assert (cfg.backbone, cfg.trunk_layer, cfg.pooler, cfg.min_size, cfg.max_size, cfg.rois_per_image,
            cfg.images_per_batch, cfg.fg_fraction, cfg.nms_thresh, cfg.detections_per_img) == \
        ("vgg16", "conv5_3", "roi_pool", 600, 1000, 64, 2, 0.25, 0.3, 100)
    assert preset("cpu").resolved().pooler == "roi_align"
    assert DetectorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="bg_iou_lo"):
        DetectorConfig(bg_iou_lo=0.6).resolved()
    with pytest.raises(ValueError, match="unknown backbone"):
        DetectorConfig(backbone="resnet").resolved()


def test_freeze_through_freezes_the_trunk_up_to_that_layer_and_round_trips():
    """``freeze_through`` (``--det-freeze-through``): trunk layers up to and including it have no gradient, later
    ones do; the backbone's default is left out of the checkpoint args (those of checkpoints written before the
    field existed), and args without it read back as the default."""
    def trainable(model, layer):
        # (conv weights: BatchNorm's affine parameters are frozen everywhere)
        return {p.requires_grad for p in model.backbone.body._modules[layer].parameters() if p.ndim > 1}

    default = build_detector(CLASSES, preset("cpu", weights="random"))
    assert default.config.freeze_through == "stage1"
    assert trainable(default, "stage1") == {False} and trainable(default, "stage2") == {True}
    late = build_detector(CLASSES, preset("cpu", weights="random", freeze_through="stage5"))
    assert trainable(late, "stage5") == {False} and trainable(late, "stage6") == {True}
    assert trainable(late, "reduce") == {True}
    assert "freeze_through" not in default.config.to_dict()
    assert late.config.to_dict()["freeze_through"] == "stage5"
    for cfg in (default.config, late.config):
        assert DetectorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="cannot freeze through 'conv9'"):
        build_detector(CLASSES, preset("cpu", weights="random", freeze_through="conv9"))


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite2"])
def test_efficientnet_trunk_is_dilated_to_stride_16(backbone):
    model = build_detector(CLASSES, small_cfg(backbone=backbone))
    assert model.backbone.stride == 16
    feats = model.backbone(torch.rand(1, 3, 160, 224))["0"]
    assert feats.shape == (1, 128, 10, 14)
    # the pure function on a toy stack: two stride-2 convs, target 2 -> second becomes stride 1, later dilated
    stack = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, 2, 1), torch.nn.Conv2d(1, 1, 3, 2, 1),
                                torch.nn.Conv2d(1, 1, 5, 1, 2))
    assert dilate_to_stride(stack, 4, 2) == 2
    assert stack[1].stride == (1, 1) and stack[2].dilation == (2, 2) and stack[2].padding == (4, 4)
    assert stack(torch.rand(1, 1, 16, 16)).shape == (1, 1, 8, 8)


@pytest.mark.slow
def test_vgg16_paper_architecture():
    """The paper's Fast R-CNN: RoI max pooling 7x7 on relu5_3 (stride 16), fc6/fc7 of VGG16's classifier (with its
    dropout) as the box head, conv1-2 frozen; one small training step moves conv3+ and the heads only."""
    from torchvision.ops import RoIPool

    model = build_detector(CLASSES, preset("paper", weights="random", min_size=96, max_size=128))
    body = model.backbone.body
    assert list(body._modules)[-2:] == ["conv5_3", "relu5_3"] and model.backbone.stride == 16
    pool = model.roi_heads.box_roi_pool
    assert pool.output_size == (7, 7) and pool.spatial_scale == 1 / 16
    feats = torch.rand(1, 512, 6, 8)
    rois = [torch.tensor([[0.0, 0.0, 64.0, 48.0], [16.0, 8.0, 100.0, 90.0]])]
    torch.testing.assert_close(pool({"0": feats}, rois, [(96, 128)]), RoIPool(7, 1 / 16)(feats, [rois[0]]))
    head = model.roi_heads.box_head
    assert (head.fc6.in_features, head.fc6.out_features, head.fc7.out_features) == (512 * 7 * 7, 4096, 4096)
    assert isinstance(head.drop6, torch.nn.Dropout) and model.roi_heads.box_predictor.cls_score.in_features == 4096
    frozen = {n.split(".")[2] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1_1", "conv1_2", "conv2_1", "conv2_2"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    gt = {"boxes": torch.tensor([[10.0, 10.0, 70.0, 60.0]]), "labels": torch.tensor([2])}
    losses = model([torch.rand(3, 96, 128)], [torch.tensor([[8.0, 8.0, 72.0, 64.0], [0.0, 0.0, 50.0, 40.0]])], [gt])
    sum(losses.values()).backward()
    opt.step()
    changed = {k.split(".")[2] for k, v in model.state_dict().items() if k.startswith("backbone")
               and not torch.equal(v, before[k])}
    assert "conv1_1" not in changed and "conv2_2" not in changed and {"conv3_1", "conv5_3"} <= changed


# ------------------------------------------------------------------------------------------------- training
def _image_dir(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for k, (h, w) in enumerate(sizes):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        p = tmp_path / f"im{k}.jpg"
        cv2.imwrite(str(p), img)
        rows.append((f"im{k}", str(p), w, h))
    return pd.DataFrame(rows, columns=["image_id", "path", "width", "height"])


def _dataset(tmp_path, sizes, flip=False):
    rng = np.random.default_rng(1)
    images = _image_dir(tmp_path, sizes)
    boxes, props = [], {}
    for r in images.itertuples():
        b = random_proposals(rng, r.width, r.height, 3)
        for k, bb in enumerate(b):
            boxes.append((r.image_id, CLASSES[k % 3], *bb))
        props[r.image_id] = np.concatenate([random_proposals(rng, r.width, r.height, 1000), b + 3])
    boxes = pd.DataFrame(boxes, columns=["image_id", "class", "x1", "y1", "x2", "y2"])
    return DetectionDataset(images, props, CLASSES, boxes, flip=flip, seed=0), boxes


@pytest.mark.slow
def test_one_training_iteration_with_real_shapes(tmp_path):
    """The CPU preset at its real scale (384 px shorter side), two VOC-sized images, 1000 proposals each."""
    ds, _ = _dataset(tmp_path, [(375, 500), (500, 375)], flip=True)
    cfg = preset("cpu", weights="random", epochs=1)
    model = build_detector(CLASSES, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = train_detector(model, ds, tmp_path / "ckpt.pth", max_iters_per_epoch=1, progress=False)
    assert len(log) == 1 and log.iterations[0] == 1 and np.isfinite(log.loss[0])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "roi_heads.box_predictor.cls_score.weight" in changed
    assert "roi_heads.box_head.fc6.weight" in changed
    assert any(k.startswith("backbone.body.stage6") and k.endswith("conv_pw.weight") for k in changed)
    # BatchNorm is frozen: neither running statistics nor affine parameters moved
    assert not any(("bn" in k or k.startswith("backbone.body.stem.1")) for k in changed)
    ckpt = load_checkpoint(tmp_path / "ckpt.pth")
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args", "classes"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and ckpt["args"]["min_size"] == 384 and ckpt["classes"] == list(CLASSES)


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_detect(tmp_path):
    ds, boxes = _dataset(tmp_path, [(120, 160), (160, 120), (100, 100)], flip=True)
    cfg = small_cfg(epochs=2, lr_steps=(1,))
    full = build_detector(CLASSES, cfg)
    train_detector(full, ds, tmp_path / "full.pth", progress=False)
    part = build_detector(CLASSES, replace(cfg, epochs=1))
    train_detector(part, ds, tmp_path / "part.pth", progress=False)  # "killed" after epoch 1
    resumed = build_detector(CLASSES, cfg)
    log = train_detector(resumed, ds, tmp_path / "part.pth", progress=False)  # continues with epoch 2
    assert list(log.epoch) == [1, 2] and log.lr.tolist() == pytest.approx([1e-3, 1e-4])
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # a finished run returns at once, also from a stripped checkpoint; a longer schedule cannot continue that one
    strip_checkpoint(tmp_path / "part.pth")
    again = train_detector(resumed, ds, tmp_path / "part.pth", progress=False)
    assert len(again) == 2
    with pytest.raises(DetectorError, match="holds no optimizer state"):
        train_detector(build_detector(CLASSES, replace(cfg, epochs=3)), ds, tmp_path / "part.pth", progress=False)
    # the checkpoint reloads into an identical detector; detections keep the contract
    model = load_detector(tmp_path / "full.pth")
    test_ds = DetectionDataset(ds.images, ds.proposals, CLASSES)
    model.roi_heads.score_thresh = 0.0  # an untrained model: keep every detection to check the output
    dets, stats = detect(model, test_ds, progress=False)
    assert stats["images"] == 3 and stats["fps"] > 0
    assert list(dets.columns) == ["image_id", "class", "score", "x1", "y1", "x2", "y2"]
    assert dets.groupby("image_id").size().max() <= 100 and set(dets["class"]) <= set(CLASSES)
    size = ds.images.set_index("image_id")
    assert (dets.x2 <= dets.image_id.map(size.width) + 1e-3).all() and (dets.x1 >= 0).all()
    assert (dets.x2 > dets.x1).all() and (dets.y2 > dets.y1).all()
    top = top_detections(dets)
    assert not top.duplicated(["image_id", "class"]).any()
    best = dets.groupby(["image_id", "class"]).score.max()
    assert len(dets) > len(top) and len(top) == len(best)
    assert (top.set_index(["image_id", "class"]).score.sort_index() == best.sort_index()).all()


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    ds, _ = _dataset(tmp_path, [(120, 160), (160, 120)])
    model = build_detector(CLASSES, small_cfg(epochs=2))
    train_detector(model, ds, tmp_path / "c.pth", progress=False, max_iters_per_epoch=1)
    saved = (tmp_path / "c.pth").read_bytes()
    model2 = build_detector(CLASSES, small_cfg(epochs=3))
    with torch.no_grad():
        model2.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    model2.load_state_dict = lambda *a, **k: None  # keep the NaN weights when resuming
    with pytest.raises(DetectorError, match=r"non-finite detector loss .* epoch 3"):
        train_detector(model2, ds, tmp_path / "c.pth", progress=False, max_iters_per_epoch=1)
    assert (tmp_path / "c.pth").read_bytes() == saved


def test_non_finite_weights_after_an_epoch_keep_the_last_good_checkpoint(tmp_path):
    """The loss of the epoch's last iteration is finite but its step makes a weight infinite: the epoch-end check
    stops training before the checkpoint is overwritten."""
    ds, _ = _dataset(tmp_path, [(120, 160), (160, 120)])
    train_detector(build_detector(CLASSES, small_cfg(epochs=1)), ds, tmp_path / "c.pth", progress=False,
                   max_iters_per_epoch=1)
    saved = (tmp_path / "c.pth").read_bytes()
    model = build_detector(CLASSES, small_cfg(epochs=2))
    model.roi_heads.box_predictor.cls_score.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(DetectorError, match=r"non-finite detector weights after epoch 2 .*cls_score.weight"):
        train_detector(model, ds, tmp_path / "c.pth", progress=False, max_iters_per_epoch=1)
    assert (tmp_path / "c.pth").read_bytes() == saved
    assert load_checkpoint(tmp_path / "c.pth")["epoch"] == 0


@pytest.mark.slow
def test_detect_per_class_nms_cap_and_top_box_per_class(tmp_path):
    """Test-time output of an (untrained) detector: boxes of one class overlap by at most the NMS IoU 0.3, the
    per-image cap keeps the highest scores, and ``top_per_class`` returns for every class the maximum softmax score
    over all proposals, computed here directly from the model's modules."""
    from torchvision.ops import box_iou

    ds, _ = _dataset(tmp_path, [(120, 160), (160, 120)])
    model = build_detector(CLASSES, small_cfg()).eval()
    test_ds = DetectionDataset(ds.images, ds.proposals, CLASSES)
    model.roi_heads.score_thresh = 0.0
    dets, _ = detect(model, test_ds, progress=False)
    assert len(dets) > 10
    for _, g in dets.groupby(["image_id", "class"]):
        iou = box_iou(torch.tensor(g[BOX].to_numpy()), torch.tensor(g[BOX].to_numpy()))
        assert (iou.fill_diagonal_(0) <= 0.3 + 1e-5).all()
    model.roi_heads.detections_per_img = 5
    capped, _ = detect(model, test_ds, progress=False)
    for image_id, g in capped.groupby("image_id"):
        assert len(g) == 5
        expected = np.sort(dets[dets.image_id == image_id].score.to_numpy())[::-1][:5]
        np.testing.assert_allclose(np.sort(g.score.to_numpy())[::-1], expected, rtol=1e-6)
    # top box per class: independent computation of the best score of each class over every proposal
    model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.3, 100
    top, _ = detect(model, test_ds, progress=False, top_per_class=True)
    assert (model.roi_heads.score_thresh, model.roi_heads.detections_per_img) == (0.3, 100)  # restored
    thresholded, _ = detect(model, test_ds, progress=False)
    assert len(top) == len(test_ds) * len(CLASSES) and not top.duplicated(["image_id", "class"]).any()
    with torch.no_grad():
        for i in range(len(test_ds)):
            img, props, _, image_id = test_ds[i]
            images, _ = model.transform([img])
            feats = model.backbone(images.tensors)
            scaled, _ = model.rpn(images, [props], [tuple(img.shape[-2:])])
            x = model.roi_heads.box_head(model.roi_heads.box_roi_pool(feats, scaled, images.image_sizes))
            probs = torch.softmax(model.roi_heads.box_predictor(x)[0], -1)[:, 1:].max(0).values.numpy()
            got = top[top.image_id == image_id].set_index("class").score.reindex(CLASSES).to_numpy()
            np.testing.assert_allclose(got, probs, rtol=1e-4)
    # with the 0.3 threshold some (image, class) pairs have no detection at all; top_per_class still has them
    assert len(thresholded.drop_duplicates(["image_id", "class"])) < len(top)


# ---------------------------------------------------------------------------------------------- box sources
def test_training_box_sources_agree(tmp_path):
    from pipeline.export import write_coco, write_pseudo_labels, write_voc_annotations

    images = pd.DataFrame({"image_id": ["a", "b"], "width": [100, 80], "height": [60, 90]})
    objects = pd.DataFrame({"image_id": ["a", "a", "b"], "object_index": [0, 1, 0], "class": ["cat", "dog", "cow"],
                            "x1": [0.0, 10.0, 5.0], "y1": [0.0, 20.0, 5.0], "x2": [50.0, 90.0, 80.0],
                            "y2": [60.0, 40.0, 70.0], "difficult": [False, True, False],
                            "truncated": [False] * 3})
    gt = load_training_boxes("gt", objects=objects, classes=CLASSES, images=images)
    assert gt[["image_id", "class"]].values.tolist() == [["a", "cat"], ["b", "cow"]]  # difficult left out
    easy = objects[~objects.difficult]
    write_pseudo_labels(easy.assign(score=1.0), tmp_path / "pl.csv")
    write_voc_annotations(easy, images, tmp_path / "Annotations")
    write_coco(tmp_path / "c.json", easy, images, CLASSES)
    for source, path in (("pseudo", tmp_path / "pl.csv"), ("voc_dir", tmp_path / "Annotations"),
                         ("coco", tmp_path / "c.json")):
        got = load_training_boxes(source, path=path, image_ids=["a", "b"], classes=CLASSES, images=images)
        pd.testing.assert_frame_equal(got.sort_values(["image_id", "class"]).reset_index(drop=True), gt,
                                      check_dtype=False)
    only_a = load_training_boxes("pseudo", path=tmp_path / "pl.csv", image_ids=["a"])
    assert list(only_a.image_id) == ["a"]
    bad = images.assign(width=[40, 80])  # the cat box (x2 = 50) now lies outside a 40 px wide image
    with pytest.raises(DetectorError, match=r"outside its 40x60 image"):
        load_training_boxes("gt", objects=objects, images=bad)
    with pytest.raises(DetectorError, match="unknown classes"):
        load_training_boxes("gt", objects=objects, classes=("cat", "dog"))
    with pytest.raises(FileNotFoundError, match="annotation folder not found"):
        load_training_boxes("voc_dir", path=tmp_path / "nope")


# ------------------------------------------------------------------------------------------ luigi stages
@pytest.mark.slow
def test_evaluate_voc07_end_to_end_on_tiny_synthetic_data(outputs, tmp_path):
    """PrepareDataset -> SelectiveSearch -> TrainFastRCNN (ground-truth boxes) -> EvaluateVOC07 on 8 + 4
    synthetic images; checks the outputs agree with each other and with the manifest."""
    import luigi

    from pipeline.dataset import Manifest
    from pipeline.io import read_json
    from pipeline.voc_eval import evaluate_detections, read_voc_results_dir
    from tasks.detector import EvaluateVOC07, TrainFastRCNN

    params = dict(data_root=str(tmp_path / "data"), synth_trainval=8, synth_test=4, synth_image_px=192, ss_shards=1,
                  det_box_source="gt", det_weights="random", det_epochs=2, det_max_iters=2, det_image_min_px=160,
                  det_image_max_px=256)
    # the ground-truth detector does not depend on pseudo-label parameters; the pseudo one does
    assert TrainFastRCNN(**params).stage_dir == TrainFastRCNN(**params, box_symmetry="min").stage_dir
    p = {**params, "det_box_source": "pseudo"}
    assert TrainFastRCNN(**p).stage_dir != TrainFastRCNN(**p, box_symmetry="min").stage_dir
    task = EvaluateVOC07(**params)
    # the pseudo boxes' chain computes trainval proposals only; evaluation adds the test split's
    assert task.requires()["test_proposals"].ss_splits == ("test",)
    assert task.requires()["detector"].requires()["proposals"].ss_splits == ("trainval",)
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    out = task.stage_dir
    manifest = Manifest.load(task.find_upstream("PrepareDataset").stage_dir)
    metrics = read_json(out / "metrics.json")
    table = pd.read_csv(out / "ap_per_class.csv")
    assert list(table["class"]) == list(manifest.classes)
    test_ids = set(manifest.split("test").image_id)
    objs = manifest.objects[manifest.objects.image_id.isin(test_ids) & ~manifest.objects.difficult.astype(bool)]
    assert table.set_index("class").n_gt.to_dict() == {c: int((objs["class"] == c).sum()) for c in manifest.classes}
    assert 0.0 <= metrics["mAP"] <= 1.0 and metrics["test_images"] == 4
    assert metrics["training"]["box_source"] == "gt" and metrics["test"]["fps"] > 0
    # the devkit result files hold the same detections and score the same mAP
    dets = pd.read_csv(out / "detections_test.csv", dtype={"image_id": str})
    back = read_voc_results_dir(out / "results", manifest.classes)
    assert len(back) == len(dets)
    _, m2 = evaluate_detections(back, manifest.objects, manifest.classes, image_ids=test_ids)
    assert m2 == pytest.approx(metrics["mAP"], abs=1e-3)
    assert (out / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "mAP" in (out / "summary.md").read_text()
    assert 0.0 <= metrics["corloc"] <= 1.0 and (out / "corloc_per_class.csv").is_file()
    train_dir = task.requires()["detector"].stage_dir
    assert len(pd.read_csv(train_dir / "train_log.csv")) == 2
    assert "optimizer" not in load_checkpoint(train_dir / "model.pth")  # stripped when finished


def test_compare_detectors_builds_the_six_variants(outputs):
    from tasks.detector import CompareDetectors

    reqs = CompareDetectors(synth_trainval=8).requires()
    assert list(reqs) == ["pseudo_sacam", "pseudo_gradcam", "pseudo_image_labels", "pseudo_gmp", "pseudo_spam",
                          "ground_truth"]
    got = {k: (t.det_box_source, t.cam_method, t.classifier_mode, t.cam_network, t.synth_trainval)
           for k, t in reqs.items()}
    assert got == {"pseudo_sacam": ("pseudo", "sacam", "crops", "spam", 8),
                   "pseudo_gradcam": ("pseudo", "gradcam", "crops", "spam", 8),
                   "pseudo_image_labels": ("pseudo", "sacam", "image_labels", "spam", 8),
                   "pseudo_gmp": ("image_extent", "sacam", "crops", "gmp", 8),
                   "pseudo_spam": ("image_extent", "sacam", "crops", "spam", 8),
                   "ground_truth": ("gt", "sacam", "crops", "spam", 8)}
    assert len({t.stage_dir for t in reqs.values()}) == 6
    extent = {k: reqs[k].requires()["detector"].requires()["pseudo"] for k in ("pseudo_gmp", "pseudo_spam")}
    assert {k: t.task_family for k, t in extent.items()} == {"pseudo_gmp": "ImageExtentBoxes",
                                                             "pseudo_spam": "ImageExtentBoxes"}
    assert extent["pseudo_gmp"].requires()["classifier"].classifier_image_pooling == "gmp"
    # the pseudo detectors train on different pseudo-label stages; the GT one ignores CAM parameters
    trains = {k: t.requires()["detector"] for k, t in reqs.items()}
    assert trains["pseudo_sacam"].requires()["pseudo"].stage_dir != trains["pseudo_gradcam"].requires()["pseudo"].stage_dir
    gt_other = CompareDetectors(synth_trainval=8, cam_method="gradcam").requires()["ground_truth"]
    assert gt_other.stage_dir == reqs["ground_truth"].stage_dir


# ------------------------------------------------------------------------------------------------------- DDP
def test_rank_batches_split_every_global_batch():
    """The detector's batches (never drop_last) through the one rank sampler, pipeline.distributed's."""
    from pipeline.distributed import RankBatchSampler

    r0, r1 = (list(RankBatchSampler(list(range(7)), 3, False, r, 2)) for r in range(2))
    # the last batch (1 image < 2 processes) joins the one before it; pieces are contiguous, near-equal
    assert r0 == [[0, 1], [3, 4]] and r1 == [[2], [5, 6]]
    assert list(RankBatchSampler([0, 1, 2, 3], 2, False, 1, 2)) == [[1], [3]]


def test_fewer_images_than_processes_is_a_clear_error(tmp_path, monkeypatch):
    from pipeline import distributed as D

    ds, _ = _dataset(tmp_path, [(120, 160)])
    monkeypatch.setattr(D, "world_size", lambda: 2)
    with pytest.raises(DetectorError, match="1 training image.s. cannot be split over 2 processes"):
        train_detector(build_detector(CLASSES, small_cfg()), ds, tmp_path / "c.pth", progress=False)


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("arch", ["fast_rcnn", "faster_rcnn"])
def test_two_process_ddp_training_on_cpu(tmp_path, arch):
    """torchrun with 2 gloo processes: each takes one image of every 2-image batch; rank 0 writes the checkpoint,
    the parent loads the trained weights; the same optimizer steps as one process. The Faster R-CNN (its RPN's
    parameters in the DDP buckets too) alike, on a dataset without proposals."""
    from pipeline.detector import train_detector_distributed

    ds, _ = _dataset(tmp_path, [(120, 160), (160, 120), (100, 100), (120, 120)])
    if arch == "faster_rcnn":
        ds.proposals = None
    cfg = small_cfg(epochs=2, images_per_batch=2, arch=arch)
    model = build_detector(CLASSES, cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    log = train_detector_distributed(model, ds, tmp_path / "ddp" / "model.pth", "cpu", nproc=2, progress=False,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert list(log.epoch) == [1, 2] and list(log.iterations) == [2, 2] and np.isfinite(log.loss).all()
    ckpt = load_checkpoint(tmp_path / "ddp" / "model.pth")
    assert ckpt["epoch"] == 1 and len(ckpt["log"]) == 2 and not list((tmp_path / "ddp").glob("ddp_*"))
    for k, v in ckpt["model"].items():  # the parent's model holds the checkpoint's (trained) weights
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    trained = ["roi_heads.box_predictor.cls_score.weight"] + (["rpn.head.cls_logits.weight"] if arch == "faster_rcnn"
                                                              else [])
    for k in trained:
        assert not torch.equal(model.state_dict()[k], init[k]), k
    single = train_detector(build_detector(CLASSES, cfg), ds, tmp_path / "one.pth", progress=False)
    assert list(single.iterations) == list(log.iterations)


def test_train_fast_rcnn_declares_gpu_units_per_process():
    import luigi

    from tasks.base import gpu_resource
    from tasks.detector import TrainFastRCNN

    one, two = TrainFastRCNN(det_nproc=1), TrainFastRCNN(det_nproc=2)
    assert one.stage_dir == two.stage_dir  # how many processes train is not part of the result's identity
    assert one.resources == two.resources == {gpu_resource(): 1}  # nothing configured: luigi's 1 unit
    config = luigi.configuration.get_config()
    if not config.has_section("resources"):
        config.add_section("resources")
    config.set("resources", gpu_resource(), "4")
    try:
        assert two.resources == {gpu_resource(): 2} and one.resources == {gpu_resource(): 1}
    finally:
        config.remove_option("resources", gpu_resource())


@pytest.mark.slow
def test_compare_detectors_runs_and_tabulates_the_ratio(outputs, tmp_path):
    """The six detectors of `make compare`, tiny (8 + 4 synthetic images, random weights, 1 epoch each): one table
    with every variant's mAP and its ratio to the ground-truth detector's."""
    import luigi

    from tasks.detector import CompareDetectors

    task = CompareDetectors(data_root=str(tmp_path / "data"), synth_trainval=8, synth_test=4, synth_image_px=128,
                            classifier_weights="random", classifier_epochs=1, classifier_input_px=64, device="cpu",
                            report_images=0, report_worst=0, det_preset="cpu", det_epochs=1, det_image_min_px=128,
                            det_image_max_px=192, det_max_proposals=300, det_weights="random")
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    table = pd.read_csv(task.stage_dir / "comparison.csv")
    assert list(table.variant) == ["pseudo_sacam", "pseudo_gradcam", "pseudo_image_labels", "pseudo_gmp",
                                   "pseudo_spam", "ground_truth"]
    for variant, evaluation in task.requires().items():
        m = json.loads((evaluation.stage_dir / "metrics.json").read_text())
        row = table.set_index("variant").loc[variant]
        assert row.mAP == pytest.approx(m["mAP"]) and row.corloc == pytest.approx(m["corloc"])
    gt = table.set_index("variant").loc["ground_truth"]
    assert table.ratio_to_gt.to_numpy() == pytest.approx(table.mAP.to_numpy() / gt.mAP)
    assert "mAP / GT mAP" in (task.stage_dir / "summary.md").read_text()
