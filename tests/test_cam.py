"""CAM methods against closed forms (Eq. 1-3), batching, crops, paste/fuse (Eq. 4), and the resumable CAM store."""
import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline import cam_writer
from pipeline.backbones import build_backbone
from pipeline.boxes import ensemble_map
from pipeline.cam import (SACAM, CamStore, ClassifierOutputTarget, FusedMaps, GradCAM, click_entries, extract_crops,
                          image_entries, layer_grid, paste_and_fuse, write_cam_store)
from pipeline.classifier import crop_and_resize
from pipeline.io import read_json

from nets import tiny_classifier


# -- a tiny network with hand-set weights ------------------------------------------------------------------------
class SpatialWeightedSum(nn.Module):
    """``(B, K, h, w) -> (B, K)``: sum_ij S[i, j] * A[:, :, i, j] with a fixed map S (positive and negative),
    so that dy/dA varies over pixels and changes sign: Grad-CAM and SA-CAM then differ."""

    def __init__(self, s: torch.Tensor):
        super().__init__()
        self.register_buffer("s", s)

    def forward(self, a):
        return (a * self.s).sum(dim=(2, 3))


def tiny_net():
    conv = nn.Conv2d(2, 3, kernel_size=1, bias=True)
    fc = nn.Linear(3, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]).view(3, 2, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, 0.5, -0.5]))
        fc.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 3.0]]))
        fc.bias.copy_(torch.tensor([0.1, -0.2]))
    s = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5], [1.5, -2.0, 1.0]])
    relu = nn.ReLU()
    net = nn.Sequential(conv, relu, SpatialWeightedSum(s), fc).eval()
    return net, relu, (conv.weight.detach().numpy().reshape(3, 2), conv.bias.detach().numpy(),
                       fc.weight.detach().numpy(), s.numpy())


def closed_form(x: np.ndarray, cls: int, params, pre_activation: bool = False):
    """Z = W1 x + b1, R = ReLU(Z); y_c = sum_k W2[c, k] sum_ij S_ij R_k,ij + b2_c. The CAM layer's activation A is
    R (then dy_c/dA_k,ij = W2[c, k] S_ij) or, with ``pre_activation``, Z (then dy_c/dA_k,ij = W2[c, k] S_ij
    [Z_k,ij > 0], and A has negative values). Eq. 1-2 (Grad-CAM) and Eq. 3 (SA-CAM, with LayerCAM's outer ReLU)
    written out in numpy."""
    w1, b1, w2, s = params
    z = np.einsum("kc,chw->khw", w1, x) + b1[:, None, None]
    a = z if pre_activation else np.maximum(z, 0)
    grad = w2[cls][:, None, None] * s[None] * ((z > 0) if pre_activation else 1.0)   # (K, h, w)
    weights = grad.mean(axis=(1, 2))                                                  # Eq. 1
    gradcam = np.maximum((weights[:, None, None] * a).sum(0), 0)                      # Eq. 2
    sacam = np.maximum((np.maximum(grad, 0) * a).sum(0), 0)                           # Eq. 3
    return gradcam, sacam


