"""Seeds 003 / 004: the pooling heads (hand computations of GMP, GAP and SPAM and of SPAM's gradient, Eq. 3), the
single-pass CAM, and boxes from hand-built maps (peaks, mountains, back-projection with the ratio r, contours)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.extent import auto_ratio, backproject, extent_boxes, mountains, receptive_field
from pipeline.pooling import (CamPoolHead, cam_forward, conv_layers, feature_body, gap, global_pool, gmp, spam,
                              with_cam_head)

# -- pooling -------------------------------------------------------------------------------------------------
MAP3 = torch.tensor([[1.0, 2.0, 0.0],
                     [0.0, 4.0, 0.0],
                     [0.0, 0.0, 3.0]])[None, None]


def test_gmp_gap_by_hand():
    assert gmp(MAP3).item() == 4.0
    assert gap(MAP3).item() == pytest.approx(10 / 9)
    assert global_pool(MAP3, "gmp").shape == (1, 1)


def test_spam_by_hand_3x3():
    # kernel 1: max 4; kernel 2: the 2x2 windows average 7/4, 6/4, 4/4, 7/4 -> 7/4; kernel 5 is cut to the 3x3 map and
    # N = 3: both the mean 10/9
    assert spam(MAP3).item() == pytest.approx((4 + 7 / 4 + 10 / 9 + 10 / 9) / 4)
    assert spam(MAP3, kernels=(1,)).item() == 4.0          # the pyramid's ends are GMP and GAP (Fig. 12)
    assert spam(MAP3, kernels=(0,)).item() == pytest.approx(10 / 9)


def test_spam_value_and_gradient_of_a_spike():
    """A 6x6 map, one spike of 1 at (0, 0): each step's maximum is its window over the spike, so SPAM is
    (1 + 1/4 + 1/25 + 1/36) / 4, and Eq. 3's gradient is (1/P) sum_p K_p^-2 over the steps whose chosen window
    covers the pixel."""
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 0, 0] = 1.0
    x.requires_grad_(True)
    y = spam(x)
    assert y.item() == pytest.approx((1 + 1 / 4 + 1 / 25 + 1 / 36) / 4)
    y.backward()
    g = x.grad[0, 0]
    assert g[0, 0].item() == pytest.approx((1 + 1 / 4 + 1 / 25 + 1 / 36) / 4)
    assert g[1, 1].item() == pytest.approx((1 / 4 + 1 / 25 + 1 / 36) / 4)    # in the 2x2, 5x5 and 6x6 windows
    assert g[4, 4].item() == pytest.approx((1 / 25 + 1 / 36) / 4)            # only the 5x5 and the whole map
    assert g[5, 5].item() == pytest.approx((1 / 36) / 4)                     # only the whole map


def test_spam_non_square_and_batches():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    expected = torch.stack([x.amax((-2, -1)), F.avg_pool2d(x, 2, 1).amax((-2, -1)),
                            F.avg_pool2d(x, (2, 4), 1).amax((-2, -1)), x.mean((-2, -1))]).mean(0)
    torch.testing.assert_close(spam(x), expected)
    with pytest.raises(ValueError, match="pooling must be one of"):
        global_pool(x, "lse")


# -- the CAM head and its single pass ------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["spam", "gmp"])
def test_single_pass_cam_is_the_1x1_conv_map(tiny_classifier, pooling):
    net = with_cam_head(tiny_classifier(3, seed=1), pooling, seed=2).eval()
    assert isinstance(net.head, CamPoolHead) and net.num_classes == 3 and net.feature_layer == "conv2"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores, maps = cam_forward(net, x)
    with torch.no_grad():
        direct = F.conv2d(net.body(x), net.head.conv.weight, net.head.conv.bias)  # the 1x1 conv read directly
        torch.testing.assert_close(maps, direct)
        torch.testing.assert_close(scores, net(x))            # the training output is the pooled maps
        torch.testing.assert_close(scores, global_pool(direct, pooling))
    assert maps.shape == (2, 3, 8, 8)  # conv1 and conv2 at stride 2


def test_single_pass_cam_of_a_gap_classifier(tiny_classifier):
    """Today's GAP + linear classifier: its head at every position of the last conv layer (Zhou et al.'s CAM),
    whose mean is its logit."""
    net = tiny_classifier(3, seed=1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores, maps = cam_forward(net, x)
    with torch.no_grad():
        lower, _ = net.split("conv2")
        feats = lower(x)
        w, b = net.head.weight, net.head.bias
        torch.testing.assert_close(maps[:, :, 3, 5], feats[:, :, 3, 5] @ w.T + b)
        torch.testing.assert_close(scores, net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # builds efficientnet_lite0 twice
def test_cam_head_round_trips_through_the_model_file(tmp_path):
    from pipeline.backbones import build_backbone
    from pipeline.classifier import load_classifier, save_classifier

    net = with_cam_head(build_backbone("efficientnet_lite0", 4, "random"), "spam", seed=3).eval()
    save_classifier(tmp_path / "model.pt", net, ["a", "b", "c", "d"])
    back = load_classifier(tmp_path / "model.pt", "cpu")
    assert back.pooling == "spam" and back.feature_layer == "conv_head" and isinstance(back.head, CamPoolHead)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x))
    assert conv_layers(feature_body(back))[0] == (3, 2, 1)  # the stem's 3x3 stride-2 conv comes first


# -- boxes from maps ---------------------------------------------------------------------------------------
def two_blob_map() -> np.ndarray:
    """8x8, not activated (-0.1) but for blob A (peak 1.0 at (2, 2), a low shoulder 0.05 at (1, 3)) and blob B
    (peak 0.6 at (6, 6))."""
    m = np.full((8, 8), -0.1, np.float32)
    m[1:3, 1:3] = [[0.5, 0.7], [0.8, 1.0]]
    m[1, 3] = 0.05
    m[5:7, 5:7] = [[0.3, 0.4], [0.5, 0.6]]
    return m


def test_mountains_of_two_blobs():
    labels, peaks = mountains(two_blob_map())
    assert sorted(peaks.tolist()) == pytest.approx([0.6, 1.0])
    a, b = labels[2, 2], labels[6, 6]
    assert a != b and a > 0 and b > 0
    assert labels[1, 3] == a                     # the shoulder below any threshold is part of A's mountain
    assert (labels > 0).sum() == 9 and labels[0, 0] == 0


def test_two_blobs_two_boxes_and_the_threshold():
    # one layer of kernel 4, stride 4: a map pixel back-projects onto its own 4x4 cell of the 32x32 input; the
    # image is 64 x 32, so x doubles
    layers = [(4, 4, 0)]
    boxes = extent_boxes(two_blob_map(), layers, (32, 32), (64, 32), threshold=128)
    assert [b.box for b in boxes] == [(8.0, 4.0, 32.0, 12.0), (40.0, 20.0, 56.0, 28.0)]
    assert boxes[0].score == pytest.approx(1.0)
    assert boxes[1].score == pytest.approx(0.7 / 1.1)                # B's peak on the min-max scale
    only_a = extent_boxes(two_blob_map(), layers, (32, 32), (64, 32), threshold=200)  # B's peak: 162 < 200
    assert [b.box for b in only_a] == [(8.0, 4.0, 32.0, 12.0)]
    assert extent_boxes(np.full((8, 8), -1.0, np.float32), layers, (32, 32), (64, 32), threshold=50) == []


def test_backprojection_and_the_ratio():
    layers = [(8, 4, 2)]  # x0 = 4x - 2, x1 = 4x + 5: 8 px fields with a stride of 4
    x0, x1 = receptive_field(np.array([2]), layers)
    assert (x0[0], x1[0]) == (6, 13)
    assert auto_ratio(layers) == pytest.approx(0.5)
    full = backproject(np.array([[2, 2]]), layers, (32, 32), ratio=0.0)
    assert np.argwhere(full.any(0)).ravel().tolist() == list(range(6, 14))
    half = backproject(np.array([[2, 2]]), layers, (32, 32), ratio=0.5)   # each side in by 8 * 0.5 / 2 = 2
    assert np.argwhere(half.any(0)).ravel().tolist() == list(range(8, 12))
    assert half.sum() == 16 and full.sum() == 64
    edge = backproject(np.array([[0, 0]]), layers, (32, 32), ratio=0.0)    # clipped to the input
    assert edge.sum() == 36
    m = np.full((8, 8), -1.0, np.float32)
    m[2, 2] = 1.0
    assert [b.box for b in extent_boxes(m, layers, (32, 32), (32, 32), 128, ratio=0.0)] == [(6.0, 6.0, 14.0, 14.0)]
    assert [b.box for b in extent_boxes(m, layers, (32, 32), (32, 32), 128, ratio=0.5)] == [(8.0, 8.0, 12.0, 12.0)]
    with pytest.raises(ValueError, match="ratio r"):
        backproject(np.array([[0, 0]]), layers, (32, 32), ratio=1.0)


def test_two_layer_receptive_field_by_hand():
    # conv 3x3 s1 p1, then conv 3x3 s2 p1: position x of the second covers 2x - 1 - 1 .. 2x - 1 + 2 + 1
    x0, x1 = receptive_field(np.array([0, 3]), [(3, 1, 1), (3, 2, 1)])
    assert x0.tolist() == [-2, 4] and x1.tolist() == [2, 8]


def test_upsampled_map_puts_each_value_at_its_receptive_field_centre():
    """Two 3x3 stride-2 convolutions padded by 1: position x is centred on input pixel 4x (continuous 4x + 0.5), so
    on a 16 px image squashed from a 16 px input, the map's value at position (1, 2) lands on pixel (row 4, col 8),
    and between two positions the image is the linear interpolation."""
    from pipeline.extent import grid
    from pipeline.proposal_free import upsample_map

    layers = [(3, 2, 1), (3, 2, 1)]
    assert grid(layers) == (4, 0.5)
    cam = np.zeros((4, 4), np.float32)
    cam[1, 2] = 1.0
    up = upsample_map(cam, 16, 16, layers, 16)
    assert up.shape == (16, 16) and up[4, 8] == pytest.approx(1.0)
    assert up[4, 10] == pytest.approx(0.5) and up[6, 8] == pytest.approx(0.5)   # half-way to the next positions
    assert np.unravel_index(up.argmax(), up.shape) == (4, 8)
    # x stretched twice: the centre (input 8.5) falls between image pixels 16 and 17, each 1/16 position away
    wide = upsample_map(cam, 32, 16, layers, 16)
    assert wide[4, 16] == pytest.approx(15 / 16) and wide[4, 17] == pytest.approx(15 / 16)
