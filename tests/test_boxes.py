"""Pseudo box construction on hand-made maps (pipeline/boxes.py)."""
import numpy as np
import pandas as pd
import pytest

from pipeline.boxes import (BoxParams, box_from_cam, box_from_image_cam, cam_threshold, classes_per_image,
                            ensemble_map, fallback_counts, normalize_map, pseudo_boxes_from_cams, rank1_proposals,
                            voronoi_cell)
from pipeline.clicks import other_clicks


def block_map(h=40, w=60, blocks=((10, 20, 20, 40, 1.0),)):
    """Zeros with constant blocks (r0, r1, c0, c1, value), r1/c1 exclusive."""
    m = np.zeros((h, w), np.float32)
    for r0, r1, c0, c1, v in blocks:
        m[r0:r1, c0:c1] = v
    return m


# region: columns 20..39 -> [20, 40), rows 10..19 -> [10, 20); click (25, 12): L=5, R=15, up=2, down=8
@pytest.mark.parametrize("mode,expected", [
    ("max", (10.0, 4.0, 40.0, 20.0)),
    ("mean", (15.0, 7.0, 35.0, 17.0)),
    ("min", (20.0, 10.0, 30.0, 14.0)),
    ("none", (20.0, 10.0, 40.0, 20.0)),
])
def test_symmetry_modes(mode, expected):
    res = box_from_cam(block_map(), 25.0, 12.0, params=BoxParams(symmetry=mode))
    assert res.status == "ok"
    assert res.box == pytest.approx(expected)
    if mode != "none":  # centro-symmetric about the click
        x1, y1, x2, y2 = res.box
        assert (x1 + x2) / 2 == pytest.approx(25.0) and (y1 + y2) / 2 == pytest.approx(12.0)


def test_fractional_click_and_score():
    res = box_from_cam(block_map(), 25.5, 12.5, params=BoxParams(symmetry="max"))
    # L = 5.5, R = 14.5 -> hw 14.5; up 2.5, down 7.5 -> hh 7.5
    assert res.box == pytest.approx((11.0, 5.0, 40.0, 20.0))
    # box covers 29 x 15 = 435 pixels, of which the 20 x 10 region is at 255
    assert res.score == pytest.approx(200 / 435)
    exact = box_from_cam(block_map(), 25.0, 12.0, params=BoxParams(symmetry="none"))
    assert exact.score == pytest.approx(1.0)
    region = box_from_cam(block_map(), 25.0, 12.0, params=BoxParams(symmetry="max", score="region_mean"))
    assert region.score == pytest.approx(1.0)
    peak = box_from_cam(block_map() * 7.0, 25.0, 12.0, params=BoxParams(score="raw_peak"))
    assert peak.score == pytest.approx(7.0)


def test_clipped_to_image():
    m = block_map(blocks=((0, 30, 0, 30, 1.0),))
    # click (2, 27): L=2, R=28 -> hw 28 -> [-26, 30] clipped to [0, 30]; up=27, down=3 -> hh 27 -> [0, 54]->[0, 40]
    res = box_from_cam(m, 2.0, 27.0, params=BoxParams(symmetry="max"))
    assert res.box == pytest.approx((0.0, 0.0, 30.0, 40.0))
    res = box_from_cam(m, 2.0, 27.0, params=BoxParams(symmetry="min"))
    assert res.box == pytest.approx((0.0, 24.0, 4.0, 30.0))


def test_click_picks_its_own_region_not_the_largest():
    m = block_map(blocks=((5, 35, 2, 30, 1.0), (10, 20, 40, 50, 0.9)))
    res = box_from_cam(m, 45.0, 15.0, params=BoxParams(symmetry="none"))
    assert res.box == pytest.approx((40.0, 10.0, 50.0, 20.0))
    # the no-click baseline takes the largest region instead
    base = box_from_image_cam(m, params=BoxParams())
    assert base.box == pytest.approx((2.0, 5.0, 30.0, 35.0))


def test_click_outside_every_region_takes_nearest():
    m = block_map(blocks=((10, 20, 20, 40, 1.0), (30, 38, 50, 58, 1.0)))
    # click (5, 15) is nearest to the first region (distance 15 vs ~45)
    res = box_from_cam(m, 5.0, 15.0, params=BoxParams(symmetry="none"))
    assert res.box == pytest.approx((20.0, 10.0, 40.0, 20.0))
    # symmetric "max": left side empty (0), right side 40 - 5 = 35 -> [-30, 40] -> clipped [0, 40]
    res = box_from_cam(m, 5.0, 15.0, params=BoxParams(symmetry="max"))
    assert res.box == pytest.approx((0.0, 10.0, 40.0, 20.0))
    # "min" of an empty side gives no width: degenerate
    res = box_from_cam(m, 5.0, 15.0, params=BoxParams(symmetry="min"))
    assert res.status == "degenerate" and res.box is None