@pytest.mark.parametrize("efficient", [True, False])
@pytest.mark.parametrize("pre_activation", [False, True])
def test_gradcam_and_sacam_equal_closed_forms(efficient, pre_activation):
    net, relu, params = tiny_net()
    layer = net[0] if pre_activation else relu
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    targets = [0, 1, 1, 0]
    with GradCAM(net, target_layer=layer, efficient=efficient) as g, \
            SACAM(net, target_layer=layer, efficient=efficient) as s:
        gmaps, smaps = g(x, targets).numpy(), s(x, targets).numpy()
    for b in range(4):
        want_g, want_s = closed_form(x[b].numpy(), targets[b], params, pre_activation)
        np.testing.assert_allclose(gmaps[b], want_g, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(smaps[b], want_s, rtol=1e-5, atol=1e-6)
    assert not np.allclose(gmaps, smaps)  # the two methods do differ on this net
    assert smaps.max() > 0 and gmaps.max() > 0
    assert not layer._forward_hooks        # the context manager removed the hooks


def test_hand_checked_pixel():
    """One SA-CAM pixel by hand: x = (1, 2) at pixel (1, 1): A = ReLU((1, 2.5, -1.5)) = (1, 2.5, 0);
    class 0: dy/dA_k = W2[0, k] * S[1, 1] = (2, -4, 1); SA-CAM = 2 * 1 + 0 * 2.5 + 1 * 0 = 2."""
    net, layer, _ = tiny_net()
    x = torch.zeros(1, 2, 3, 3)
    x[0, :, 1, 1] = torch.tensor([1.0, 2.0])
    with SACAM(net, target_layer=layer) as cam:
        assert cam(x, [0])[0, 1, 1].item() == pytest.approx(2.0)


def test_callable_targets_and_errors():
    net, layer, _ = tiny_net()
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    with SACAM(net, target_layer=layer) as cam:
        a = cam(x, [1, 0])
        b = cam(x, [ClassifierOutputTarget(1), ClassifierOutputTarget(0)])
        assert torch.equal(a, b)
        with pytest.raises(ValueError, match="3 targets for a batch of 2"):
            cam(x, [0, 1, 1])
        with pytest.raises(ValueError, match="out of range"):
            cam(x, [0, 2])
        net.train()
        with pytest.raises(RuntimeError, match="eval mode"):
            cam(x, [0, 1])


@pytest.fixture(scope="module")
def effnet():
    return build_backbone("efficientnet_lite0", 6, "random", seed=3).eval()


@pytest.mark.slow  # the first efficientnet backward of a process: 2-18 s on 2 busy cores
@pytest.mark.parametrize("cls", [SACAM, GradCAM])
def test_batched_equals_per_crop_and_full_backprop(effnet, cls):
    x = torch.randn(5, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    t = [0, 3, 5, 3, 1]
    with cls(effnet, "stage4") as cam:
        batched = cam(x, t)
        single = torch.cat([cam(x[i:i + 1], t[i:i + 1]) for i in range(5)])
    with cls(effnet, "stage4", efficient=False) as cam:
        full = cam(x, t)
    assert batched.shape == (5, 7, 7) and batched.abs().max() > 0
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6 * float(batched.abs().max()))
    torch.testing.assert_close(batched, full, rtol=1e-4, atol=1e-6 * float(batched.abs().max()))
    assert not any(m._forward_hooks for m in effnet.modules())


# -- several layers in one pass ---------------------------------------------------------------------------
@pytest.mark.parametrize("efficient", [True, False])
@pytest.mark.parametrize("cls", [SACAM, GradCAM])
def test_one_pass_for_two_layers_equals_a_pass_per_layer(cls, efficient):
    """forward_layers on (conv1, conv2), in either order, gives each layer the maps of a pass of its own; the
    graph is cut at the lowest layer only (the higher one's activation is in the graph, not a leaf)."""
    net = tiny_classifier(seed=2)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    t = [0, 1, 2, 2, 1, 0]
    for order in (("conv1", "conv2"), ("conv2", "conv1")):
        with cls(net, layers=order, efficient=efficient) as cam:
            both = cam.forward_layers(x, t)
            assert list(both) == list(order) and cam.layer == order[0]
            with pytest.raises(ValueError, match="forward_layers"):
                cam(x, t)
        for layer in order:
            with cls(net, layer, efficient=efficient) as one:
                alone = one(x, t)
                assert list(one.forward_layers(x, t)) == [layer]
            assert both[layer].shape == alone.shape and alone.abs().max() > 0
            torch.testing.assert_close(both[layer], alone, rtol=1e-6, atol=1e-7 * float(alone.abs().max()))
    assert both["conv1"].shape == (6, 16, 16) and both["conv2"].shape == (6, 8, 8)
    with pytest.raises(ValueError, match="each layer once"):
        cls(net, layers=("conv2", "conv2"))


@pytest.mark.slow  # the first efficientnet backward of a process: seconds on 2 busy cores
@pytest.mark.parametrize("cls", [SACAM, GradCAM])
def test_one_pass_for_default_layers_equals_per_layer_passes_on_efficientnet(effnet, cls):
    """efficientnet_lite0 (random weights), the default fused layers stage5_expand (inside stage5) and stage6, 6
    crops: one forward + one backward gives each layer's maps as separate passes do, within float rounding."""
    x = torch.randn(6, 3, 96, 96, generator=torch.Generator().manual_seed(8))
    t = [0, 1, 2, 3, 4, 5]
    with cls(effnet, layers=("stage5_expand", "stage6")) as cam:
        both = cam.forward_layers(x, t)
        logits = cam.outputs
    for layer in ("stage5_expand", "stage6"):
        with cls(effnet, layer) as one:
            alone = one(x, t)
            torch.testing.assert_close(one.outputs, logits, rtol=0, atol=0)
        assert alone.abs().max() > 0
        torch.testing.assert_close(both[layer], alone, rtol=1e-5, atol=1e-6 * float(alone.abs().max()))
    assert both["stage5_expand"].shape == (6, 6, 6) and both["stage6"].shape == (6, 3, 3)
    assert not any(m._forward_hooks for m in effnet.modules())


def test_store_of_two_layers_equals_one_store_per_layer(tmp_path, toy_data):
    """write_cam_store(layers=(conv1, conv2)): per layer the fused maps and inspected crop maps of a one-layer
    store of that layer, and the same crops and probabilities; CamStore reads a layer by name, and a part of the
    earlier format (one map per entry) is refused with a clear error."""
    paths, selected, _ = toy_data
    net = tiny_classifier()
    entries = click_entries(selected, ("a", "b", "c"))
    kw = dict(images_per_part=2, batch_size=4, inspect_images=2, progress=False)
    both = write_cam_store(net, entries, paths, tmp_path / "both", layers="conv1,conv2", **kw)
    assert both.layers == ["conv1", "conv2"] and both.layer == "conv1"
    assert read_json(tmp_path / "both" / "summary.json")["layers"] == ["conv1", "conv2"]
    for layer in ("conv1", "conv2"):
        one = write_cam_store(net, entries, paths, tmp_path / layer, layers=[layer], **kw)
        assert one.layers == [layer]
        view = both.with_layer(layer)
        for cid in one.click_ids():
            (m1, meta1), (m2, meta2) = one.load(cid), view.load(cid)
            np.testing.assert_allclose(m2, m1, rtol=1e-5, atol=1e-6 * max(float(m1.max()), 1e-12))
            np.testing.assert_array_equal(meta1["crops"], meta2["crops"])
            np.testing.assert_allclose(meta1["crop_probs"], meta2["crop_probs"], rtol=1e-6)
            c1, c2 = one.load_crop_maps(cid), view.load_crop_maps(cid)
            assert (c1 is None) == (c2 is None)
            if c1 is not None:
                np.testing.assert_allclose(c2, c1, rtol=1e-5, atol=1e-6 * max(float(c1.max()), 1e-12))
        one.close()
    assert not np.allclose(both.with_layer("conv1").load(0)[0], both.with_layer("conv2").load(0)[0])
    with pytest.raises(KeyError, match="no layer 'conv3'"):
        CamStore(tmp_path / "both", "conv3").load(0)
    # an old store: format 1 in the part's attributes
    part = tmp_path / "conv2" / "cams-00000.h5"
    with h5py.File(part, "a") as f:
        f.attrs["format"] = 1
    with pytest.raises(ValueError, match=r"cams-00000.h5: CAM store part of format 1.*recompute"):
        CamStore(tmp_path / "conv2").load(0)


#: how far the CAM map of one crop may move, relative to the map's maximum, when another convolution kernel computes
#: it (CPU kernels are chosen by batch size and thread count: PyTorch computes 1x1 convolutions natively with one
#: thread and fewer than 16 crops, with oneDNN otherwise). Rounding differs by ~1e-7; where that flips a ReLU6 gate
#: of efficientnet_lite0 the gradient, and so the map, moves further. Largest measured: 7.2e-3 (random weights,
#: stage5, AMD AVX-512, 1 vs 2 threads), 3.1e-3 (ImageNet weights, real crops, stage5_expand), 1.3e-2 on an Intel
#: AVX-512 Xeon through oneDNN's batch-1 kernels (issue 28), which BaseCAM no longer uses.
KERNEL_TOLERANCE = 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("cls", [SACAM, GradCAM])
@pytest.mark.parametrize("channels_last", [False, True])
def test_maps_do_not_depend_on_batch_size_or_threads(effnet, cls, channels_last):
    """The same 24 crops in passes of 1, 7 and 64 crops, with 1 and 2 CPU threads: every crop's map agrees within
    KERNEL_TOLERANCE x max|map|; with 2 threads and oneDNN (its batched kernels for every pass size, a single crop
    included) the maps are identical whatever the pass size."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = effnet.to(memory_format=fmt)
    x = torch.randn(24, 3, 112, 112, generator=torch.Generator().manual_seed(5)).contiguous(memory_format=fmt)
    t = [i % 6 for i in range(24)]
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with cls(net, "stage5_expand") as cam:  # the lower of the default fused layers
                for bs in (1, 7, 64):
                    results[threads, bs] = torch.cat([cam(x[i:i + bs], t[i:i + bs]) for i in range(0, 24, bs)])
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        effnet.to(memory_format=torch.contiguous_format)
    ref = results[2, 64]
    assert ref.shape == (24, 7, 7) and ref.abs().max() > 0
    for key, maps in results.items():
        torch.testing.assert_close(maps, ref, rtol=0, atol=KERNEL_TOLERANCE * float(ref.abs().max()),
                                   msg=lambda m, key=key: f"(threads, pass size) {key}: {m}")
    if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        for bs in (1, 7):
            assert torch.equal(results[2, bs], ref), f"2 threads, pass size {bs}"


@pytest.mark.slow
def test_pseudo_boxes_do_not_depend_on_cam_batch_size(tmp_path, toy_data, effnet):
    """write_cam_store with --cam-batch-size 1, 7 and 64 (2 threads, channels-last as the stage runs
    efficientnet_lite0): the same stored maps and the same pseudo boxes."""
    from pipeline.boxes import BoxParams, pseudo_boxes_from_cams, rank1_proposals

    paths, selected, sizes = toy_data
    entries = click_entries(selected, ("a", "b", "c"))
    clicks = selected.drop_duplicates("click_id")[["click_id", "image_id", "class", "x", "y"]]
    boxes, maps = {}, {}
    try:
        torch.set_num_threads(2)
        for bs in (1, 7, 64):
            store = write_cam_store(effnet, entries, paths, tmp_path / f"b{bs}", layers="stage5_expand", crop_size=64,
                                    images_per_part=2, batch_size=bs, progress=False)
            with store:
                maps[bs] = {cid: store.load(cid)[0] for cid in store.click_ids()}
                items = [(cid, m, {"image_id": e.image_id, "class": e.cls, "x": e.x, "y": e.y})
                         for e in entries for cid, m in [(e.entry_id, maps[bs][e.entry_id])]]
            boxes[bs] = pseudo_boxes_from_cams(items, rank1_proposals(selected), {}, BoxParams(), image_sizes=sizes,
                                               clicks=clicks)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        effnet.to(memory_format=torch.contiguous_format)
    assert len(boxes[64]) == len(entries) and not boxes[64].fallback.all()
    for bs in (1, 7):
        assert maps[bs].keys() == maps[64].keys()
        for cid in maps[64]:
            np.testing.assert_array_equal(maps[bs][cid], maps[64][cid], err_msg=f"batch size {bs}, click {cid}")
        pd.testing.assert_frame_equal(boxes[bs], boxes[64])


@pytest.mark.slow
def test_vgg16_default_layer_batched(tmp_path):
    vgg = build_backbone("vgg16", 4, "random").eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with SACAM(vgg) as cam:
        assert cam.layer == "conv5_2"
        batched = cam(x, [0, 1, 2])
        single = torch.cat([cam(x[i:i + 1], [i]) for i in range(3)])
    assert batched.shape == (3, 4, 4)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6 * float(batched.abs().max()))


# -- crops and fusion ---------------------------------------------------------------------------------------
def test_extract_crops_matches_classifier_crop_geometry():
    """On a linear ramp image every crop pixel must equal the ramp at its sampling point: output pixel j of a
    crop of pixels [ix1, ix2) samples at ix1 + (j + 0.5) * (ix2 - ix1) / size - 0.5 (cv2.resize's grid, on
    pipeline.classifier.crop_bounds' pixels); a half-pixel shift would be off by 1 grey level here."""
    yy, xx = np.mgrid[0:60, 0:80].astype(np.float64)
    ramp = 2.0 * xx + 1.5 * yy  # 0..250
    img = np.repeat(ramp.round().astype(np.uint8)[:, :, None], 3, axis=2)
    boxes = [[0, 0, 80, 60], [10.3, 5.2, 50.7, 44.9], [30, 20, 38, 28], [20, 10, 76, 26]]
    unit = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))
    crops = extract_crops(img, boxes, 32, *unit)
    assert crops.shape == (4, 3, 32, 32)
    for box, crop in zip(boxes, crops):
        ix1, iy1 = int(np.floor(box[0])), int(np.floor(box[1]))
        ix2, iy2 = int(np.ceil(box[2])), int(np.ceil(box[3]))
        j = np.arange(32) + 0.5
        sx, sy = ix1 + j * (ix2 - ix1) / 32 - 0.5, iy1 + j * (iy2 - iy1) / 32 - 0.5
        want = 2.0 * sx[None, :] + 1.5 * sy[:, None]
        got = crop[0].numpy()
        inner = (slice(1, -1), slice(1, -1))  # the outermost samples may lie beyond the first/last pixel centre
        assert np.abs(got - want)[inner].max() < 0.6, box  # only the uint8 rounding of the ramp
        ref = crop_and_resize(img, box, 32)[:, :, 0].astype(np.float32)
        assert np.abs(got - ref)[inner].mean() < 0.6, box
    # identity: the whole image at its own size comes back unchanged, normalised
    rnd = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    same = extract_crops(rnd, [[0, 0, 32, 32]], 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))[0]
    want = torch.from_numpy(rnd).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(same, want, rtol=0, atol=1e-5)


