"""bench/quality.py's re-localisation column on hand-made boxes: the % of replaced boxes correct before and after."""
import math
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import quality  # noqa: E402


def test_replaced_correct_counts_only_the_relocalized_boxes():
    objects = pd.DataFrame({"image_id": ["a", "a"], "object_index": [0, 1], "class": ["dog", "cat"],
                            "x1": [0.0, 50.0], "y1": [0.0, 50.0], "x2": [40.0, 90.0], "y2": [40.0, 90.0]})
    cols = ["click_id", "image_id", "class", "x1", "y1", "x2", "y2"]
    before = pd.DataFrame([[0, "a", "dog", 0, 0, 40, 40],      # right
                           [1, "a", "cat", 50, 50, 60, 60],    # too small (IoU 0.06)
                           [2, "a", "dog", 0, 0, 10, 10]],     # wrong, but not replaced
                          columns=cols)
    after = before.copy()
    after["relocalized"] = [True, True, False]
    after.loc[0, ["x2", "y2"]] = [15, 15]   # the right box made wrong
    after.loc[1, ["x1", "y1", "x2", "y2"]] = [48, 48, 88, 88]  # the small one made right (IoU 0.82)
    ok_before, ok_after = quality.replaced_correct(before, after, objects)
    assert (ok_before, ok_after) == (50.0, 50.0)
    after.loc[0, ["x2", "y2"]] = [40, 40]
    assert quality.replaced_correct(before, after, objects) == (50.0, 100.0)
    assert all(math.isnan(v) for v in quality.replaced_correct(before, after.assign(relocalized=False), objects))
