"""The embedded synthetic dataset: determinism, VOC layout, statistics, and that it is not trivially separable."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.ops import box_iou

from pipeline import synthetic
from pipeline.clicks import read_clicks
from pipeline.imageio import read_image
from pipeline.io import read_json
from pipeline.synthetic import (DEFAULT_SEED, SYNTH_CLASSES, dataset_complete, ensure_dataset, generate_dataset,
                                image_seed, render_scene)
from pipeline.voc import load_voc, read_split

SMALL = dict(n_trainval=60, n_test=30, image_size=320, click_sigma=0.08, annotators=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    root = generate_dataset(out, seed=DEFAULT_SEED, **SMALL)
    assert root == out / "VOC2007"
    return out


@pytest.fixture(scope="module")
def voc(small):
    images, objects = load_voc(small / "VOC2007", classes=SYNTH_CLASSES)
    parts = pd.read_csv(small / synthetic.PARTS_FILE, dtype={"image_id": str})
    return images, objects, parts


@pytest.mark.slow
def test_same_seed_identical_bytes_different_seed_differs(small, tmp_path):
    again = generate_dataset(tmp_path / "b", seed=DEFAULT_SEED, **SMALL).parent
    a, b = _files(small), _files(again)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith(".jpg")]) == 90
    for name in a:
        assert a[name] == b[name], f"{name} differs between two generations with the same seed"

    other = generate_dataset(tmp_path / "c", n_trainval=6, n_test=2, seed=DEFAULT_SEED + 1).parent
    c = _files(other)
    for i in range(1, 7):   # trainval images 000001..000006 exist in both, drawn from different seeds
        name = f"VOC2007/JPEGImages/{i:06d}.jpg"
        assert c[name] != a[name]
    assert c["clicks_trainval.csv"] != a["clicks_trainval.csv"]


def test_render_scene_is_a_function_of_its_seed():
    s1, s2 = render_scene(image_seed(3, "test", 5)), render_scene(image_seed(3, "test", 5))
    assert np.array_equal(s1.image, s2.image) and s1.objects == s2.objects
    s3 = render_scene(image_seed(3, "trainval", 5))
    assert s3.image.shape != s1.image.shape or not np.array_equal(s3.image, s1.image)
    with pytest.raises(ValueError, match="unknown split"):
        image_seed(0, "val", 0)


def test_voc_files_read_back(small, voc):
    images, objects, parts = voc
    root = small / "VOC2007"
    trainval, test = read_split(root, "trainval"), read_split(root, "test")
    assert len(trainval) == 60 and len(test) == 30 and not set(trainval) & set(test)
    for row in images.head(10).itertuples():       # JPEGs decode at the size the XML states
        img = read_image(row.path)
        assert img.shape == (row.height, row.width, 3)
        assert max(row.width, row.height) == 320 and min(row.width, row.height) >= 0.7 * 320 - 1
    # XML boxes (1-based inclusive, read back as 0-based continuous) equal the generator's own boxes
    merged = objects.merge(parts, on=["image_id", "object_index"], suffixes=("", "_p"), validate="1:1")
    assert len(merged) == len(objects) == len(parts)
    for c in ("x1", "y1", "x2", "y2"):
        np.testing.assert_array_equal(merged[c].to_numpy(), merged[c + "_p"].to_numpy())
    assert (merged["class"] == merged["class_p"]).all()
    assert (merged.difficult == merged.difficult_p).all() and (merged.truncated == merged.truncated_p).all()
    # per-class lists agree with the XML: 1 = a non-difficult object, 0 = only difficult ones, -1 = none
    for split, ids in (("trainval", trainval), ("test", test)):
        for cls in SYNTH_CLASSES:
            lines = (root / "ImageSets" / "Main" / f"{cls}_{split}.txt").read_text().split("\n")[:-1]
            flags = {ln.split()[0]: int(ln.split()[1]) for ln in lines}
            assert list(flags) == ids
            for image_id in ids:
                o = objects[(objects.image_id == image_id) & (objects["class"] == cls)]
                want = -1 if o.empty else (1 if (~o.difficult).any() else 0)
                assert flags[image_id] == want, (cls, split, image_id)


def test_generation_info_and_clicks(small, voc):
    images, objects, _ = voc
    info = read_json(small / synthetic.INFO_FILE)
    assert info["seed"] == DEFAULT_SEED and info["images"] == 90 and info["objects"] == len(objects)
    assert dataset_complete(small, seed=DEFAULT_SEED, **SMALL)
    assert not dataset_complete(small, seed=DEFAULT_SEED + 1, **SMALL)
    sizes = {r.image_id: (r.width, r.height) for r in images.itertuples()}
    clicks, report = read_clicks(small / synthetic.CLICKS_FILE, sizes, SYNTH_CLASSES)
    assert report["skipped"] == 0
    trainval = objects[objects.image_id.isin(read_split(small / "VOC2007", "trainval"))]
    assert len(clicks) == 2 * len(trainval) == info["clicks"]
    assert sorted(clicks.annotator.unique()) == [1, 2]
    m = clicks.merge(trainval, on=["image_id", "object_index"], suffixes=("", "_o"), validate="m:1")
    assert len(m) == len(clicks) and (m["class"] == m["class_o"]).all()
    assert ((m.x >= m.x1) & (m.x <= m.x2) & (m.y >= m.y1) & (m.y <= m.y2)).all()
    # the clicks scatter around the box centre (sigma = 0.08 box side), they are not all at the centre
    dx = (m.x - (m.x1 + m.x2) / 2) / (m.x2 - m.x1)
    assert 0.04 < dx.std() < 0.12


def test_statistics(voc):
    images, objects, parts = voc
    counts = objects.groupby("image_id").size().reindex(images.image_id.unique(), fill_value=0)
    assert counts.min() >= 1 and counts.max() <= 4 and (counts >= 3).sum() >= 10
    assert set(objects["class"]) == set(SYNTH_CLASSES)
    w, h = objects.x2 - objects.x1, objects.y2 - objects.y1
    side = np.maximum(w, h)
    assert side.max() / side.min() >= 8
    easy = ~objects.difficult
    assert side[easy].max() / side[easy].min() >= 8          # also among the objects that count in AP
    assert side.max() >= 160 and side[easy].min() >= 20     # the difficulty rule: tiny -> difficult
    assert 0.03 <= objects.difficult.mean() <= 0.3
    assert 0.05 <= objects.truncated.mean() <= 0.5
    # truncated objects touch the border
    sizes = images.drop_duplicates("image_id").set_index("image_id")[["width", "height"]]
    t = objects[objects.truncated].join(sizes, on="image_id")
    assert ((t.x1 == 0) | (t.y1 == 0) | (t.x2 == t.width) | (t.y2 == t.height)).all()
    # overlapping objects: pairs of boxes in the same image with IoU > 0
    pairs = overlapping = 0
    for _, g in objects.groupby("image_id"):
        b = torch.tensor(g[["x1", "y1", "x2", "y2"]].to_numpy(float))
        for i, j in itertools.combinations(range(len(g)), 2):
            pairs += 1
            overlapping += bool(box_iou(b[i:i + 1], b[j:j + 1])[0, 0] > 0)
    assert overlapping >= 0.2 * pairs and overlapping >= 10
    # the documented difficulty rule, recomputed from the drawing data
    p = parts
    rule = ((np.maximum(p.x2 - p.x1, p.y2 - p.y1) < 20) | (p.visible_area < 0.4 * p.inside_area)
            | (p.part_visible_area < 0.3 * p.part_area))
    assert (rule == p.difficult).all()
    assert (rule & (p.visible_area < 0.4 * p.inside_area)).sum() >= 1   # some are difficult by occlusion
    assert (p.visible_area >= 0.15 * p.area).all()                     # no annotated object is invisible


def test_distinctive_part_is_small(voc):
    _, _, parts = voc
    box_area = (parts.x2 - parts.x1) * (parts.y2 - parts.y1)
    frac = parts.part_visible_area / box_area
    assert frac.mean() < 0.25 and frac.max() < 0.5
    assert (parts.part_area / parts.area).max() < 0.25
    easy = parts[~parts.difficult]
    assert (easy.part_visible_area > 0).all()                            # recognisable objects show their part
    # the part sits inside its object's box
    assert ((easy.part_x1 >= easy.x1) & (easy.part_x2 <= easy.x2)
            & (easy.part_y1 >= easy.y1) & (easy.part_y2 <= easy.y2)).all()


def test_box_colour_does_not_identify_the_class(voc):
    images, objects, _ = voc
    path = dict(zip(images.image_id, images.path))
    feats = []
    for r in objects.itertuples():
        crop = read_image(path[r.image_id])[int(r.y1):int(r.y2), int(r.x1):int(r.x2)].reshape(-1, 3)
        feats.append(crop.mean(0))
    X = np.array(feats)
    y = objects["class"].map({c: i for i, c in enumerate(SYNTH_CLASSES)}).to_numpy()
    train = objects.image_id.isin(images[images.split == "trainval"].image_id).to_numpy()
    means = np.stack([X[train & (y == k)].mean(0) for k in range(len(SYNTH_CLASSES))])
    pred = np.argmin(((X[:, None, :] - means[None]) ** 2).sum(-1), 1)
    test_acc = (pred[~train] == y[~train]).mean()
    train_acc = (pred[train] == y[train]).mean()
    # chance is 1/8; a nearest-class-mean classifier on box mean colour stays far from perfect, even on train
    assert test_acc < 0.35 and train_acc < 0.5, (train_acc, test_acc)


def test_killed_or_failed_generation_is_not_complete(small, tmp_path, monkeypatch):
    out = tmp_path / "d"
    params = dict(n_trainval=3, n_test=1, seed=5)
    ensure_dataset(out, **params)
    assert dataset_complete(out, **params)
    before = _files(out)
    mtime = (out / synthetic.INFO_FILE).stat().st_mtime_ns
    ensure_dataset(out, **params)                                    # complete: reused, not rewritten
    assert (out / synthetic.INFO_FILE).stat().st_mtime_ns == mtime

    calls = {"n": 0}
    real = synthetic.render_scene

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(synthetic, "render_scene", dies)
    with pytest.raises(RuntimeError, match="killed"):
        generate_dataset(out, n_trainval=3, n_test=1, seed=6)
    # the failed run left nothing behind and did not touch the previous complete dataset
    assert _files(out) == before and not list(out.glob(".synthetic.*"))
    assert dataset_complete(out, **params) and not dataset_complete(out, n_trainval=3, n_test=1, seed=6)
    monkeypatch.undo()

    # a hard kill leaves a hidden partial directory: never complete, cleaned by the next generation
    fresh = tmp_path / "e"
    (fresh / ".synthetic.x.partial" / "VOC2007" / "JPEGImages").mkdir(parents=True)
    assert not dataset_complete(fresh, **params)
    generate_dataset(fresh, **params)
    assert not list(fresh.glob(".synthetic.*")) and dataset_complete(fresh, **params)
    assert _files(fresh) == before