def test_paste_and_fuse_puts_mass_where_the_crops_were():
    maps = torch.ones(2, 3, 3)
    maps[1] *= 2.0
    boxes = [[10, 20, 30, 50], [25, 40, 60, 60]]  # integer boxes: exactly these pixels
    fused = paste_and_fuse(maps, boxes, (70, 80))
    assert fused.shape == (70, 80) and fused.dtype == np.float32
    want = np.zeros((70, 80), np.float32)
    want[20:50, 10:30] += 1
    want[40:60, 25:60] += 2
    np.testing.assert_allclose(fused, want, atol=1e-6)
    # a peaked map lands in the matching part of its box; fractional boxes cover every pixel they touch
    peak = torch.zeros(1, 4, 4)
    peak[0, 0, 3] = 1.0  # top-right cell
    f = paste_and_fuse(peak, [[4.5, 8.2, 12.5, 16.7]], (20, 20))
    ys, xs = np.nonzero(f)
    # the box covers pixels x 4..12, y 8..16 (9 x 9); bilinear 4 -> 9 (half-pixel centres) maps output j to
    # source (j + 0.5) * 4 / 9 - 0.5: source row 0 reaches output rows j <= 2, source column 3 columns j >= 6
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (8, 8 + 2, 4 + 6, 12)
    assert np.unravel_index(f.argmax(), f.shape) == (8, 12) and f[8, 12] == pytest.approx(1.0)
    assert f.sum() == pytest.approx(float(torch.nn.functional.interpolate(
        peak[None], size=(9, 9), mode="bilinear", align_corners=False).sum()), rel=1e-6)


