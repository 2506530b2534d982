"""Stage 1: selective search, the proposal store, the importers, shards and the luigi stages."""
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import h5py
import luigi
import numpy as np
import pandas as pd
import pytest
import scipy.io

from pipeline.imageio import read_image
from pipeline.proposals import (ProposalFileError, ProposalStore, ProposalWriter, SelectiveSearchParams,
                                compute_proposals, import_proposals, load_mat_proposals, load_npz_proposals,
                                merge_proposal_stores, postprocess_boxes, raw_selective_search, resize_for_proposals,
                                run_proposal_shard, selective_search, shard_bounds, write_proposal_store)

SMALL = 160  # max_side for tests: ~0.1 s per image


def _sample_images(root: Path, n: int):
    ids = (root / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").read_text().split()[:n]
    return ids, [root / "VOC2007" / "JPEGImages" / f"{i}.jpg" for i in ids]


# -- selective search on real images -----------------------------------------------------------------------------
@pytest.mark.realdata
def test_selective_search_deterministic_inside_image_original_coordinates(sample_root):
    ids, paths = _sample_images(sample_root, 3)
    params = SelectiveSearchParams(max_side=SMALL, min_size=4)
    first = compute_proposals(paths, params, workers=1, progress=False)
    again = compute_proposals(paths, params, workers=1, progress=False)
    in_two = compute_proposals(paths, params, workers=2, progress=False)
    per_core = compute_proposals(paths, params, workers=0, progress=False)  # the default: one process per core
    for a, d in zip(first, per_core):
        np.testing.assert_array_equal(a, d)
    for path, a, b, c in zip(paths, first, again, in_two):
        img = read_image(path)
        h, w = img.shape[:2]
        assert max(h, w) > SMALL  # the test really exercises the downscale
        assert a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == 4 and len(a) > 50
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        assert (a[:, 0] >= 0).all() and (a[:, 1] >= 0).all() and (a[:, 2] <= w).all() and (a[:, 3] <= h).all()
        assert ((a[:, 2] - a[:, 0]) >= 4).all() and ((a[:, 3] - a[:, 1]) >= 4).all()
        # sorted lexicographically, no duplicates
        assert len(np.unique(a, axis=0)) == len(a)
        np.testing.assert_array_equal(np.unique(a, axis=0), a)
        # the hierarchy's root region is the whole image: in original, not downscaled, coordinates
        assert (a == np.array([0, 0, w, h], np.float32)).all(1).any()
        # same set as the raw OpenCV rects on the downscaled image, scaled back by the exact per-axis factor
        small = resize_for_proposals(img, SMALL)
        assert max(small.shape[:2]) == SMALL
        rects = raw_selective_search(cv2.cvtColor(small, cv2.COLOR_RGB2BGR)).astype(np.float64)
        sx, sy = w / small.shape[1], h / small.shape[0]
        expect = np.column_stack([rects[:, 0] * sx, rects[:, 1] * sy, (rects[:, 0] + rects[:, 2]) * sx,
                                  (rects[:, 1] + rects[:, 3]) * sy]).astype(np.float32)
        expect = expect[((expect[:, 2] - expect[:, 0]) >= 4) & ((expect[:, 3] - expect[:, 1]) >= 4)]
        np.testing.assert_array_equal(np.unique(expect, axis=0), a)


def test_selective_search_rejects_bad_mode_and_image():
    with pytest.raises(ValueError, match="mode"):
        selective_search(np.zeros((20, 20, 3), np.uint8), mode="slow")
    with pytest.raises(ValueError, match="RGB"):
        selective_search(np.zeros((20, 20), np.uint8))


def test_unreadable_image_is_named_also_in_worker_processes(tmp_path):
    from pipeline.imageio import ImageReadError

    good = tmp_path / "good.png"
    yy, xx = np.mgrid[0:48, 0:64]
    img = np.zeros((48, 64, 3), np.uint8)
    img[(xx > 20) & (xx < 45) & (yy > 10) & (yy < 35)] = (200, 30, 30)
    cv2.imwrite(str(good), img)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    for workers in (1, 2):
        with pytest.raises(ImageReadError, match="broken.jpg"):
            compute_proposals([good, tmp_path / "broken.jpg", good], SelectiveSearchParams(min_size=2),
                              workers=workers, progress=False)
    boxes = compute_proposals([good], SelectiveSearchParams(min_size=2), progress=False)[0]
    assert (boxes == np.array([0, 0, 64, 48], np.float32)).all(1).any()


def test_postprocess_clips_filters_dedupes_sorts():
    boxes = np.array([[5, 5, 30, 30],      # kept
                      [-10, 2, 40, 50],    # clipped to 0,2,40,40
                      [5, 5, 30, 30],      # duplicate
                      [0, 0, 3, 30],       # too narrow
                      [1, 1, 30, 30]],     # kept, sorts after 0,2,...
                     np.float64)
    out = postprocess_boxes(boxes, width=40, height=40, min_size=5)
    np.testing.assert_array_equal(out, np.array([[0, 2, 40, 40], [1, 1, 30, 30], [5, 5, 30, 30]], np.float32))
    assert out.dtype == np.float32
    assert postprocess_boxes(np.zeros((0, 4)), 10, 10).shape == (0, 4)


def test_postprocess_max_boxes_is_a_seeded_subset_not_the_leftmost():
    xs = np.arange(100, dtype=np.float64)
    boxes = np.column_stack([xs, np.zeros(100), xs + 50, np.full(100, 50)])
    a = postprocess_boxes(boxes, 200, 60, min_size=1, max_boxes=10, seed=0)
    b = postprocess_boxes(boxes, 200, 60, min_size=1, max_boxes=10, seed=0)
    c = postprocess_boxes(boxes, 200, 60, min_size=1, max_boxes=10, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 10 and not np.array_equal(a, c)
    np.testing.assert_array_equal(np.unique(a, axis=0), a)  # still sorted
    assert a[:, 0].max() >= 50  # not just the first 10 of the lexicographic order (x1 = 0..9)


# -- the store -----------------------------------------------------------------------------------------------------
def _toy_items():
    return [("a", np.array([[0, 0, 10, 10], [1, 2, 3, 4]], np.float32), (20, 10)),
            ("b", np.zeros((0, 4), np.float32), (5, 6)),
            ("c", np.array([[2.5, 3.5, 7.25, 9.0]], np.float32), (8, 9))]


def _read_in_child(args):
    store, image_id = args
    return store[image_id]


def test_store_roundtrip_attrs_and_lazy_open(tmp_path):
    path = write_proposal_store(tmp_path / "p.h5", _toy_items(), {"mode": "fast", "max_boxes": None, "split": "x"})
    store = ProposalStore(path)
    assert store.image_ids == ["a", "b", "c"] and len(store) == 3 and "b" in store and "z" not in store
    assert store._h5 is None  # nothing opened before the first box access
    for image_id, boxes, size in _toy_items():
        np.testing.assert_array_equal(store[image_id], boxes)
        assert store[image_id].dtype == np.float32 and store.size(image_id) == size
    assert store.num_boxes() == 3 and list(store.counts()) == [2, 0, 1]
    assert store.params == {"mode": "fast", "max_boxes": None, "split": "x"}
    assert store.attrs["mode"] == "fast" and store.attrs["format"] == "clickscale-proposals"
    with h5py.File(path, "r") as f:  # the ragged layout itself
        assert f["boxes"].shape == (3, 4) and list(f["offsets"][()]) == [0, 2, 2, 3]
        assert f["sizes"][()].tolist() == [[20, 10], [5, 6], [8, 9]]
    with pytest.raises(KeyError, match="no proposals for image 'z'"):
        store["z"]
    # pickled (spawned DataLoader workers) and forked processes open the file themselves
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone["c"], _toy_items()[2][1])
    with ProcessPoolExecutor(2) as pool:
        got = list(pool.map(_read_in_child, [(store, "a"), (store, "c")]))
    np.testing.assert_array_equal(got[0], _toy_items()[0][1])
    np.testing.assert_array_equal(got[1], _toy_items()[2][1])
    store.close()


def test_writer_is_atomic_and_rejects_duplicates(tmp_path):
    path = tmp_path / "p.h5"
    with pytest.raises(ValueError, match="added twice"):
        with ProposalWriter(path) as w:
            w.add("a", np.zeros((1, 4)), (1, 1))
            w.add("a", np.zeros((1, 4)), (1, 1))
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_bad_store_files_are_named(tmp_path):
    with pytest.raises(ProposalFileError, match="not found"):
        ProposalStore(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(ProposalFileError, match="junk.h5"):
        ProposalStore(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["boxes"] = np.zeros((1, 4))
    with pytest.raises(ProposalFileError, match="other.h5.*missing datasets"):
        ProposalStore(tmp_path / "other.h5")


def test_merge_keeps_order_and_refuses_overlap(tmp_path):
    items = _toy_items()
    write_proposal_store(tmp_path / "1.h5", items[:2])
    write_proposal_store(tmp_path / "2.h5", items[2:])
    merged = ProposalStore(merge_proposal_stores([tmp_path / "1.h5", tmp_path / "2.h5"], tmp_path / "m.h5"))
    assert merged.image_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(merged["c"], items[2][1])
    with pytest.raises(ProposalFileError, match="also in an earlier store"):
        merge_proposal_stores([tmp_path / "1.h5", tmp_path / "1.h5"], tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()


# -- importers -----------------------------------------------------------------------------------------------------
def _cell(arrays, shape):
    c = np.empty(shape, dtype=object)
    for i, a in enumerate(arrays):
        c.flat[i] = a
    return c


# image id -> (width, height), our boxes (0-based continuous); the Fast R-CNN rows are (y1+1, x1+1, y2, x2)
OURS = {"000005": ((500, 375), np.array([[0, 0, 500, 375], [47, 239, 195, 371], [7, 11, 67, 50]], np.float64)),
        "000007": ((500, 333), np.array([[140, 49, 500, 330]], np.float64))}


def _frcnn_rows(b):
    return np.column_stack([b[:, 1] + 1, b[:, 0] + 1, b[:, 3], b[:, 2]])


def test_mat_release_file_roundtrip(tmp_path):
    ids = list(OURS)
    path = tmp_path / "voc_2007_trainval.mat"
    scipy.io.savemat(path, {"boxes": _cell([_frcnn_rows(OURS[i][1]) for i in ids], (1, len(ids))),
                            "images": _cell(ids, (len(ids), 1))})
    table = load_mat_proposals(path)
    assert sorted(table) == sorted(ids)
    np.testing.assert_array_equal(table["000005"][1], [47, 239, 195, 371])  # hand-checked conversion
    for i in ids:
        np.testing.assert_array_equal(table[i], OURS[i][1])
    imported = list(import_proposals("mat", path, [(i, *OURS[i][0]) for i in ids], min_size=0))
    for (image_id, boxes, size), i in zip(imported, ids):
        assert image_id == i and size == OURS[i][0]
        np.testing.assert_array_equal(boxes, np.unique(OURS[i][1].astype(np.float32), axis=0))


def test_mat_per_image_files_and_without_image_names(tmp_path):
    d = tmp_path / "mats"
    d.mkdir()
    for i, (_, b) in OURS.items():
        scipy.io.savemat(d / f"{i}.mat", {"boxes": _frcnn_rows(b)})
    table = load_mat_proposals(d, list(OURS))
    for i in OURS:
        np.testing.assert_array_equal(table[i], OURS[i][1])
    with pytest.raises(ProposalFileError, match="000009.mat"):
        load_mat_proposals(d, ["000009"])
    # release file without 'images': cells in the order of the ids given, counts must agree
    path = tmp_path / "noimages.mat"
    scipy.io.savemat(path, {"boxes": _cell([_frcnn_rows(OURS[i][1]) for i in OURS], (1, 2))})
    np.testing.assert_array_equal(load_mat_proposals(path, list(OURS))["000007"], OURS["000007"][1])
    with pytest.raises(ProposalFileError, match="cannot tell which boxes"):
        load_mat_proposals(path, ["000005"])
    with pytest.raises(ProposalFileError, match="000009.mat: no proposal file"):
        list(import_proposals("mat", d, [("000005", 500, 375), ("000009", 500, 375)], min_size=0))


def test_npz_and_h5_layouts(tmp_path):
    np.savez(tmp_path / "per_image.npz", **{i: b for i, (_, b) in OURS.items()})
    ids = list(OURS)
    boxes = np.concatenate([OURS[i][1] for i in ids])
    offsets = np.array([0, 3, 4])
    np.savez(tmp_path / "ragged.npz", boxes=boxes, offsets=offsets, image_ids=np.array(ids))
    with h5py.File(tmp_path / "ragged.h5", "w") as f:
        f["boxes"], f["offsets"], f["image_ids"] = boxes, offsets, np.array(ids, dtype=object).astype("S")
    for name in ("per_image.npz", "ragged.npz", "ragged.h5"):
        table = load_npz_proposals(tmp_path / name)
        for i in ids:
            np.testing.assert_array_equal(table[i], OURS[i][1])
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 5)))
    with pytest.raises(ProposalFileError, match="bad.npz.*shape"):
        load_npz_proposals(tmp_path / "bad.npz")


# -- shards --------------------------------------------------------------------------------------------------------
def test_shard_bounds_cover_everything_once():
    for n in (0, 1, 5, 17):
        for k in (1, 2, 4, 7):
            spans = [shard_bounds(n, s, k) for s in range(k)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1
    with pytest.raises(ValueError):
        shard_bounds(5, 2, 2)


@pytest.mark.realdata
def test_sharded_equals_unsharded_and_resumes_from_chunks(sample_root, tmp_path):
    ids, paths = _sample_images(sample_root, 3)
    params = SelectiveSearchParams(max_side=SMALL, min_size=4)
    whole = ProposalStore(run_proposal_shard(ids, paths, tmp_path / "whole.h5", params, progress=False))
    parts = []
    for s in range(2):
        a, b = shard_bounds(len(ids), s, 2)
        parts.append(run_proposal_shard(ids[a:b], paths[a:b], tmp_path / f"s{s}.h5", params, workers=2,
                                        checkpoint_dir=tmp_path / f"ck{s}", chunk_size=1, progress=False))
    merged = ProposalStore(merge_proposal_stores(parts, tmp_path / "merged.h5"))
    assert merged.image_ids == whole.image_ids == ids
    for i in ids:
        np.testing.assert_array_equal(merged[i], whole[i])
        assert merged.size(i) == whole.size(i)
    assert list((tmp_path / "ck0").iterdir()) == []  # chunks removed once the shard is written

    # a killed shard left its first chunk: the rerun keeps it and computes only the rest
    attrs = {"source": "selective_search", **params.as_dict()}
    marker = np.array([[1, 2, 3, 4]], np.float32)
    write_proposal_store(tmp_path / "ck" / "chunk_00000.h5", [(ids[0], marker, whole.size(ids[0]))], attrs)
    out = ProposalStore(run_proposal_shard(ids, paths, tmp_path / "resumed.h5", params,
                                           checkpoint_dir=tmp_path / "ck", chunk_size=1, progress=False))
    np.testing.assert_array_equal(out[ids[0]], marker)  # reused, not recomputed
    for i in ids[1:]:
        np.testing.assert_array_equal(out[i], whole[i])
    # a chunk written with other parameters is recomputed
    write_proposal_store(tmp_path / "ck2" / "chunk_00000.h5", [(ids[0], marker, (1, 1))], {**attrs, "mode": "quality"})
    out2 = ProposalStore(run_proposal_shard(ids[:1], paths[:1], tmp_path / "r2.h5", params,
                                            checkpoint_dir=tmp_path / "ck2", chunk_size=1, progress=False))
    np.testing.assert_array_equal(out2[ids[0]], whole[ids[0]])


# -- the luigi stages ----------------------------------------------------------------------------------------------
def _build(*tasks):
    return luigi.build(list(tasks), local_scheduler=True, detailed_summary=True, log_level="WARNING")


def test_stages_sharded_equals_unsharded_import_and_selection(outputs, tmp_path):
    from tasks.proposals import SelectiveSearch, SelectiveSearchShard, SelectProposals

    common = dict(data_root=str(tmp_path / "data"), synth_trainval=5, synth_test=2, synth_image_px=96,
                  ss_image_max_px=64, ss_box_min_px=4, ss_splits=["trainval", "test"])
    one, three = SelectiveSearch(ss_shards=1, **common), SelectiveSearch(ss_shards=3, ss_workers=2, **common)
    assert one.stage_dir != three.stage_dir
    res = _build(one, three)
    assert res.status.name == "SUCCESS", res.summary_text
    assert len(list((outputs / "SelectiveSearchShard").iterdir())) == 2 * 1 + 2 * 3
    manifest = one.manifest()
    for split in ("trainval", "test"):
        a, b = ProposalStore(one.store_path(split)), ProposalStore(three.store_path(split))
        assert a.image_ids == b.image_ids == list(manifest.split(split).image_id)
        for i in a.image_ids:
            assert len(a[i]) > 0
            np.testing.assert_array_equal(a[i], b[i])
            row = manifest.images[manifest.images.image_id == i].iloc[0]
            assert a.size(i) == (row.width, row.height)
    shard = SelectiveSearchShard(ss_split="trainval", ss_shard=1, ss_shards=3, **{k: v for k, v in common.items()
                                                                          if k != "ss_splits"})
    assert ProposalStore(shard.stage_dir / "proposals.h5").image_ids == list(manifest.split("trainval").image_id[2:4])

    # import: the same boxes written as a .npz per split are indistinguishable downstream
    for split in ("trainval", "test"):
        a = ProposalStore(one.store_path(split))
        np.savez(tmp_path / f"props_{split}.npz", **{i: a[i] for i in a.image_ids})
    imported = SelectiveSearch(ss_source="npz", ss_import_path=str(tmp_path / "props_{split}.npz"), **common)
    sel_ss, sel_imp = SelectProposals(ss_shards=1, **common), SelectProposals(
        ss_source="npz", ss_import_path=str(tmp_path / "props_{split}.npz"), **common)
    res = _build(imported, sel_ss, sel_imp)
    assert res.status.name == "SUCCESS", res.summary_text
    assert len(list((outputs / "SelectiveSearchShard").iterdir())) == 8  # the import ran no shard
    for split in ("trainval", "test"):
        a, b = ProposalStore(one.store_path(split)), ProposalStore(imported.store_path(split))
        assert a.image_ids == b.image_ids and all(np.array_equal(a[i], b[i]) for i in a.image_ids)
    t1 = pd.read_parquet(sel_ss.stage_dir / "selected.parquet")
    t2 = pd.read_parquet(sel_imp.stage_dir / "selected.parquet")
    pd.testing.assert_frame_equal(t1, t2)
    assert list(t1.columns) == ["click_id", "image_id", "class", "x", "y", "rank", "x1", "y1", "x2", "y2",
                                "fallback"]
    clicks = manifest.clicks
    assert set(t1.click_id) == set(clicks.click_id)
    assert (t1.groupby("click_id").size() <= 8).all()
    # every selected box contains its click
    assert ((t1.x1 <= t1.x) & (t1.x <= t1.x2) & (t1.y1 <= t1.y) & (t1.y <= t1.y2)).all()
    report = pd.read_json(sel_ss.stage_dir / "report.json", typ="series")
    assert report["clicks"] == len(clicks) and report["crops"] == len(t1)


def test_proposals_are_reused_across_click_files_and_annotators(outputs, tmp_path):
    from tasks.dataset import PrepareDataset
    from tasks.proposals import SelectiveSearch, SelectiveSearchShard, SelectProposals

    common = dict(data_root=str(tmp_path / "data"), synth_trainval=4, synth_test=1, synth_image_px=96,
                  ss_image_max_px=64, ss_box_min_px=4, ss_shards=2)
    a1, a2 = SelectProposals(annotator=1, **common), SelectProposals(annotator=2, **common)
    # clicks change the dataset stage and the selection, never the proposals
    assert a1.find_upstream("PrepareDataset").stage_dir != a2.find_upstream("PrepareDataset").stage_dir
    assert a1.stage_dir != a2.stage_dir
    assert a1.requires()["proposals"].stage_dir == a2.requires()["proposals"].stage_dir
    assert SelectiveSearch(clicks="elsewhere.csv", sim_click_sigma=0.2, **common).stage_dir == \
        a1.requires()["proposals"].stage_dir
    # ... while anything that changes the images (or the proposals' own parameters) does
    assert SelectiveSearch(**{**common, "synth_image_px": 80}).stage_dir != a1.requires()["proposals"].stage_dir
    assert SelectiveSearch(**{**common, "data_seed": 1}).stage_dir != a1.requires()["proposals"].stage_dir
    assert SelectiveSearch(**{**common, "ss_image_max_px": 48}).stage_dir != a1.requires()["proposals"].stage_dir
    assert PrepareDataset(annotator=1).images_ref == PrepareDataset(annotator=2).images_ref
    assert SelectiveSearch(**{**common, "ss_max_boxes": 100}).stage_dir != a1.requires()["proposals"].stage_dir
    res = _build(a1)
    assert res.status.name == "SUCCESS", res.summary_text
    shards = sorted(p.name for p in (outputs / "SelectiveSearchShard").iterdir())
    res = _build(a2)  # runs PrepareDataset and SelectProposals again, selective search not at all
    assert res.status.name == "SUCCESS", res.summary_text
    assert sorted(p.name for p in (outputs / "SelectiveSearchShard").iterdir()) == shards
    assert len(list((outputs / "SelectiveSearch").iterdir())) == 1
    t1 = pd.read_parquet(a1.stage_dir / "selected.parquet")
    t2 = pd.read_parquet(a2.stage_dir / "selected.parquet")
    assert len(t1) and len(t2) and not t1[["x", "y"]].equals(t2[["x", "y"]])


def test_training_seed_keeps_the_dataset_and_proposals_data_seed_changes_them(tmp_path):
    from tasks.classifier import TrainClassifier

    common = dict(data_root=str(tmp_path / "data"), synth_trainval=4, synth_test=1)
    base, reseeded, redrawn = (TrainClassifier(**common, **extra) for extra in ({}, {"seed": 1}, {"data_seed": 1}))
    assert base.stage_dir != reseeded.stage_dir and base.stage_dir != redrawn.stage_dir
    for stage in ("PrepareDataset", "SelectiveSearchShard", "SelectiveSearch", "SelectProposals"):
        assert base.find_upstream(stage).stage_dir == reseeded.find_upstream(stage).stage_dir, stage
        assert base.find_upstream(stage).stage_dir != redrawn.find_upstream(stage).stage_dir, stage
    # the synthetic images (and their simulated clicks) come from data_seed alone
    dataset = base.find_upstream("PrepareDataset")
    assert dataset.images_ref != redrawn.find_upstream("PrepareDataset").images_ref
    assert "seed" not in dataset.get_param_names()