def test_threshold_rules():
    # strong block (255 after normalising) cols 10..19, weak block (0.4 -> 102) cols 20..29, same rows
    m = block_map(blocks=((10, 20, 10, 20, 1.0), (10, 20, 20, 30, 0.4)))
    none = BoxParams(symmetry="none")
    assert box_from_cam(m, 12, 15, n_image_classes=1, params=none).box == pytest.approx((10, 10, 30, 20))  # T=80
    assert box_from_cam(m, 12, 15, n_image_classes=2, params=none).box == pytest.approx((10, 10, 20, 20))  # T=120
    assert box_from_cam(m, 12, 15, n_image_classes=3, params=none).threshold == 120
    fixed = BoxParams(threshold_rule="fixed", threshold_value=110, symmetry="none")
    assert box_from_cam(m, 12, 15, n_image_classes=1, params=fixed).box == pytest.approx((10, 10, 20, 20))
    frac = BoxParams(threshold_rule="fraction", threshold_value=0.3, symmetry="none")  # 76.5
    assert box_from_cam(m, 12, 15, n_image_classes=5, params=frac).box == pytest.approx((10, 10, 30, 20))
    assert cam_threshold("fraction", 0.5) == pytest.approx(127.5)
    assert cam_threshold("paper", n_image_classes=1) == 80 and cam_threshold("paper", n_image_classes=2) == 120


def test_normalize_map():
    norm, status = normalize_map(np.array([[1.0, 3.0], [2.0, 5.0]]))
    assert status == "ok"
    np.testing.assert_allclose(norm, [[0, 127.5], [63.75, 255]])
    assert normalize_map(np.zeros((4, 4)))[1] == "empty"
    assert normalize_map(np.full((4, 4), 2.0))[1] == "empty"
    assert normalize_map(np.full((4, 4), -1.0))[1] == "empty"
    bad = np.ones((4, 4))
    bad[1, 1] = np.nan
    assert normalize_map(bad)[1] == "nonfinite"
    with pytest.raises(ValueError):
        normalize_map(np.ones((2, 2, 3)))


def test_params_validation():
    with pytest.raises(ValueError, match="threshold_rule"):
        BoxParams(threshold_rule="otsu")
    with pytest.raises(ValueError, match="fixed"):
        BoxParams(threshold_rule="fixed")
    with pytest.raises(ValueError, match="fraction"):
        BoxParams(threshold_rule="fraction", threshold_value=2.0)
    with pytest.raises(ValueError, match="symmetry"):
        BoxParams(symmetry="median")
    with pytest.raises(ValueError, match="score"):
        BoxParams(score="area")


def test_many_clicks_with_fallbacks_counted():
    good = block_map()
    nan_map = good.copy()
    nan_map[0, 0] = np.nan
    items = [
        (0, good, {"image_id": "a", "class": "cat", "x": 25, "y": 12}),
        (1, np.zeros((40, 60), np.float32), {"image_id": "a", "class": "dog", "x": 5, "y": 5}),
        (2, nan_map, {"image_id": "b", "class": "cat", "x": 25, "y": 12}),
        (3, None, {"image_id": "b", "class": "cat", "x": 30, "y": 30}),
        (4, block_map(blocks=((10, 20, 20, 40, 1.0),)), {"image_id": "c", "class": "cat", "x": 5, "y": 15}),
    ]
    selected = pd.DataFrame({
        "click_id": [0, 1, 1, 2, 3, 4, 4],
        "rank": [0, 1, 0, 0, 0, 0, 1],
        "x1": [1.0, 9.0, 2.0, 3.0, 4.0, 10.0, 0.0],
        "y1": [1.0, 9.0, 2.0, 3.0, 4.0, 5.0, 0.0],
        "x2": [11.0, 19.0, 12.0, 13.0, 14.0, 30.0, 60.0],
        "y2": [11.0, 19.0, 12.0, 13.0, 14.0, 25.0, 40.0],
    })
    fb = rank1_proposals(selected)
    assert fb.loc[1].tolist() == [2.0, 2.0, 12.0, 12.0]
    n_cls = classes_per_image(pd.DataFrame({"image_id": ["a", "a", "b", "c"], "class": ["cat", "dog", "cat", "cat"]}))
    assert n_cls == {"a": 2, "b": 1, "c": 1}
    df = pseudo_boxes_from_cams(items, fb, n_cls, BoxParams(symmetry="min"))
    assert df["status"].tolist() == ["ok", "empty", "nonfinite", "missing", "degenerate"]
    assert df["fallback"].tolist() == [False, True, True, True, True]
    assert df.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [20.0, 10.0, 30.0, 14.0]
    assert df.loc[0, "threshold"] == 120 and df.loc[2, "threshold"] == 80  # image a has 2 classes
    assert df.loc[1, ["x1", "y1", "x2", "y2"]].tolist() == [2.0, 2.0, 12.0, 12.0]
    assert df.loc[4, ["x1", "y1", "x2", "y2"]].tolist() == [10.0, 5.0, 30.0, 25.0]
    # a fallback box is scored on the map when the map is usable: the region covers 10 x 10 of its 20 x 20
    assert df.loc[4, "score"] == pytest.approx(100 / 400)
    assert df.loc[1, "score"] == 0.0 and df.loc[3, "score"] == 0.0
    counts = fallback_counts(df)
    assert counts["fallback"] == 4 and counts["n"] == 5 and counts["fallback_rate"] == pytest.approx(0.8)
    assert counts["by_status"] == {"ok": 1, "empty": 1, "nonfinite": 1, "missing": 1, "degenerate": 1}