# -- the CAM store -----------------------------------------------------------------------------------------
@pytest.fixture
def toy_data(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    paths, rows, sizes = {}, [], {}
    click_id = 0
    for i in range(5):
        h, w = 40 + 7 * i, 60 - 3 * i
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        p = tmp_path / f"img{i}.png"
        cv2.imwrite(str(p), img[:, :, ::-1])
        image_id = f"im{i}"
        paths[image_id], sizes[image_id] = str(p), (w, h)
        for c in range(1 + i % 2):  # 1 or 2 clicks
            x, y = float(rng.uniform(10, w - 10)), float(rng.uniform(10, h - 10))
            for r in range(3):
                half = 4 + 3 * r
                rows.append((click_id, image_id, ["a", "b", "c"][(i + c) % 3], x, y, r, max(0, x - half),
                             max(0, y - half), min(w, x + half + 1.5), min(h, y + half), False))
            click_id += 1
    selected = pd.DataFrame(rows, columns=["click_id", "image_id", "class", "x", "y", "rank", "x1", "y1", "x2",
                                           "y2", "fallback"])
    return paths, selected, sizes


def test_forward_batches_have_one_size_within_a_part(tmp_path, toy_data, monkeypatch):
    """Every forward/backward batch holds exactly batch_size crops, cut across images, but the last of each part
    (parts of 2 images: 3 + 6, 3 + 6 and 3 crops): batches of one size reuse the same allocations, so the heap
    that pipeline.device.keep_freed_memory keeps does not grow with the sizes seen."""
    paths, selected, _ = toy_data
    sizes = []
    real = cam_writer.BaseCAM.forward_layers

    def recording(self, x, targets):
        sizes.append(int(x.shape[0]))
        return real(self, x, targets)

    monkeypatch.setattr(cam_writer.BaseCAM, "forward_layers", recording)
    entries = click_entries(selected, ("a", "b", "c"))
    write_cam_store(tiny_classifier(), entries, paths, tmp_path / "cams", images_per_part=2, batch_size=4,
                    progress=False)
    assert sizes == [4, 4, 1, 4, 4, 1, 3]
    # no batch size given: by device type, fewer crops on a CPU
    net = tiny_classifier()
    assert cam_writer.CamStoreSettings().recorded(net)["batch_size"] == cam_writer.AUTO_BATCH_SIZE["cpu"]
    assert cam_writer.CamStoreSettings(device="cuda:0").recorded(net)["batch_size"] == 64
    assert cam_writer.CamStoreSettings(batch_size=5).recorded(net)["batch_size"] == 5


def test_prob_fusion_weights_each_crop_by_its_class_probability(tmp_path, toy_data):
    paths, selected, _ = toy_data
    net = tiny_classifier()
    entries = click_entries(selected, ("a", "b", "c"))
    kw = dict(images_per_part=2, batch_size=4, progress=False)
    plain = write_cam_store(net, entries, paths, tmp_path / "sum", **kw)
    weighted = write_cam_store(net, entries, paths, tmp_path / "prob", fusion="prob", **kw)
    from pipeline.imageio import read_image

    changed = 0
    with SACAM(net) as cam:
        for e in entries:
            img = read_image(paths[e.image_id])
            maps = cam(extract_crops(img, e.crops, 32, net.mean, net.std), [e.class_index] * len(e.crops))
            got, meta = weighted.load(e.entry_id)
            probs = meta["crop_probs"]
            assert probs.shape == (len(e.crops),) and ((probs > 0) & (probs < 1)).all()
            np.testing.assert_allclose(probs, plain.load(e.entry_id)[1]["crop_probs"], rtol=1e-5)
            want = paste_and_fuse(maps, e.crops, img.shape[:2], weights=probs, grid=layer_grid(net, "conv2", 32))
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * want.max())
            # equal weights would give the plain sum scaled; unequal ones change the map's shape
            if np.ptp(probs) > 0.05 * probs.max():
                s = plain.load(e.entry_id)[0]
                assert not np.allclose(got / got.max(), s / s.max(), atol=1e-2)
                changed += 1
    assert changed >= 1
    assert read_json(tmp_path / "prob" / "summary.json")["fusion"] == "prob"
    with pytest.raises(ValueError, match="unknown fusion"):
        write_cam_store(net, entries, paths, tmp_path / "bad", fusion="mean", **kw)
    with pytest.raises(ValueError, match="weights do not match"):
        paste_and_fuse(np.ones((2, 4, 4)), [[0, 0, 5, 5], [1, 1, 6, 6]], (10, 10), weights=[1.0])


