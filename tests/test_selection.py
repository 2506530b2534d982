"""Stage 2: click-guided proposal selection on hand-made proposal sets."""
import numpy as np
import pandas as pd
import pytest

from pipeline.proposals import ProposalStore, write_proposal_store
from pipeline.selection import (SELECTED_COLUMNS, contains_click, fallback_windows, greedy_nms_ranked,
                                rank_by_center_distance, select_for_click, select_proposals)

# click at (50, 50) in a 200 x 200 image
A = [40, 40, 60, 60]     # center (50, 50): distance 0
D = [0, 0, 100, 100]     # center (50, 50): distance 0, after A in the input -> ties keep input order
B = [30, 30, 72, 72]     # center (51, 51): distance 1.41; IoU(A, B) = 400 / 1764 = 0.23
C = [41, 41, 61, 61]     # center (51, 51): distance 1.41; IoU(A, C) = 361 / 439 = 0.82 > 0.7 -> dropped
E = [60, 60, 90, 90]     # does not contain the click
F = [45, 0, 55, 200]     # center (50, 100): distance 50
G = [0, 45, 200, 55]     # center (100, 50): distance 50, after F in the input
H = [0, 0, 100, 70]      # center (50, 35): distance 15; IoU(D, H) = 7000 / 10000 = 0.70 exactly -> kept
K = [50, 50, 80, 80]     # click on its corner (borders count as inside); center (65, 65): distance 21.2
PROPOSALS = np.array([G, E, C, F, B, D, A, H, K], np.float32)


def test_contains_click_borders_included():
    np.testing.assert_array_equal(contains_click(PROPOSALS, 50, 50), [1, 0, 1, 1, 1, 1, 1, 1, 1])
    assert not contains_click(np.array([[50.5, 0, 60, 10]]), 50, 5)[0]


def test_ranking_by_center_distance_is_stable():
    order, dist = rank_by_center_distance(np.array([D, A, B], np.float32), 50, 50)
    np.testing.assert_array_equal(order, [0, 1, 2])  # D before A: equal distance, input order
    np.testing.assert_allclose(dist, [0, 0, np.sqrt(2)])


def test_selection_gives_exact_ranks_and_nms():
    # ranking of the 8 containing boxes: D, A (equal distance: input order), C, B (likewise), H, K, G, F
    sel, fb = select_for_click(PROPOSALS, 50, 50, 200, 200, n=8, iou=0.7)
    assert not fb
    np.testing.assert_array_equal(sel, np.array([D, A, B, H, K, G, F], np.float32))  # C dropped (IoU 0.82 with A)
    top3, _ = select_for_click(PROPOSALS, 50, 50, 200, 200, n=3, iou=0.7)
    np.testing.assert_array_equal(top3, np.array([D, A, B], np.float32))
    # a stricter threshold also drops H (IoU 0.70 with D) and B (IoU 0.23 with A, > 0.2)
    strict, _ = select_for_click(PROPOSALS, 50, 50, 200, 200, n=8, iou=0.2)
    np.testing.assert_array_equal(strict, np.array([D, A, K, G, F], np.float32))


