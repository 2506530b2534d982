import numpy as np
import pandas as pd
import pytest

from pipeline.clicks import ClickFileError, read_clicks, simulate_clicks, write_clicks
from pipeline.voc import VOC_CLASSES, load_voc

SIZES = {"a": (100, 50), "b": (30, 30)}


def _write(tmp_path, text):
    p = tmp_path / "clicks.csv"
    p.write_text(text)
    return p


def test_real_click_file(sample_root):
    images, objects = load_voc(sample_root / "VOC2007", ("trainval",), VOC_CLASSES)
    sizes = {r.image_id: (r.width, r.height) for r in images.itertuples()}
    clicks, report = read_clicks(sample_root / "clicks_trainval.csv", sizes, VOC_CLASSES)
    raw = pd.read_csv(sample_root / "clicks_trainval.csv", dtype={"image_id": str})
    assert len(clicks) == len(raw) == report["kept"] and report["skipped"] == 0
    assert set(clicks.annotator) == {1, 2}
    # every click lies inside the box of its object (the file names the object by its XML position)
    m = clicks.merge(objects, on=["image_id", "object_index"], suffixes=("", "_obj"))
    assert len(m) == len(clicks) and (m["class"] == m["class_obj"]).all()
    assert ((m.x >= m.x1) & (m.x <= m.x2) & (m.y >= m.y1) & (m.y <= m.y2)).all()


@pytest.mark.parametrize("text, line, problem", [
    ("image_id,klass,x,y\na,dog,1,1\n", 1, "bad header"),
    ("", 1, "empty file"),
    ("image_id,class,x,y\na,dog,1,1\nzz,dog,1,1\n", 3, "unknown image: 'zz'"),
    ("image_id,class,x,y\na,dragon,1,1\n", 2, "unknown class: 'dragon'"),
    ("image_id,class,x,y\na,dog,100,1\n", 2, "click outside the image"),
    ("image_id,class,x,y\na,dog,-1,1\n", 2, "click outside the image"),
    ("image_id,class,x,y\na,dog,1,1\nb,cat,one,2\n", 3, "non-numeric coordinates"),
    ("image_id,class,x,y\na,dog,1,nan\n", 2, "non-numeric coordinates"),
    ("image_id,class,x,y\na,dog,1\n", 2, "wrong number of fields"),
])
def test_bad_clicks_name_file_line_problem(tmp_path, text, line, problem):
    p = _write(tmp_path, text)
    with pytest.raises(ClickFileError) as e:
        read_clicks(p, SIZES, VOC_CLASSES)
    assert f"{p}:{line}:" in str(e.value) and problem in str(e.value)


def test_skip_policy_counts_bad_rows(tmp_path):
    p = _write(tmp_path, "image_id,class,x,y,annotator\na,dog,1,1,1\nzz,dog,1,1,1\na,dragon,1,1,1\n"
                         "b,cat,29.5,0,2\nb,cat,31,0,1\n")
    clicks, report = read_clicks(p, SIZES, VOC_CLASSES, on_bad="skip")
    assert list(clicks.image_id) == ["a", "b"] and list(clicks.annotator) == [1, 2]
    assert report["skipped"] == 3 and report["rows"] == 5
    assert report["skipped_by_reason"] == {"unknown image": 1, "unknown class": 1, "click outside the image": 1}


def test_write_read_round_trip(tmp_path):
    df = pd.DataFrame({"image_id": ["a", "b"], "class": ["dog", "cat"], "x": [1.25, 20.0], "y": [3.5, 29.0],
                       "annotator": [1, 1], "object_index": [0, 2]})
    write_clicks(df, tmp_path / "c.csv")
    back, _ = read_clicks(tmp_path / "c.csv", SIZES, VOC_CLASSES)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


def test_simulator_error_statistics():
    rng = np.random.default_rng(1)
    n = 20000
    x1, y1 = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
    w, h = rng.uniform(20, 300, n), rng.uniform(20, 300, n)
    objects = pd.DataFrame({"image_id": [f"{i:06d}" for i in range(n)], "object_index": 0, "class": "dog",
                            "x1": x1, "y1": y1, "x2": x1 + w, "y2": y1 + h})
    sigma = 0.08
    clicks = simulate_clicks(objects, sigma=sigma, annotators=2, seed=3)
    assert len(clicks) == 2 * n
    for a in (1, 2):
        c = clicks[clicks.annotator == a].reset_index(drop=True)
        ex = (c.x - (x1 + w / 2)) / w
        ey = (c.y - (y1 + h / 2)) / h
        assert abs(ex.mean()) < 0.003 and abs(ey.mean()) < 0.003
        assert abs(ex.std() - sigma) < 0.03 * sigma and abs(ey.std() - sigma) < 0.03 * sigma
        assert ((c.x >= x1) & (c.x < x1 + w) & (c.y >= y1) & (c.y < y1 + h)).all()
    c1, c2 = clicks[clicks.annotator == 1], clicks[clicks.annotator == 2]
    assert abs(np.corrcoef(c1.x.to_numpy() - x1, c2.x.to_numpy() - x1)[0, 1]
               - np.corrcoef(w, w)[0, 1]) > 0.01  # annotators draw independently
    again = simulate_clicks(objects, sigma=sigma, annotators=2, seed=3)
    pd.testing.assert_frame_equal(clicks, again)
    assert not simulate_clicks(objects, sigma=sigma, seed=4).x.equals(clicks[clicks.annotator == 1].x)


def test_simulator_sigma_zero_is_center():
    objects = pd.DataFrame({"image_id": ["a"], "object_index": [0], "class": ["dog"],
                            "x1": [10.0], "y1": [20.0], "x2": [30.0], "y2": [60.0]})
    c = simulate_clicks(objects, sigma=0.0)
    assert (c.x[0], c.y[0]) == (20.0, 40.0)