def test_grid_paste_puts_each_position_at_its_receptive_field_centre():
    """--cam-paste grid: a position's value lands on the centre of its receptive field (conv padding k // 2 anchors
    the grid at the crop's first pixel); resizing the map like an image puts it half a stride cell further right
    and down. For max-pooled grids (VGG16) the two agree."""
    from pipeline.cam import MapGrid, paste_maps

    peak = torch.zeros(1, 7, 7)
    peak[0, 3, 3] = 1.0
    box = [[0, 0, 224, 224]]
    g = MapGrid(224, 32.0, 0.5)
    on_grid = paste_maps(peak, box, (224, 224), grid=g)
    resized = paste_maps(peak, box, (224, 224))
    assert np.unravel_index(int(on_grid.argmax()), (224, 224)) == (96, 96)  # 3 * 32 + 0.5 is pixel 96's centre
    assert on_grid[96, 96] == pytest.approx(1.0) and on_grid[96, 64] == pytest.approx(0.0, abs=1e-6)
    assert np.unravel_index(int(resized.argmax()), (224, 224)) in {(111, 111), (111, 112), (112, 111), (112, 112)}
    # a box twice the crop: the same place, scaled; beyond the outermost positions the edge value
    big = paste_maps(peak, [[0, 0, 448, 448]], (448, 448), grid=g)
    assert np.unravel_index(int(big.argmax()), (448, 448)) in {(192, 192), (192, 193), (193, 192), (193, 193)}
    edge = torch.zeros(1, 7, 7)
    edge[0, :, 6] = 1.0
    assert float(paste_maps(edge, box, (224, 224), grid=g)[100, 223]) == pytest.approx(1.0)
    # c0 = stride / 2 (a max-pooled grid): the same as resizing
    torch.manual_seed(0)
    maps = torch.rand(2, 7, 7)
    boxes = [[3.2, 5.0, 150.7, 90.1], [0, 0, 37, 200]]
    torch.testing.assert_close(paste_maps(maps, boxes, (210, 160), grid=MapGrid(224, 32.0, 16.0)),
                               paste_maps(maps, boxes, (210, 160)), rtol=0, atol=1e-5)