def _reference_greedy(boxes, thr):
    """Plain-Python greedy walk, for comparison only."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
    kept = []
    for i, b in enumerate(boxes):
        if all(iou(b, boxes[j]) <= thr for j in kept):
            kept.append(i)
    return kept


def test_vectorised_greedy_matches_the_definition_on_random_boxes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        xy = rng.uniform(0, 80, (60, 2))
        wh = rng.uniform(5, 60, (60, 2))
        boxes = np.round(np.hstack([xy, xy + wh]), 1).astype(np.float32)
        for thr in (0.3, 0.7):
            np.testing.assert_array_equal(greedy_nms_ranked(boxes, thr),
                                          _reference_greedy(boxes.astype(np.float64), thr))
    assert greedy_nms_ranked(np.zeros((0, 4)), 0.7).shape == (0,)


def test_fallback_windows_are_click_centred_inside_the_image():
    w = fallback_windows(50, 30, 200, 100)
    np.testing.assert_allclose(w, [[0, 0, 100, 60], [12.5, 7.5, 87.5, 52.5], [25, 15, 75, 45],
                                   [37.5, 22.5, 62.5, 37.5]])
    # click on the left border: the largest centred window is empty; it gets min_side and stays inside
    np.testing.assert_allclose(fallback_windows(0, 50, 200, 100, scales=(1.0,)), [[0, 0, 1, 100]])


def test_click_inside_no_proposal_gets_the_fallback():
    sel, fb = select_for_click(np.array([E], np.float32), 50, 30, 200, 100, n=8)
    assert fb
    np.testing.assert_allclose(sel, fallback_windows(50, 30, 200, 100))
    sel, fb = select_for_click(np.zeros((0, 4), np.float32), 50, 30, 200, 100, n=2)
    assert fb and len(sel) == 2


def test_select_proposals_table_and_report(tmp_path):
    store = ProposalStore(write_proposal_store(tmp_path / "p.h5", [
        ("img1", PROPOSALS, (200, 200)),
        ("img2", np.array([E], np.float32), (200, 100)),
    ]))
    clicks = pd.DataFrame({"click_id": [7, 3, 5], "image_id": ["img1", "img2", "img1"],
                           "class": ["cat", "dog", "cow"], "x": [50.0, 50.0, 75.0], "y": [50.0, 30.0, 75.0],
                           "annotator": 1, "object_index": [0, 0, 1]})
    table, report = select_proposals(clicks, store, n=8, iou=0.7, progress=False)
    assert list(table.columns) == SELECTED_COLUMNS
    c7 = table[table.click_id == 7]
    assert list(c7["rank"]) == list(range(7)) and (c7["class"] == "cat").all() and not c7.fallback.any()
    np.testing.assert_array_equal(c7[["x1", "y1", "x2", "y2"]].to_numpy(), np.array([D, A, B, H, K, G, F]))
    c3 = table[table.click_id == 3]
    assert c3.fallback.all() and len(c3) == 4 and (c3.image_id == "img2").all()
    np.testing.assert_allclose(c3[["x1", "y1", "x2", "y2"]].to_numpy(), fallback_windows(50, 30, 200, 100))
    # click (75, 75) is in D, E, K only: centers (50,50) d=35.4, (75,75) d=0, (65,65) d=14.1; IoU(E, K) = 0.29
    c5 = table[table.click_id == 5]
    np.testing.assert_array_equal(c5[["x1", "y1", "x2", "y2"]].to_numpy(), np.array([E, K, D]))
    assert report == {"clicks": 3, "images": 2, "crops": 14, "fallbacks": 1, "mean_crops_per_click": 14 / 3,
                      "clicks_with_fewer_than_n": 3, "mean_candidates_per_click": (8 + 0 + 3) / 3,
                      "n": 8, "iou": 0.7, "fallback_scales": [1.0, 0.75, 0.5, 0.25],
                      "exclusive": False, "clicks_sharing_class": 0, "exclusion_waived": 0}  # the paper's default
    # a dict of boxes plus sizes gives the same table
    t2, _ = select_proposals(clicks, {"img1": PROPOSALS, "img2": np.array([E])},
                             {"img1": (200, 200), "img2": (200, 100)}, progress=False)
    pd.testing.assert_frame_equal(table, t2)


def test_select_proposals_errors_name_the_problem():
    clicks = pd.DataFrame({"click_id": [0], "image_id": ["x"], "class": ["cat"], "x": [5.0], "y": [5.0]})
    with pytest.raises(KeyError, match="'x'"):
        select_proposals(clicks, {}, {}, progress=False)
    with pytest.raises(ValueError, match="outside image x"):
        select_proposals(clicks.assign(x=500.0), {"x": PROPOSALS}, {"x": (200, 200)}, progress=False)
    with pytest.raises(ValueError, match="lacks columns"):
        select_proposals(clicks.drop(columns="class"), {}, {}, progress=False)


def test_exclusive_selection_drops_proposals_holding_another_click_of_the_class(tmp_path):
    # img1: two cat clicks, (50, 50) and (75, 75); D, E, K contain (75, 75); D and K (corner) also (50, 50).
    # img3: two cat clicks that every proposal contains: the exclusion is waived, nothing changes.
    store = ProposalStore(write_proposal_store(tmp_path / "p.h5", [
        ("img1", PROPOSALS, (200, 200)), ("img3", np.array([D, A], np.float32), (200, 200))]))
    clicks = pd.DataFrame({"click_id": [1, 2, 3, 4, 5], "image_id": ["img1", "img1", "img1", "img3", "img3"],
                           "class": ["cat", "cat", "dog", "cat", "cat"], "x": [50.0, 75.0, 52.0, 50.0, 55.0],
                           "y": [50.0, 75.0, 52.0, 50.0, 55.0]})
    table, report = select_proposals(clicks, store, n=8, iou=0.7, exclusive=True, progress=False)
    boxes = {c: g[["x1", "y1", "x2", "y2"]].to_numpy() for c, g in table.groupby("click_id")}
    np.testing.assert_array_equal(boxes[1], np.array([A, B, H, G, F]))  # D and K hold the other cat's click
    np.testing.assert_array_equal(boxes[2], np.array([E]))              # D and K hold click 1
    # the dog click is not affected by the cats (its own ranking, with D and K)
    plain, plain_report = select_proposals(clicks, store, n=8, iou=0.7, exclusive=False, progress=False)
    np.testing.assert_array_equal(boxes[3], plain[plain.click_id == 3][["x1", "y1", "x2", "y2"]].to_numpy())
    assert len(plain[plain.click_id == 1]) == 7 and len(plain[plain.click_id == 2]) == 3
    for c in (4, 5):  # waived: the plain selection
        np.testing.assert_array_equal(boxes[c], np.array([D, A]))
    assert not table.fallback.any()
    assert (report["exclusive"], report["clicks_sharing_class"], report["exclusion_waived"]) == (True, 4, 2)
    assert (plain_report["exclusive"], plain_report["clicks_sharing_class"]) == (False, 0)