def test_fallback_without_proposal_is_an_error():
    items = [(7, np.zeros((8, 8), np.float32), {"image_id": "z", "class": "cat", "x": 1, "y": 1})]
    empty = rank1_proposals(pd.DataFrame(columns=["click_id", "rank", "x1", "y1", "x2", "y2"]))
    with pytest.raises(ValueError, match="click 7"):
        pseudo_boxes_from_cams(items, empty, {})


def test_map_size_must_match_image():
    items = [(0, block_map(), {"image_id": "a", "class": "cat", "x": 25, "y": 12})]
    fb = pd.DataFrame({"x1": [0.0], "y1": [0.0], "x2": [5.0], "y2": [5.0]}, index=pd.Index([0], name="click_id"))
    assert len(pseudo_boxes_from_cams(items, fb, {}, image_sizes={"a": (60, 40)})) == 1
    with pytest.raises(ValueError, match="fused map is 60x40 but the image is 40x60"):
        pseudo_boxes_from_cams(items, fb, {}, image_sizes={"a": (40, 60)})


def test_image_cam_baseline_empty():
    res = box_from_image_cam(np.zeros((10, 10), np.float32))
    assert res.status == "empty" and res.box is None


def test_image_label_only_entries():
    m = block_map(blocks=((5, 35, 2, 30, 1.0), (10, 20, 40, 50, 0.9)))
    items = [(0, m, {"image_id": "a", "class": "cat", "x": float("nan"), "y": float("nan"), "kind": "image"}),
             (1, np.zeros((40, 60), np.float32), {"image_id": "a", "class": "dog", "x": float("nan"),
                                                  "y": float("nan"), "kind": "image"})]
    empty = rank1_proposals(pd.DataFrame(columns=["click_id", "rank", "x1", "y1", "x2", "y2"]))
    df = pseudo_boxes_from_cams(items, empty, {"a": 2})
    assert df.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [2.0, 5.0, 30.0, 35.0]  # largest region
    assert df.loc[1, ["x1", "y1", "x2", "y2"]].tolist() == [0.0, 0.0, 60.0, 40.0]  # fallback: whole image
    assert df["fallback"].tolist() == [False, True] and df["click_id"].tolist() == [-1, -1]


def test_voronoi_cell_by_pixel_centres():
    # 1 x 6 row, clicks at x = 1 and x = 4: pixel centres 0.5 .. 5.5; the tie at 2.5 (1.5 from both) stays in
    cell = voronoi_cell((1, 6), 1.0, 0.5, np.array([[4.0, 0.5]]))
    assert cell.tolist() == [[True, True, True, False, False, False]]
    other = voronoi_cell((1, 6), 4.0, 0.5, np.array([[1.0, 0.5]]))
    assert other.tolist() == [[False, False, True, True, True, True]]
    assert voronoi_cell((2, 3), 1.0, 1.0, np.zeros((0, 2))).all()