def test_layer_grid_from_the_backbones_convolutions():
    net = build_backbone("efficientnet_lite0", 3, "random")
    assert tuple(layer_grid(net, "stage6", 224)) == (224, 32.0, 0.5)
    assert tuple(layer_grid(net, "stage5_expand", 224)) == (224, 16.0, 0.5)  # inside stage 5, before its stride 2
    assert tuple(layer_grid(tiny_classifier(), "conv1", 32)) == (32, 2.0, 0.5)
    vgg = build_backbone("vgg16", 3, "random")
    assert tuple(layer_grid(vgg, "conv5_3", 224)) == (224, 16.0, 8.0)  # 2x2 max pools: cell centres
    assert layer_grid(nn.Conv2d(3, 3, 3), "layer", 32) is None  # a model that does not say where its layers are


def test_cam_store_paste_modes(tmp_path, toy_data):
    """The store pastes on the layer's grid by default and records it; ``paste="resize"`` is the former stores'
    behaviour (their digest unchanged), and the two differ on a padded-conv network."""
    paths, selected, _ = toy_data
    net = tiny_classifier()
    entries = click_entries(selected, ("a", "b", "c"))
    kw = dict(images_per_part=2, batch_size=4, progress=False)
    grid = write_cam_store(net, entries, paths, tmp_path / "grid", **kw)
    old = write_cam_store(net, entries, paths, tmp_path / "resize", paste="resize", **kw)
    assert read_json(tmp_path / "grid" / "summary.json")["paste"] == "grid"
    assert "paste" not in read_json(tmp_path / "resize" / "summary.json")
    e = entries[0]
    assert not np.allclose(grid.load(e.entry_id)[0], old.load(e.entry_id)[0], atol=1e-3)
    with pytest.raises(ValueError, match="unknown paste mode"):
        write_cam_store(net, entries, paths, tmp_path / "bad", paste="nearest", **kw)


def _contents(store: CamStore):
    out = {}
    for cid in store.click_ids():
        m, meta = store.load(cid)
        out[cid] = (m, {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in meta.items()})
    return out


def test_store_content_equals_direct_computation(tmp_path, toy_data):
    paths, selected, _ = toy_data
    net = tiny_classifier()
    entries = click_entries(selected, ("a", "b", "c"))
    store = write_cam_store(net, entries, paths, tmp_path / "cams", images_per_part=2, batch_size=4,
                            inspect_images=1, progress=False)
    assert sorted(store.click_ids()) == sorted(selected.click_id.unique())
    assert sorted(p.name for p in (tmp_path / "cams").glob("cams-*.h5")) == [
        "cams-00000.h5", "cams-00001.h5", "cams-00002.h5"]
    from pipeline.imageio import read_image

    with SACAM(net) as cam:
        for e in entries:
            img = read_image(paths[e.image_id])
            maps = cam(extract_crops(img, e.crops, 32, net.mean, net.std), [e.class_index] * len(e.crops))
            want = paste_and_fuse(maps, e.crops, img.shape[:2], grid=layer_grid(net, "conv2", 32))
            got, meta = store.load(e.entry_id)
            assert got.shape == img.shape[:2] and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * want.max())  # float16 storage
            assert meta["image_id"] == e.image_id and meta["class"] == e.cls and meta["kind"] == "click"
            assert meta["class_index"] == ("a", "b", "c").index(e.cls)
            np.testing.assert_array_equal(meta["crops"], e.crops)
            assert (meta["x"], meta["y"]) == (e.x, e.y)
            crop_maps = store.load_crop_maps(e.entry_id)
            if e.image_id == "im0":  # inspection mode: first image keeps each crop's map
                np.testing.assert_allclose(crop_maps, maps.numpy(), rtol=2e-3, atol=2e-3 * float(maps.max()))
            else:
                assert crop_maps is None
            with torch.no_grad():
                logits = net(extract_crops(img, e.crops, 32, net.mean, net.std))
            probs = torch.softmax(logits, 1)[:, meta["class_index"]].numpy()
            np.testing.assert_allclose(meta["crop_probs"], probs, rtol=1e-4, atol=1e-6)
    with h5py.File(tmp_path / "cams" / "cams-00000.h5") as f:
        assert f.attrs["format"] == 2 and json.loads(f.attrs["layers"]) == ["conv2"]
        ds = f["0"]["maps"]["conv2"]  # layout of pipeline.cam_store, format 2
        assert ds.dtype == np.float16 and ds.compression == "gzip" and ds.chunks is not None
    idx = pd.read_csv(tmp_path / "cams" / "index.csv")
    assert len(idx) == selected.click_id.nunique() and set(idx.n_crops) == {3}


