"""CorLoc, box accuracy and mean IoU on hand-computed examples (pipeline/metrics.py)."""
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.metrics import box_accuracy, clicked_iou, corloc, match_boxes, mean_iou, pseudo_box_metrics
from pipeline.voc import OBJECT_COLUMNS


@pytest.fixture
def objects():
    rows = [
        ("1", 0, "cat", 0, 0, 10, 10, False, False),
        ("1", 1, "cat", 20, 20, 40, 40, False, False),
        ("1", 2, "dog", 0, 0, 20, 20, True, False),   # difficult
        ("2", 0, "dog", 10, 10, 30, 30, False, False),
        ("3", 0, "cat", 0, 0, 10, 10, False, False),  # no box at all: a CorLoc miss
    ]
    return pd.DataFrame(rows, columns=OBJECT_COLUMNS)


@pytest.fixture
def boxes():
    rows = [
        # image, class, box, score, object_index   -> best IoU with a GT of its class
        ("1", "cat", 0, 0, 10, 10, 0.9, 0),     # 1.0 (object 0)
        ("1", "cat", 20, 20, 30, 40, 0.5, 0),   # 200/400 = 0.5 with object 1 (clicked object 0: IoU 0)
        ("1", "dog", 0, 0, 10, 20, 0.7, 2),     # 200/400 = 0.5 with the difficult dog
        ("2", "dog", 10, 10, 20, 20, 0.8, -1),  # 100/400 = 0.25
        ("2", "cat", 10, 10, 30, 30, 0.9, -1),  # no cat in image 2: 0 (although it is exactly the dog)
    ]
    return pd.DataFrame(rows, columns=["image_id", "class", "x1", "y1", "x2", "y2", "score", "object_index"])


def test_match_boxes(boxes, objects):
    m = match_boxes(boxes, objects)
    np.testing.assert_allclose(m["iou"], [1.0, 0.5, 0.5, 0.25, 0.0])
    assert m["object_index"].tolist() == [0, 1, 2, 0, -1]
    assert m["difficult"].tolist() == [False, False, True, False, False]


def test_box_accuracy(boxes, objects):
    per, mean = box_accuracy(boxes, objects)
    assert per["cat"] == pytest.approx(2 / 3) and per["dog"] == pytest.approx(1 / 2)
    assert mean == pytest.approx((2 / 3 + 1 / 2) / 2)
    # a stricter threshold: only the exact box survives
    per, mean = box_accuracy(boxes, objects, iou_threshold=0.6)
    assert per["cat"] == pytest.approx(1 / 3) and per["dog"] == 0.0
    # excluding difficult: the dog box on the difficult dog is dropped -> dog 0/1
    per, mean = box_accuracy(boxes, objects, difficult="exclude")
    assert per["dog"] == 0.0 and mean == pytest.approx(1 / 3)
    # a class without boxes is NaN and left out of the mean
    per, mean = box_accuracy(boxes, objects, classes=["bird", "cat", "dog"])
    assert list(per.index) == ["bird", "cat", "dog"] and math.isnan(per["bird"])
    assert mean == pytest.approx(7 / 12)


def test_mean_iou(boxes, objects):
    per, mean = mean_iou(boxes, objects)
    assert per["cat"] == pytest.approx(0.5) and per["dog"] == pytest.approx(0.375)
    assert mean == pytest.approx(0.4375)


def test_corloc(boxes, objects):
    per, mean = corloc(boxes, objects)
    # cat: images 1 (top box 0.9 is exact) and 3 (no box: miss) -> 1/2; the cat box in image 2 is ignored
    # dog: images 1 (difficult only; top dog box IoU 0.5) and 2 (0.25) -> 1/2
    assert per["cat"] == pytest.approx(0.5) and per["dog"] == pytest.approx(0.5) and mean == pytest.approx(0.5)
    per, mean = corloc(boxes, objects, difficult="exclude")  # image 1 no longer counts for dog
    assert per["dog"] == 0.0 and mean == pytest.approx(0.25)


