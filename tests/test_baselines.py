import pandas as pd

from pipeline.baselines import median_size_boxes


def test_median_size_box_is_centred_and_clipped():
    objects = pd.DataFrame({"image_id": ["a", "a", "b"], "class": ["dog"] * 3,
                            "x1": [0, 0, 0], "y1": [0, 0, 0], "x2": [10, 20, 40], "y2": [10, 30, 50]})
    clicks = pd.DataFrame({"click_id": [0, 1], "image_id": ["a", "b"], "class": ["dog", "dog"],
                           "x": [50.0, 5.0], "y": [50.0, 5.0]})
    boxes, medians = median_size_boxes(clicks, objects, {"a": (100, 100), "b": (100, 100)})
    assert tuple(medians.loc["dog"]) == (20, 30)
    assert boxes.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [40, 35, 60, 65]
    assert boxes.loc[1, ["x1", "y1", "x2", "y2"]].tolist() == [0, 0, 15, 20]  # clipped at the image border