def test_resume_after_kill_gives_same_content(tmp_path, toy_data, monkeypatch):
    paths, selected, _ = toy_data
    net = tiny_classifier()
    entries = click_entries(selected, ("a", "b", "c"))
    kw = dict(images_per_part=2, batch_size=3, progress=False)
    full = _contents(write_cam_store(net, entries, paths, tmp_path / "full", **kw))

    work = tmp_path / "work"
    write_cam_store(net, entries, paths, work, stop_after_parts=1, **kw)  # killed after one part
    assert [p.name for p in work.glob("cams-*.h5")] == ["cams-00000.h5"] and not (work / "index.csv").exists()
    # killed in the middle of the next part (after its first entry was stored): nothing half-written is left behind
    calls = {"n": 0}
    real = cam_writer._store_entry

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(cam_writer, "_store_entry", dying)
    with pytest.raises(KeyboardInterrupt):
        write_cam_store(net, entries, paths, work, **kw)
    monkeypatch.setattr(cam_writer, "_store_entry", real)
    assert sorted(p.name for p in work.iterdir()) == ["cams-00000.h5", "plan.json"]
    partial = CamStore(work)  # an unfinished store is readable too
    assert set(partial.click_ids()) < set(full)
    mtime = (work / "cams-00000.h5").stat().st_mtime_ns
    resumed = _contents(write_cam_store(net, entries, paths, work, **kw))
    assert (work / "cams-00000.h5").stat().st_mtime_ns == mtime  # the finished part was not recomputed
    assert resumed.keys() == full.keys()
    for cid, (m, meta) in full.items():
        np.testing.assert_array_equal(resumed[cid][0], m)
        assert resumed[cid][1] == meta
    # a different plan (other crops) invalidates the old parts instead of mixing them in
    entries[0].crops = entries[0].crops[:2]
    again = write_cam_store(net, entries, paths, work, **kw)
    assert again.load(entries[0].entry_id)[1]["crops"].shape == (2, 4)


def test_image_level_mode(tmp_path, toy_data):
    paths, _, sizes = toy_data
    labels = pd.DataFrame({"image_id": ["im0", "im0", "im0", "im3"], "class": ["b", "a", "b", "c"]})
    entries = image_entries(labels, sizes, ("a", "b", "c"))
    assert [(e.entry_id, e.image_id, e.cls, e.kind) for e in entries] == [
        (0, "im0", "a", "image"), (1, "im0", "b", "image"), (2, "im3", "c", "image")]
    net = tiny_classifier()
    store = write_cam_store(net, entries, paths, tmp_path / "img", progress=False)
    m, meta = store.load(2)
    w, h = sizes["im3"]
    assert m.shape == (h, w) and meta["kind"] == "image" and np.isnan(meta["x"])
    np.testing.assert_array_equal(meta["crops"], [[0, 0, w, h]])
    m0, _ = store.load(0)
    m1, _ = store.load(1)
    assert not np.allclose(m0, m1)  # per-class maps of the same image differ