def test_corloc_uses_only_the_top_box(boxes, objects):
    worse = pd.concat([boxes, pd.DataFrame([("1", "cat", 30, 0, 40, 10, 0.95, -1)], columns=boxes.columns)],
                      ignore_index=True)
    per, _ = corloc(worse, objects)
    assert per["cat"] == 0.0  # image 1's top cat box now misses
    # box accuracy still counts every box: 2 correct of 4 cat boxes
    assert box_accuracy(worse, objects)[0]["cat"] == pytest.approx(0.5)
    # a tie keeps the first row
    tied = boxes.copy()
    tied.loc[1, "score"] = 0.9
    tied.loc[[0, 1]] = tied.loc[[1, 0]].to_numpy()
    per, _ = corloc(tied, objects)
    assert per["cat"] == pytest.approx(0.5)  # the first of the tied boxes (IoU 0.5) is correct
    tied.loc[0, ["x2"]] = 29.0  # IoU 180/400 < 0.5; the tied exact box must not be taken
    assert corloc(tied, objects)[0]["cat"] == 0.0


def test_clicked_iou(boxes, objects):
    ci = clicked_iou(boxes, objects)
    np.testing.assert_allclose(ci.to_numpy()[:3], [1.0, 0.0, 0.5])
    assert ci.iloc[3:].isna().all()
    assert clicked_iou(boxes.drop(columns="object_index"), objects).isna().all()


def test_pseudo_box_metrics(boxes, objects):
    b = boxes.assign(fallback=[False, False, True, False, False])
    summary, per_class = pseudo_box_metrics(b, objects)
    assert summary["box_accuracy"] == pytest.approx(7 / 12)
    assert summary["box_accuracy_all"] == pytest.approx(3 / 5)
    assert summary["corloc"] == pytest.approx(0.5)
    assert summary["mean_iou"] == pytest.approx(0.4375)
    assert summary["mean_iou_all"] == pytest.approx(2.25 / 5)
    assert summary["clicked_iou"] == pytest.approx(0.5)
    assert summary["n_boxes"] == 5 and summary["n_images"] == 2 and summary["n_classes"] == 2
    assert summary["fallback"] == 1 and summary["fallback_rate"] == pytest.approx(0.2)
    pc = per_class.set_index("class")
    assert pc.loc["cat", "boxes"] == 3 and pc.loc["cat", "images"] == 2 and pc.loc["dog", "images"] == 2
    assert pc.loc["cat", "clicked_iou"] == pytest.approx(0.5)  # boxes 0 and 1 know their object
    assert pc.loc["dog", "corloc"] == pytest.approx(0.5)


def test_pseudo_box_metrics_lists_classes_without_boxes(objects):
    b = pd.DataFrame([("2", "dog", 10, 10, 30, 30, 1.0)],
                     columns=["image_id", "class", "x1", "y1", "x2", "y2", "score"])
    summary, per_class = pseudo_box_metrics(b, objects)
    pc = per_class.set_index("class")
    assert pc.loc["cat", "boxes"] == 0 and pc.loc["cat", "corloc"] == 0.0 and math.isnan(pc.loc["cat", "box_accuracy"])
    assert summary["box_accuracy"] == 1.0
    assert summary["corloc"] == pytest.approx((0.0 + 0.5) / 2)  # dog: image 2 right, image 1 (no dog box) missed


def test_bad_tables(objects):
    with pytest.raises(ValueError, match="boxes table lacks"):
        box_accuracy(pd.DataFrame({"image_id": ["1"]}), objects)
    b = pd.DataFrame([("1", "cat", 0, 0, 10, 10)], columns=["image_id", "class", "x1", "y1", "x2", "y2"])
    with pytest.raises(ValueError, match="score"):
        corloc(b, objects)
    with pytest.raises(ValueError, match="difficult"):
        box_accuracy(b, objects, difficult="ignore")
