"""bench/bc_masks.py (issue #27's mask report) on hand-built masks: the mask's size against the object's box, the
share of it inside a box, and the summary by object size."""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bc_masks  # noqa: E402


def test_mask_geometry_on_a_hand_built_mask():
    mask = np.zeros((20, 30), bool)
    mask[2:6, 4:9] = True  # 4 x 5 = 20 px, pixel centres x 4.5..8.5, y 2.5..5.5
    gt = np.array([0.0, 0.0, 10.0, 10.0])  # area 100: the whole mask inside
    box = np.array([0.0, 0.0, 6.0, 10.0])  # holds the columns x 4.5, 5.5: 8 of 20 px
    g = bc_masks.mask_geometry(mask, gt, box)
    assert g["mask_px"] == 20 and g["mask_over_gt"] == pytest.approx(0.2)
    assert g["mask_in_gt"] == 1.0 and g["mask_in_box"] == pytest.approx(0.4)
    assert g["mask_box"] == [4.0, 2.0, 9.0, 6.0]


def test_empty_mask():
    g = bc_masks.mask_geometry(np.zeros((5, 5), bool), np.array([0.0, 0, 5, 5]), np.array([0.0, 0, 5, 5]))
    assert g["mask_px"] == 0 and g["mask_over_gt"] == 0.0 and np.isnan(g["mask_in_box"])


def test_summary_by_size_and_over_all():
    t = pd.DataFrame({"size_bin": ["small", "small", "large"], "mask_px": [10, 30, 50],
                      "mask_over_gt": [0.1, 0.3, 0.02], "mask_in_gt": [1.0, 0.5, 1.0], "mask_in_box": [1.0, 1.0, 0.9],
                      "mask_box_iou_gt": [0.1, 0.2, 0.01], "iou_default": [0.6, 0.4, 0.3],
                      "iou_masked": [0.6, 0.5, 0.3]})
    for k in bc_masks.BOX:
        t[f"default_{k}"] = 0.0
        t[f"masked_{k}"] = 0.0
    t.loc[1, "masked_x2"] = 5.0  # the second small box changed by its mask
    t["size_bin"] = pd.Categorical(t.size_bin, ["small", "medium", "large"])
    s = bc_masks.summary(t).set_index("size")
    assert list(s.index) == ["small", "large", "all"]  # no medium click: no row
    assert s.at["small", "median mask / GT box area %"] == pytest.approx(20.0)
    assert s.at["small", "p90 mask / GT box area %"] == pytest.approx(28.0)
    assert s.at["small", "masks wholly in default box %"] == 100.0 and s.at["large", "masks wholly in default box %"] == 0
    assert s.at["small", "default boxes correct %"] == 50.0 and s.at["small", "masked boxes correct %"] == 100.0
    assert s.at["small", "boxes changed"] == 1 and s.at["large", "boxes changed"] == 0
    assert s.at["all", "clicks"] == 3 and s.at["all", "median mask px"] == 30.0