def test_fused_maps_average_stores_and_count_partial_clicks(tmp_path, toy_data):
    """FusedMaps: one store's map as stored; several stores' maps each scaled to max 1 and averaged
    (ensemble_map), a store without the click left out and the click counted in ``partial``."""
    paths, selected, sizes = toy_data
    entries = click_entries(selected, ("a", "b", "c"))
    kw = dict(images_per_part=2, batch_size=4, progress=False)
    a = write_cam_store(tiny_classifier(), entries, paths, tmp_path / "a", **kw)
    b = write_cam_store(tiny_classifier(seed=1), [e for e in entries if e.image_id != "im0"], paths,
                        tmp_path / "b", **kw)
    clicks = selected.drop_duplicates("click_id")[["click_id", "image_id", "class", "x", "y"]]
    clicks = pd.concat([clicks, pd.DataFrame([(99, "im4", "a", 12.0, 12.0)], columns=clicks.columns)])
    with FusedMaps([a]) as one:
        fused, used, meta = one.load(entries[0].entry_id)
        np.testing.assert_array_equal(fused, a.load(entries[0].entry_id)[0])
        assert used == 1 and (meta["entry_id"], meta["image_id"]) == (entries[0].entry_id, entries[0].image_id)
        assert one.load(99) == (None, 0, None)
    maps = FusedMaps([a, b])
    in_b = [e.entry_id for e in entries if e.image_id != "im0"]
    only_a = [e.entry_id for e in entries if e.image_id == "im0"]
    assert in_b and only_a
    fused, used, meta = maps.load(in_b[0])
    np.testing.assert_array_equal(fused, ensemble_map([a.load(in_b[0])[0], b.load(in_b[0])[0]])[0])
    assert used == 2 and meta["entry_id"] == in_b[0]
    fused, used, _ = maps.load(only_a[0])
    np.testing.assert_allclose(fused, a.load(only_a[0])[0] / a.load(only_a[0])[0].max())
    assert used == 1
    np.testing.assert_array_equal(maps.load_map(only_a[0]), fused)
    assert maps.partial == 0  # load() does not count: only the clicks of items()
    items, total = maps.items(clicks)
    got = list(items)
    assert total == len(clicks) == len(got) and [i for i, _, _ in got] == [int(c) for c in clicks.click_id]
    assert got[-1][1] is None and got[-1][2] == {"image_id": "im4", "class": "a", "x": 12.0, "y": 12.0}
    assert maps.partial == len(only_a)  # click 99 has no map anywhere: missing, not partial
    with maps:
        maps.load(in_b[0])
    assert not a._files and not b._files  # closed on exit
    # image-label-only stores: the main store's entries, whatever the clicks
    labels = pd.DataFrame({"image_id": ["im0", "im3"], "class": ["b", "c"]})
    img = write_cam_store(tiny_classifier(), image_entries(labels, sizes, ("a", "b", "c")), paths,
                          tmp_path / "img", progress=False)
    with FusedMaps([img]) as maps:
        assert maps.image_mode
        items, total = maps.items(clicks)
        assert total == 2 and [(i, meta["kind"]) for i, _, meta in items] == [(0, "image"), (1, "image")]
    with pytest.raises(ValueError, match="no CAM stores"):
        FusedMaps([])


@pytest.mark.slow
def test_generate_cams_stage_on_tiny_synthetic_run(outputs, tmp_path):
    """The luigi chain PrepareDataset -> ... -> TrainClassifier -> GenerateCAMs on a 5-image synthetic set."""
    import luigi

    from pipeline.dataset import Manifest
    from tasks.cams import GenerateCAMs

    common = dict(synth_trainval=5, synth_test=1, synth_image_px=96, data_root=str(tmp_path / "data"),
                  classifier_weights="random", classifier_epochs=1, classifier_input_px=48, ss_shards=1,
                  ss_splits=["trainval"], classifier_workers=0, cam_images_per_part=2, cam_inspect_images=1)
    task = GenerateCAMs(**common)
    res = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status.name == "SUCCESS", res.summary_text
    selected = pd.read_parquet(task.input_dir("selection") / "selected.parquet")
    clicks = Manifest.load(task.find_upstream("PrepareDataset").output().path).clicks
    with CamStore(task.stage_dir) as store:
        assert sorted(store.click_ids()) == sorted(clicks.click_id) == sorted(selected.click_id.unique())
        for cid in store.click_ids():
            m, meta = store.load(cid)
            rows = selected[selected.click_id == cid].sort_values("rank")
            np.testing.assert_array_equal(meta["crops"], rows[["x1", "y1", "x2", "y2"]].to_numpy(np.float32))
            assert meta["class"] == rows["class"].iloc[0] and np.isfinite(m).all() and m.min() >= 0
        assert sum(store.load_crop_maps(c) is not None for c in store.click_ids()) >= 1
        assert store.layers == ["stage5_expand", "stage6"]
        cid = store.click_ids()[0]
        m5, m6 = store.with_layer("stage5_expand").load(cid)[0], store.with_layer("stage6").load(cid)[0]
        assert m5.shape == m6.shape and not np.array_equal(m5, m6)
    summary = json.loads((task.stage_dir / "summary.json").read_text())
    # the default layers, tasks.defaults.TUNED.cam_layers, in one store
    assert summary["method"] == "sacam" and summary["layers"] == ["stage5_expand", "stage6"]
    assert summary["crop_size"] == 48
    assert summary["crops"] == len(selected)


def test_cam_object_leaves_other_forward_passes_alone():
    net, relu, _ = tiny_net()
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(5))
    cam = SACAM(net, target_layer=relu)
    with torch.no_grad():
        y = net(x)
        assert not torch.is_grad_enabled() and not y.requires_grad  # the hook is inactive outside cam()
    cam(x, [0, 1])
    assert torch.is_grad_enabled()
    cam.release()
    assert not relu._forward_hooks
