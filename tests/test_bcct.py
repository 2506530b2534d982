"""Seed 002 (BC-CT, pipeline/bcct.py, tasks/bcct.py): background crops from clicks, Eq. 1 gradient maps, the Eq. 2
mask and its component rule, the BC model's training (loss, gradient, resume), the inference-time mask spread, the
CT mask loss, and the stages (resume of a killed BC training; the whole chain with --box-bc-mask on)."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from nets import tiny_classifier
from pipeline.bcct import (BackgroundParams, BCConfig, CTLoss, CTNet, background_boxes, balanced_rows, bc_loss,
                           covered_fraction,
                           bc_mask, bc_training_set, click_free, contact_sheet, gradient_maps, spread_over_mask,
                           train_bc_model)
from pipeline.geometry import crop_bounds
from pipeline.metrics import box_accuracy_by_size


def _images(ids, w=100, h=80, path="x.png"):
    return pd.DataFrame({"image_id": ids, "width": w, "height": h, "path": path})


# -- background crops -----------------------------------------------------------------------------------------------
def test_click_free_excludes_boxes_whose_crop_pixels_hold_the_click():
    boxes = np.array([[0, 0, 10.5, 10], [0, 0, 10, 10], [20, 20, 30, 30], [10.2, 0, 20, 10]])
    # (10.7, 5): outside the continuous box [0, 10.5] but on pixel column 10, which the crop of that box is cut on;
    # on the border of [0, 10]: contained (borders included); the third box is away from it; the fourth box's crop
    # starts at pixel column 10 (floor(10.2)), which holds the click
    free = click_free(boxes, np.array([[10.7, 5.0]]), 100, 80)
    assert free.tolist() == [False, True, True, False]
    assert click_free(boxes, np.array([[10.0, 5.0]]), 100, 80).tolist() == [False, False, True, False]
    assert click_free(boxes, np.zeros((0, 2)), 100, 80).all()


def test_background_crops_never_contain_a_click_and_avoid_the_selected_proposals():
    rng = np.random.default_rng(0)
    ids = [f"im{i}" for i in range(6)]
    props, click_rows, sel_rows = {}, [], []
    for k, image_id in enumerate(ids):
        xy1 = rng.uniform(0, 70, size=(300, 2))
        wh = rng.uniform(5, 60, size=(300, 2))
        props[image_id] = np.concatenate([xy1, np.minimum(xy1 + wh, [100, 80])], 1).astype(np.float32)
        for c in range(3):
            x, y = rng.uniform(0, 100), rng.uniform(0, 80)
            click_rows.append((image_id, x, y))
            sel_rows.append((image_id, max(0, x - 10), max(0, y - 10), min(100, x + 10), min(80, y + 10)))
    clicks = pd.DataFrame(click_rows, columns=["image_id", "x", "y"])
    selected = pd.DataFrame(sel_rows, columns=["image_id", "x1", "y1", "x2", "y2"])
    p = BackgroundParams(per_image=5, total=0, overlap_max=0.1, min_side_px=8, seed=3)
    crops, counts = background_boxes(props, clicks, selected, _images(ids), p)
    assert len(crops) and (counts.chosen <= 5).all() and counts.chosen.sum() == len(crops)
    for r in crops.itertuples(index=False):
        ix1, iy1, ix2, iy2 = crop_bounds((r.x1, r.y1, r.x2, r.y2), 100, 80)
        for c in clicks[clicks.image_id == r.image_id].itertuples(index=False):
            assert not (r.x1 <= c.x <= r.x2 and r.y1 <= c.y <= r.y2)
            assert not (ix1 <= int(c.x) < ix2 and iy1 <= int(c.y) < iy2)
        s = selected[selected.image_id == r.image_id][["x1", "y1", "x2", "y2"]].to_numpy()
        from torchvision.ops import box_iou

        iou = box_iou(torch.tensor([[r.x1, r.y1, r.x2, r.y2]], dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
        assert float(iou.max()) < 0.1 and covered_fraction([[r.x1, r.y1, r.x2, r.y2]], s).max() < 0.1
        assert min(r.x2 - r.x1, r.y2 - r.y1) >= 8
    again, _ = background_boxes(props, clicks, selected, _images(ids), p)
    pd.testing.assert_frame_equal(crops, again)  # seeded
    capped, counts = background_boxes(props, clicks, selected, _images(ids), BackgroundParams(5, 7, 0.1, 8, 3))
    assert len(capped) == 7 and counts.chosen.sum() == 7


def test_a_crop_inside_a_large_selected_proposal_is_not_background():
    """A part of a large object away from its click: its IoU with the object's selected proposal is small, but the
    proposal covers all of it."""
    props = {"a": np.array([[60, 40, 75, 55], [0, 0, 15, 15]], np.float32)}
    clicks = pd.DataFrame({"image_id": ["a"], "x": [40.0], "y": [30.0]})
    selected = pd.DataFrame({"image_id": ["a"], "x1": [20.0], "y1": [10.0], "x2": [99.0], "y2": [79.0]})
    assert covered_fraction(props["a"][:1], selected[["x1", "y1", "x2", "y2"]].to_numpy())[0, 0] == 1.0
    crops, _ = background_boxes(props, clicks, selected, _images(["a"]), BackgroundParams(min_side_px=1))
    assert crops[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[0, 0, 15, 15]]


def test_background_crops_of_an_image_overlap_each_other_little():
    props = {"a": np.array([[0, 0, 40, 40], [1, 1, 41, 41], [50, 40, 90, 79], [2, 0, 40, 40]], np.float32)}
    crops, counts = background_boxes(props, pd.DataFrame({"image_id": ["a"], "x": [99.0], "y": [79.0]}),
                                     pd.DataFrame(columns=["image_id", "x1", "y1", "x2", "y2"]), _images(["a"]),
                                     BackgroundParams(per_image=4, total=0, min_side_px=1))
    assert len(crops) == 2 and counts.candidates.tolist() == [4]  # the three near-copies give one crop


def test_contact_sheet_is_a_png_grid(tmp_path):
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 255
    cv2.imwrite(str(tmp_path / "a.png"), img)
    crops = pd.DataFrame({"path": [str(tmp_path / "a.png")] * 3, "x1": [0, 30, 0], "y1": 0, "x2": [30, 60, 60],
                          "y2": 40})
    out = contact_sheet(crops, tmp_path / "sheet.png", n=3, tile=10, columns=2)
    sheet = cv2.imread(str(out))
    assert sheet.shape == (24, 24, 3)
    assert contact_sheet(crops.iloc[:0], tmp_path / "none.png") is None


# -- Eq. 2 ------------------------------------------------------------------------------------------------------------
def test_bc_mask_thresholds_at_delta_max_and_keeps_the_largest_component():
    g = np.zeros((6, 8), np.float32)
    g[0, 0] = 10.0                  # the maximum, a component of one pixel
    g[3:5, 4:7] = 8.5               # six pixels >= 0.8 * 10
    g[5, 7] = 9.0                   # touches the block diagonally: 8-connected, joins it
    g[1, 4] = 7.9                   # below 0.8 * max
    m = bc_mask(g, delta=0.8)
    want = np.zeros_like(g, bool)
    want[3:5, 4:7] = True
    want[5, 7] = True
    assert (m == want).all()
    assert bc_mask(g, delta=0.79)[1, 4] == False  # noqa: E712 (7.9 >= 7.9 but alone, not the largest)
    # the component holding a point, and the nearest one to a point in none
    assert (bc_mask(g, 0.8, point=(0.5, 0.5)) == (np.arange(48).reshape(6, 8) == 0)).all()
    assert bc_mask(g, 0.8, point=(1.6, 0.2))[0, 0]  # nearest foreground pixel: (0, 0)
    # restricted to a region: the block alone, its own maximum
    region = np.zeros_like(g, bool)
    region[2:, 3:] = True
    assert (bc_mask(g, 0.95, region=region) == (g == 9.0)).all()
    assert not bc_mask(np.zeros((4, 4)), 0.8).any()


def test_bc_mask_ties_take_the_first_component_and_smoothing_joins_speckle():
    g = np.zeros((5, 5), np.float32)
    g[0, 0] = g[4, 4] = 1.0
    m = bc_mask(g, 0.5)
    assert m[0, 0] and not m[4, 4] and m.sum() == 1
    speckle = np.zeros((21, 21), np.float32)
    speckle[8:13:2, 8:13:2] = 1.0  # a 3x3 lattice of isolated pixels
    assert bc_mask(speckle, 0.5).sum() == 1
    assert bc_mask(speckle, 0.5, sigma=0.05).sum() > 9  # one blob after smoothing
    with pytest.raises(ValueError):
        bc_mask(g, 0.0)


def test_spread_over_mask_writes_the_maximum_over_the_clicked_component():
    cam = np.zeros((6, 8), np.float32)
    cam[2, 2] = 4.0
    cam[2, 6] = 9.0  # in the other cell
    g = np.zeros_like(cam)
    g[1:4, 1:4] = 1.0
    g[1:4, 5:8] = 1.0
    cell = np.zeros_like(cam, bool)
    cell[:, :4] = True
    out, px = spread_over_mask(cam, g, 2.5, 2.5, delta=0.5, cell=cell)
    assert px == 9 and (out[1:4, 1:4] == 4.0).all()  # the cell's maximum, not the image's
    assert (out[:, 4:] == cam[:, 4:]).all() and out[0, 0] == 0
    same, px = spread_over_mask(cam, np.zeros_like(cam), 2.5, 2.5)
    assert px == 0 and (same == cam).all()


# -- Eq. 1 and the BC model ------------------------------------------------------------------------------------------
def test_gradient_maps_are_each_samples_input_gradient():
    torch.manual_seed(0)
    net = tiny_classifier(1, seed=1)
    x = torch.randn(3, 3, 32, 32)
    g = gradient_maps(net, x)
    assert g.shape == (3, 32, 32)
    for b in range(3):
        xb = x[b:b + 1].clone().requires_grad_(True)
        net(xb)[0, 0].backward()
        assert torch.allclose(g[b], xb.grad[0].abs().amax(0), atol=1e-6)


def _write(path, img):
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return str(path)


@pytest.fixture(scope="module")
def toy_bc(tmp_path_factory):
    """16 images of grey noise, each with a red square: positives are the squares, backgrounds noise patches."""
    d = tmp_path_factory.mktemp("bc")
    rng = np.random.default_rng(0)
    pos, bg = [], []
    for i in range(16):
        img = rng.integers(60, 200, size=(64, 64, 1), dtype=np.uint8).repeat(3, 2)
        img[4:28, 4:28] = (230, 20, 20)
        path = _write(d / f"im{i}.png", img)
        pos.append((f"im{i}", path, 4.0, 4.0, 28.0, 28.0))
        bg += [(f"im{i}", path, 34.0, 34.0, 62.0, 62.0), (f"im{i}", path, 32.0, 2.0, 62.0, 30.0)]
    cols = ["image_id", "path", "x1", "y1", "x2", "y2"]
    return pd.DataFrame(pos[:8], columns=cols), pd.DataFrame(bg, columns=cols)


def _bc_net(seed=1):
    net = tiny_classifier(1, seed=seed, scale=0.3)
    for p in net.body.parameters():
        p.requires_grad_(False)
    return net


def test_balanced_rows_draw_both_labels_equally_often():
    rows = balanced_rows(np.array([1] * 3 + [0] * 8), seed=0)
    labels = np.array([1] * 3 + [0] * 8)[rows]
    assert (labels == 1).sum() == (labels == 0).sum() == 8
    assert set(rows[labels == 0]) == set(range(3, 11))
    with pytest.raises(ValueError):
        balanced_rows(np.zeros(4))


def test_bc_loss_gradient_is_the_bce_gradient_of_the_linear_output(toy_bc):
    net = _bc_net()
    ds = bc_training_set(*toy_bc, input_size=32, mean=net.mean, std=net.std, augment=False)
    assert (ds.targets == 1).sum() == (ds.targets == 0).sum() == 32  # 8 positives resampled to 32
    x = torch.stack([ds[i][0] for i in range(0, 64, 4)])
    y = torch.tensor([ds[i][1] for i in range(0, 64, 4)])
    loss, hits = bc_loss(net, x, y)
    loss.backward()
    with torch.no_grad():
        f = net.body(x)
        p = torch.sigmoid(net.head(f)[:, 0])
    assert torch.allclose(net.head.weight.grad[0], ((p - y.float())[:, None] * f).mean(0), atol=1e-6)
    assert all(q.grad is None for q in net.body.parameters())  # the body is frozen
    assert int(hits) == int(((p > 0.5) == (y > 0)).sum())


def test_bc_training_lowers_the_loss_and_leaves_the_body(toy_bc, tmp_path):
    torch.set_num_threads(1)
    net = _bc_net()
    body = {k: v.clone() for k, v in net.body.state_dict().items()}
    ds = bc_training_set(*toy_bc, input_size=32, mean=net.mean, std=net.std, seed=0)
    log = train_bc_model(net, ds, tmp_path, BCConfig(epochs=4, batch_size=8, lr=0.2, warmup_fraction=0.0),
                         progress=False)
    assert log.loss.iloc[-1] < 0.7 * log.loss.iloc[0]
    assert log.accuracy.iloc[-1] > 0.8
    assert all(torch.equal(v, net.body.state_dict()[k]) for k, v in body.items())


def test_bc_training_resumes_after_a_kill_with_the_same_weights(toy_bc, tmp_path):
    torch.set_num_threads(1)
    cfg = BCConfig(epochs=3, batch_size=8, lr=0.05)

    def run(out, **kw):
        net = _bc_net()
        ds = bc_training_set(*toy_bc, input_size=32, mean=net.mean, std=net.std, seed=0)
        return net, train_bc_model(net, ds, out, cfg, progress=False, **kw)

    full, full_log = run(tmp_path / "full")

    def kill(epoch, row):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", on_epoch_end=kill)
    resumed, log = run(tmp_path / "killed")
    assert log.epoch.tolist() == [1, 2, 3] and log.loss.tolist() == full_log.loss.tolist()
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())


# -- CT --------------------------------------------------------------------------------------------------------------
def test_ct_mask_loss_reaches_the_mask_branch_and_the_body():
    torch.manual_seed(0)
    net = tiny_classifier(3, seed=2)
    ct = CTNet(net, "conv2", width=4)
    x = torch.randn(2, 3, 32, 32)
    bc = _bc_net(seed=5)
    loss_fn = CTLoss(bc, weight=2.0, delta=0.5, sigma=0.02, mean_std=(net.mean, net.std))
    logits = ct(x)
    assert ct.mask_logits().shape == (2, 1, 8, 8)
    target = loss_fn.targets(x)
    assert target.shape == (2, 1, 32, 32) and set(target.unique().tolist()) <= {0.0, 1.0} and target.sum() > 0
    loss = loss_fn(ct, x, logits)
    pred = torch.nn.functional.interpolate(ct.mask_logits(), size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(loss, 2.0 * torch.nn.functional.binary_cross_entropy_with_logits(pred, target))
    loss.backward()
    assert ct.mask_head[0].weight.grad.abs().sum() > 0 and net.body.conv1.weight.grad.abs().sum() > 0
    assert {id(p) for p in ct.head_parameters()} | {id(p) for p in ct.backbone_parameters()} == {
        id(p) for p in ct.parameters()}


# -- metrics by size ---------------------------------------------------------------------------------------------------
def test_box_accuracy_by_size_bins_by_the_clicked_object():
    objects = pd.DataFrame({"image_id": ["a", "a", "b"], "object_index": [0, 1, 0], "class": ["c", "c", "d"],
                            "x1": [0, 50, 0], "y1": [0, 50, 0], "x2": [10, 60, 80], "y2": [10, 60, 80],
                            "difficult": False})
    sizes = {"a": (100, 100), "b": (100, 100)}  # sides 0.1, 0.1 and 0.8 of the image
    boxes = pd.DataFrame({"image_id": ["a", "a", "b"], "class": ["c", "c", "d"], "object_index": [0, 1, 0],
                          "x1": [0, 0, 0], "y1": [0, 0, 0], "x2": [10, 10, 40], "y2": [10, 10, 40]})
    t = box_accuracy_by_size(boxes, objects, sizes).set_index("size")
    # the second box was made for object 1 (small) but fits object 0 of its class: correct, in the small bin
    assert t.loc["small", "boxes"] == 2 and t.loc["small", "box_corloc"] == 1.0
    assert t.loc["medium", "boxes"] == 0 and np.isnan(t.loc["medium", "box_corloc"])
    assert t.loc["large", "boxes"] == 1 and t.loc["large", "box_corloc"] == 0.0


# -- the stages ------------------------------------------------------------------------------------------------------
TINY_CHAIN = dict(synth_trainval=6, synth_test=1, synth_image_px=96, ss_image_max_px=64, ss_box_min_px=4, ss_shards=1,
                  classifier_weights="random", classifier_epochs=1, classifier_input_px=32, device="cpu",
                  cam_shards=1, cam_images_per_part=2, bc_weights="random", bc_epochs=2, bc_input_px=32,
                  bc_bg_min_px=4, bc_bg_overlap_max=1.0, bc_images_per_part=2, report_images=0, report_worst=0)


@pytest.mark.slow
def test_train_bc_stage_killed_mid_way_resumes_to_the_uninterrupted_result(outputs, tmp_path, monkeypatch):
    import luigi

    from tasks.bcct import TrainBC

    known = dict(TrainBC.get_params())
    kw = {k: v for k, v in dict(TINY_CHAIN, data_root=str(tmp_path / "data")).items() if k in known}
    task = TrainBC(**kw)
    assert luigi.build([task.requires()["background"]], local_scheduler=True, log_level="WARNING")
    import pipeline.bcct as B
    import tasks.bcct as T

    real = B.train_bc_model

    def killed(*a, **k):  # the first run dies after its first epoch's checkpoint
        def kill(epoch, row):
            raise RuntimeError("killed")
        return real(*a, on_epoch_end=kill, **k)

    monkeypatch.setattr(T, "train_bc_model", killed)
    assert not luigi.build([task], local_scheduler=True, log_level="CRITICAL")
    assert (task.work_dir / "checkpoint.pt").is_file() and not task.stage_dir.exists()
    monkeypatch.setattr(T, "train_bc_model", real)
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    resumed = torch.load(task.stage_dir / "model.pt", weights_only=True)["state_dict"]
    log = pd.read_csv(task.stage_dir / "train_log.csv")
    assert log.epoch.tolist() == [1, 2]

    monkeypatch.setenv("CLICKSCALE_OUTPUTS", str(tmp_path / "other"))
    fresh = TrainBC(**kw)
    assert luigi.build([fresh], local_scheduler=True, log_level="WARNING")
    full = torch.load(fresh.stage_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, resumed[k]) for k, v in full.items())
    assert pd.read_csv(fresh.stage_dir / "train_log.csv").loss.tolist() == log.loss.tolist()


@pytest.mark.slow
def test_bc_mask_chain_writes_boxes_and_ct_trains(outputs, tmp_path):
    """The whole chain on tiny synthetic images: --box-bc-mask on (BackgroundSet -> TrainBC -> BCMaps) and a CT
    classifier (--classifier-ct-weight); existing outputs keep their hashes."""
    import luigi

    import harness as H
    from pipeline.cam import CamStore
    from pipeline.io import read_json
    from tasks.pseudo import FusePseudoBoxes

    kw = dict(TINY_CHAIN, data_root=str(tmp_path / "data"))
    plain, masked = FusePseudoBoxes(**kw), FusePseudoBoxes(**kw, box_bc_mask="on")
    ct = FusePseudoBoxes(**kw, classifier_ct_weight=1.0)
    assert plain.stage_hash == FusePseudoBoxes(**kw, box_bc_delta=0.8, classifier_ct_weight=0.0).stage_hash
    assert "bc" not in plain.requires() and masked.stage_hash != plain.stage_hash
    res = luigi.build([plain, masked, ct], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status.name == "SUCCESS", res.summary_text
    bg = masked.find_upstream("BackgroundSet").stage_dir
    assert (bg / "contact_sheet.png").is_file() and read_json(bg / "report.json")["crops"] > 0
    store = CamStore(masked.requires()["bc"].stage_dir)
    assert store.layers == ["input"] and len(store) == len(masked.manifest().clicks)
    m = read_json(masked.stage_dir / "metrics.json")
    assert m["params"]["bc_mask"]["masked"] > 0
    meta = torch.load(ct.find_upstream("TrainClassifier").stage_dir / "model.pt", weights_only=True)["meta"]
    assert meta["ct_weight"] == 1.0
    assert not H.incomplete_outputs(outputs)