def test_partition_keeps_a_click_off_its_neighbours_region():
    # two same-class instances whose maps touch: one block over columns 10..49, clicks at x = 15 and x = 45.
    # The cell of (15, 15) ends at x = 30 (pixel centres <= 30), so the region is [10, 30) x [10, 20).
    m = block_map(blocks=((10, 20, 10, 50, 1.0),))
    others = np.array([[45.0, 15.0]])
    merged = box_from_cam(m, 15.0, 15.0, params=BoxParams(symmetry="none", partition="none"), others=others)
    assert merged.box == pytest.approx((10.0, 10.0, 50.0, 20.0))
    own = box_from_cam(m, 15.0, 15.0, params=BoxParams(symmetry="none", partition="same_class"), others=others)
    assert own.box == pytest.approx((10.0, 10.0, 30.0, 20.0))
    broken = m.copy()
    broken[15, 45] = np.inf  # in the neighbour's cell: still a broken map, not cut away
    assert box_from_cam(broken, 15.0, 15.0, params=BoxParams(), others=others).status == "nonfinite"
    sym = box_from_cam(m, 15.0, 15.0, params=BoxParams(symmetry="max", partition="same_class"), others=others)
    assert sym.box == pytest.approx((0.0, 10.0, 30.0, 20.0))  # L = 5, R = 15 -> hw 15, clipped at 0
    # a weak instance next to a strong one: the whole-map normalisation puts it under T = 60 (0.2 -> 51) and the
    # click's nearest region is the neighbour; inside its own cell it is normalised to 255 and found
    m = block_map(blocks=((10, 20, 5, 20, 0.2), (10, 20, 40, 55, 1.0)))
    params = BoxParams("fixed", 60.0, symmetry="none", partition="same_class")
    assert box_from_cam(m, 12.0, 15.0, params=params).box == pytest.approx((40.0, 10.0, 55.0, 20.0))
    assert box_from_cam(m, 12.0, 15.0, params=params, others=np.array([[47.0, 15.0]])).box == \
        pytest.approx((5.0, 10.0, 20.0, 20.0))


@pytest.mark.parametrize("partition,expected_x2", [("same_class", 30.0), ("all", 20.0), ("none", 50.0)])
def test_partition_modes_pick_the_other_clicks(partition, expected_x2):
    clicks = pd.DataFrame({"click_id": [1, 2, 3, 4], "image_id": ["a", "a", "a", "b"],
                           "class": ["cat", "cat", "dog", "cat"], "x": [15.0, 45.0, 25.0, 45.0],
                           "y": [15.0, 15.0, 15.0, 15.0]})
    by_image = {k: g for k, g in clicks.groupby("image_id")}
    o = other_clicks(by_image["a"], 1, "cat", partition)
    expected = {"same_class": [[45.0, 15.0]], "all": [[45.0, 15.0], [25.0, 15.0]], "none": None}[partition]
    assert (o is None and expected is None) or sorted(o.tolist()) == sorted(expected)
    m = block_map(blocks=((10, 20, 10, 50, 1.0),))
    items = [(1, m, {"image_id": "a", "class": "cat", "x": 15.0, "y": 15.0})]
    df = pseudo_boxes_from_cams(items, rank1_proposals(pd.DataFrame(columns=["click_id", "rank", "x1", "y1", "x2",
                                                                              "y2"])),
                                {}, BoxParams(symmetry="none", partition=partition), clicks=clicks)
    # same_class: cut at x = 30 (cat at 45); all: also the dog at 25 -> cut at 20; none: the whole block
    assert df.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [10.0, 10.0, expected_x2, 20.0]
    assert not df.loc[0, "fallback"]


def test_partition_param_is_validated():
    with pytest.raises(ValueError, match="partition"):
        BoxParams(partition="voronoi")


# -- --cam-ensemble: the mean of several classifiers' maps -------------------------------------------------------
def test_ensemble_map_scales_each_member_to_max_one():
    a = block_map(blocks=((10, 20, 20, 40, 4.0), (10, 20, 40, 50, 2.0)))  # peak 4: scaled to 1 and 0.5
    b = block_map(blocks=((10, 20, 40, 50, 0.01),))  # a tiny-magnitude member counts as much: 1 on [40, 50)
    m, used = ensemble_map([a, b])
    assert used == 2 and m.dtype == np.float32 and m.shape == a.shape
    assert m[15, 30] == pytest.approx(0.5) and m[15, 45] == pytest.approx(0.75) and m[0, 0] == 0
    # normalised, [20, 40) is 170 and [40, 50) 255: at 0.8 of the max only the block b agrees on is left, while
    # a alone (255 and 127.5) keeps both blocks at 0.4
    res = box_from_cam(m, 45.0, 15.0, params=BoxParams("fraction", 0.8, symmetry="none"))
    assert res.box == (40.0, 10.0, 50.0, 20.0)
    assert box_from_cam(a, 45.0, 15.0, params=BoxParams("fraction", 0.4, symmetry="none")).box == (20.0, 10.0, 50.0,
                                                                                                   20.0)


def test_ensemble_map_leaves_out_unusable_members():
    a = block_map(blocks=((10, 20, 20, 40, 2.0),))
    nan = a.copy()
    nan[0, 0] = np.nan
    m, used = ensemble_map([a, None, nan, np.zeros_like(a)])
    np.testing.assert_allclose(m, a / 2)
    assert used == 1
    assert ensemble_map([None, np.zeros_like(a)]) == (None, 0)
    assert ensemble_map([]) == (None, 0)
    with pytest.raises(ValueError, match="shape"):
        ensemble_map([a, a[:, :-1]])
