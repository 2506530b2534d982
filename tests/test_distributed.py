"""Work spread over several workers or processes: CAM shards (ranges of the global plan's parts, merged by hard
links) give exactly the maps of one store whatever the shard count; DDP training (torchrun, gloo on the CPU) in two
processes takes the same optimizer steps over the same batches as one process and ends with its weights."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import distributed as D
from pipeline.backbones import ClassifierNet
from pipeline.cam import CamStore, click_entries, merge_cam_stores, shard_parts, write_cam_store
from pipeline.classifier import TrainConfig, selection_dataset, train_classifier, train_classifier_distributed

import nets


def tiny_classifier(num_classes: int = 3, seed: int = 3, input_size: int = 32) -> ClassifierNet:
    return nets.tiny_classifier(num_classes, seed, scale=0.4, input_size=input_size)


# ---------------------------------------------------------------------------------------------------------------
# CAM shards
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def cam_data(tmp_path):
    """7 noise images of different sizes, 1-2 clicks each with 3 nested crops: (paths, selected table)."""
    rng = np.random.default_rng(1)
    paths, rows, click_id = {}, [], 0
    for i in range(7):
        h, w = 36 + 5 * i, 58 - 3 * i
        p = tmp_path / f"img{i}.png"
        cv2.imwrite(str(p), (rng.random((h, w, 3)) * 255).astype(np.uint8))
        paths[f"im{i}"] = str(p)
        for c in range(1 + i % 2):
            x, y = float(rng.uniform(9, w - 9)), float(rng.uniform(9, h - 9))
            for r in range(3):
                half = 3 + 3 * r
                rows.append((click_id, f"im{i}", "abc"[(i + c) % 3], x, y, r, max(0.0, x - half), max(0.0, y - half),
                             min(w, x + half + 1.5), min(h, y + half)))
            click_id += 1
    selected = pd.DataFrame(rows, columns=["click_id", "image_id", "class", "x", "y", "rank", "x1", "y1", "x2", "y2"])
    return paths, selected


def _contents(store: CamStore) -> dict:
    out = {}
    for cid in store.click_ids():
        m, meta = store.load(cid)
        out[cid] = (m, {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in meta.items()},
                    store.load_crop_maps(cid))
    return out


def test_shard_parts_are_contiguous_near_equal_ranges():
    assert [list(shard_parts(4, i, 3)) for i in range(3)] == [[0, 1], [2], [3]]
    assert [list(shard_parts(2, i, 3)) for i in range(3)] == [[0], [1], []]  # more shards than parts: one empty
    assert list(shard_parts(5, 0, 1)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="shard index 3"):
        shard_parts(4, 3, 3)


def test_three_or_five_shards_merged_equal_one_store(tmp_path, cam_data):
    paths, selected = cam_data
    net = tiny_classifier()
    entries = click_entries(selected, ("a", "b", "c"))
    kw = dict(images_per_part=2, batch_size=5, inspect_images=2, progress=False)  # 7 images -> 4 parts
    one = write_cam_store(net, entries, paths, tmp_path / "one", **kw)
    want = _contents(one)
    assert len(want) == selected.click_id.nunique() == 10

    images = sorted(paths)
    for n in (3, 5):
        dirs = [tmp_path / f"n{n}" / f"shard{i}" for i in range(n)]
        for i, d in enumerate(dirs):
            shard_store = write_cam_store(net, entries, paths, d, shard=(i, n), **kw)
            mine = shard_parts(4, i, n)
            names = sorted(p.name for p in d.glob("cams-*.h5"))
            assert names == [f"cams-{k:05d}.h5" for k in mine]  # global part numbers
            shard_images = set(images[2 * mine.start:2 * mine.stop])  # parts of 2 images in sorted id order
            assert set(shard_store.click_ids()) == {e.entry_id for e in entries if e.image_id in shard_images}
        if n == 5:
            assert len(CamStore(dirs[4])) == 0  # 4 parts, 5 shards: the last one is an empty store
        merged = merge_cam_stores(dirs, tmp_path / f"n{n}" / "merged")
        got = _contents(merged)
        assert list(got) == list(want)  # same entries in the same order
        for cid, (m, meta, crop_maps) in want.items():
            np.testing.assert_array_equal(got[cid][0], m)
            assert got[cid][1] == meta
            if crop_maps is None:
                assert got[cid][2] is None
            else:
                np.testing.assert_array_equal(got[cid][2], crop_maps)
        assert sum(v[2] is not None for v in got.values()) >= 2  # the inspected images' crop maps came along
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / f"n{n}" / "merged" / "index.csv"),
                                      pd.read_csv(tmp_path / "one" / "index.csv"))
        # the parts are the shards' files (hard links), not copies
        for d in dirs:
            for part in d.glob("cams-*.h5"):
                assert os.path.samefile(part, tmp_path / f"n{n}" / "merged" / part.name)
        s_one = pd.read_json(tmp_path / "one" / "summary.json", typ="series")
        s_merged = pd.read_json(tmp_path / f"n{n}" / "merged" / "summary.json", typ="series")
        for k in ("entries", "images", "crops", "parts", "method", "layers", "crop_size"):
            assert s_merged[k] == s_one[k], k
        assert s_merged["shards"] == n and s_merged["computed_crops"] == s_one["computed_crops"] == 30


def test_merge_refuses_incomplete_or_foreign_shards_and_a_killed_shard_resumes_alone(tmp_path, cam_data):
    paths, selected = cam_data
    net = tiny_classifier()
    entries = click_entries(selected, ("a", "b", "c"))
    kw = dict(images_per_part=2, batch_size=5, progress=False)
    dirs = [tmp_path / f"shard{i}" for i in range(3)]
    write_cam_store(net, entries, paths, dirs[1], shard=(1, 3), **kw)
    write_cam_store(net, entries, paths, dirs[2], shard=(2, 3), **kw)
    write_cam_store(net, entries, paths, dirs[0], shard=(0, 3), stop_after_parts=1, **kw)  # killed after part 0
    with pytest.raises(ValueError, match=r"shard0: not a finished CAM shard \(no index.csv\)"):
        merge_cam_stores(dirs, tmp_path / "merged")
    with pytest.raises(ValueError, match=r"cover parts \[2, 3\], not each of the plan's 4 parts"):
        merge_cam_stores(dirs[1:], tmp_path / "merged")
    # shard 0 reruns alone and keeps its finished part; the other shards are not touched
    before = {p: p.stat().st_mtime_ns for d in dirs for p in d.glob("cams-*.h5")}
    write_cam_store(net, entries, paths, dirs[0], shard=(0, 3), **kw)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert sorted(p.name for p in dirs[0].glob("cams-*.h5")) == ["cams-00000.h5", "cams-00001.h5"]
    merged = merge_cam_stores(dirs, tmp_path / "merged")
    assert sorted(merged.click_ids()) == sorted(selected.click_id.unique())
    # a shard planned from other clicks is refused, naming it
    other = tmp_path / "other"
    write_cam_store(net, entries[:-1], paths, other, shard=(2, 3), **kw)
    with pytest.raises(ValueError, match=r"other: CAM shard from another plan"):
        merge_cam_stores([dirs[0], dirs[1], other], tmp_path / "merged2")


def test_merge_copies_parts_where_hard_links_fail(tmp_path, cam_data, monkeypatch):
    """On a filesystem without hard links between the directories, the parts are copied (same content)."""
    paths, selected = cam_data
    net = tiny_classifier()
    entries = click_entries(selected, ("a", "b", "c"))
    dirs = [tmp_path / f"shard{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        write_cam_store(net, entries, paths, d, shard=(i, 2), images_per_part=3, batch_size=4, progress=False)

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    merged = merge_cam_stores(dirs, tmp_path / "merged")
    summary = pd.read_json(tmp_path / "merged" / "summary.json", typ="series")
    assert summary["parts_copied"] == 3 and summary["parts_linked"] == 0
    for d in dirs:
        for part in d.glob("cams-*.h5"):
            copy = tmp_path / "merged" / part.name
            assert not os.path.samefile(part, copy) and copy.read_bytes() == part.read_bytes()
    assert sorted(merged.click_ids()) == sorted(selected.click_id.unique())
    assert not list((tmp_path / "merged").glob(".*tmp*"))


def test_generate_cams_stage_one_vs_three_shards(outputs, tmp_path):
    """The luigi stage: GenerateCAMs with 1 and with 3 GenerateCAMsShard tasks (same upstream outputs) publishes
    the same maps; shards hold the GPU resource, the merging task does not."""
    import luigi

    from tasks.base import gpu_resource
    from tasks.cams import GenerateCAMs, GenerateCAMsShard

    common = dict(synth_trainval=5, synth_test=1, synth_image_px=96, data_root=str(tmp_path / "data"),
                  ss_splits=["trainval"], ss_shards=1, ss_image_max_px=64, ss_box_min_px=4, classifier_weights="random",
                  classifier_epochs=1, classifier_input_px=32, classifier_batch_size=8, classifier_workers=0,
                  device="cpu", cam_images_per_part=2, cam_inspect_images=1)
    one, three = GenerateCAMs(cam_shards=1, **common), GenerateCAMs(cam_shards=3, **common)
    assert one.stage_dir != three.stage_dir  # the shard count is significant (as SelectiveSearch's ss_shards)
    assert len(three.requires()["shards"]) == 3
    assert three.requires()["shards"][0].resources == {gpu_resource(): 1} and three.resources == {}
    assert GenerateCAMsShard(**common).uses_gpu
    res = luigi.build([one, three], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status.name == "SUCCESS", res.summary_text
    with CamStore(one.stage_dir) as a, CamStore(three.stage_dir) as b:
        ca, cb = _contents(a), _contents(b)
    assert len(ca) >= 5 and list(ca) == list(cb)
    for cid in ca:
        np.testing.assert_array_equal(ca[cid][0], cb[cid][0])
        assert ca[cid][1] == cb[cid][1]
    parts = sorted(p.name for p in three.stage_dir.glob("cams-*.h5"))
    assert len(parts) == 3 and parts == sorted(p.name for p in one.stage_dir.glob("cams-*.h5"))  # 5 images
    for shard in three.requires()["shards"]:  # each shard computed one part, linked into the merged store
        (part,) = Path(shard.output().path).glob("cams-*.h5")
        assert part.name == f"cams-{shard.cam_shard:05d}.h5"
        assert os.path.samefile(part, three.stage_dir / part.name)
    summary = pd.read_json(three.stage_dir / "summary.json", typ="series")
    assert summary["shards"] == 3 and summary["mode"] == "clicks" and summary["clicks_without_crops"] == 0


# ---------------------------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------------------------
def test_env_info_reads_torchrun_variables():
    assert D.env_info({}) == D.DistInfo(0, 1, 0, 1)
    info = D.env_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert info == D.DistInfo(3, 4, 1, 2) and not info.is_main
    with pytest.raises(D.DistributedError, match="WORLD_SIZE='two' is not an integer"):
        D.env_info({"WORLD_SIZE": "two"})
    with pytest.raises(D.DistributedError, match="inconsistent"):
        D.env_info({"RANK": "2", "WORLD_SIZE": "2"})
    assert D.world_size() == 1 and D.is_main() and D.barrier() is None  # no process group: one process


def test_rank_batch_sampler_splits_each_global_batch():
    order = list(range(10, 33))  # 23 items
    dl = torch.utils.data.DataLoader(list(range(100)), batch_size=7, sampler=order, drop_last=True)
    want = [b.tolist() for b in dl]  # what one process trains on: 3 batches of 7
    assert list(D.RankBatchSampler(order, 7, True)) == want
    pieces = [list(D.RankBatchSampler(order, 7, True, rank=r, world=2)) for r in range(2)]
    assert [len(p) for p in pieces[0]] == [4, 4, 4] and [len(p) for p in pieces[1]] == [3, 3, 3]
    assert [a + b for a, b in zip(*pieces)] == want
    assert len(D.RankBatchSampler(order, 7, True, 1, 2)) == 3 and len(D.RankBatchSampler(order, 7, False)) == 4
    three = [list(D.RankBatchSampler(order, 7, True, rank=r, world=3)) for r in range(3)]
    assert [len(p) for p in three[2][:1]] == [2] and [a + b + c for a, b, c in zip(*three)] == want
    assert [a + b for a, b in zip(*[list(D.RankBatchSampler(order, 7, False, r, 2)) for r in range(2)])] == \
        want + [order[21:]]  # without drop_last the last, smaller batch is split too
    # ... unless it has fewer items than processes: it joins the batch before it (every rank steps every time)
    merged = [list(D.RankBatchSampler(order, 7, False, rank=r, world=3)) for r in range(3)]
    assert len(D.RankBatchSampler(order, 7, False, 0, 3)) == 3 and [len(p) for p in merged[0]] == [3, 3, 3]
    assert [a + b + c for a, b, c in zip(*merged)] == want[:2] + [order[14:]]
    assert len(D.RankBatchSampler(order, 7, False, max_batches=2)) == 2  # a cut keeps full batches
    assert list(D.RankBatchSampler(order, 7, False, 1, 2, max_batches=2)) == [order[4:7], order[11:14]]
    with pytest.raises(ValueError, match="a batch of 2 items cannot be split over 3 processes"):
        list(D.RankBatchSampler(order[:2], 7, False, rank=0, world=3))
    with pytest.raises(ValueError, match="smaller than the 8 processes"):
        D.RankBatchSampler(order, 7, True, 0, 8)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        D.RankBatchSampler(order, 7, True, 2, 2)


@pytest.fixture(scope="module")
def toy_crops(tmp_path_factory):
    """24 crops of 12 images: a red or green square on grey noise (class = colour), two crops per square."""
    d = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    rows, sel = [], []
    for i in range(12):
        img = rng.integers(60, 200, size=(48, 48, 1), dtype=np.uint8).repeat(3, 2)
        s = int(rng.integers(12, 30))
        x0, y0 = (int(v) for v in rng.integers(0, 48 - s, size=2))
        cls = "red" if i % 2 == 0 else "green"
        img[y0:y0 + s, x0:x0 + s] = (255, 0, 0) if cls == "red" else (0, 255, 0)
        cv2.imwrite(str(d / f"im{i}.png"), img[:, :, ::-1])
        rows.append((f"im{i}", "trainval", 48, 48, str(d / f"im{i}.png")))
        sel.append((i, f"im{i}", cls, x0, y0, x0 + s, y0 + s))
        sel.append((i, f"im{i}", cls, max(0, x0 - 3), max(0, y0 - 3), min(48, x0 + s + 3), min(48, y0 + s + 3)))
    return (pd.DataFrame(rows, columns=["image_id", "split", "width", "height", "path"]),
            pd.DataFrame(sel, columns=["click_id", "image_id", "class", "x1", "y1", "x2", "y2"]))


@pytest.mark.slow  # torchrun
def test_two_ddp_processes_on_cpu_match_one_process(toy_crops, tmp_path):
    """torchrun with 2 gloo processes: batches of 7 split 4 + 3 (the rank losses weighted by their share), so
    the optimizer steps, the logged loss and the final weights are one process's (up to summation order)."""
    torch.set_num_threads(1)
    images, sel = toy_crops
    classes = ("red", "green")
    cfg = TrainConfig(epochs=2, batch_size=7, lr=0.05, workers=0, device="cpu", seed=0, shuffle_window=4)

    def setup():
        model = tiny_classifier(len(classes), input_size=24)
        ds = selection_dataset(sel, images, classes, input_size=24, mean=model.mean, std=model.std, seed=0)
        return model, ds

    single, ds = setup()
    want = train_classifier(single, ds, tmp_path / "one", cfg, progress=False)
    model, ds = setup()
    got = train_classifier_distributed(model, ds, tmp_path / "two", cfg, nproc=2, progress=False)
    assert got.epoch.tolist() == [1, 2] and got.crops.tolist() == want.crops.tolist() == [21, 21]
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-4)
    assert got.accuracy.tolist() == want.accuracy.tolist()
    assert want.loss.iloc[1] < want.loss.iloc[0]  # it learned something
    ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    ref = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["lr_scheduler"]["last_epoch"] == ref["lr_scheduler"]["last_epoch"] == 6
    for k, v in ref["model"].items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-4, atol=1e-5)  # handed back to the caller
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.pt", "train_log.csv"]  # no job file
    assert not model.training


@pytest.mark.slow  # torchrun
def test_ddp_launch_failure_is_a_clear_error(tmp_path):
    """A failing process: the error names the target and the rank's own exception (not only torchrun's
    summary), and leaves no error files behind."""
    with pytest.raises(D.DistributedError, match=r"torchrun with 1 processes running pipeline\.distributed:"
                                                 r"no_such_function failed \(exit code 1\): rank0: AttributeError: "
                                                 r"module 'pipeline\.distributed' has no attribute 'no_such_function'"):
        D.launch("pipeline.distributed:no_such_function", {}, 1, tmp_path, device="cpu")
    assert not list(tmp_path.glob("ddp_error_*"))
    with pytest.raises(ValueError, match="not 'module:function'"):
        D.launch("pipeline.distributed", {}, 2, tmp_path)


@pytest.mark.slow  # torchrun
def test_train_classifier_stage_with_two_processes(outputs, tmp_path):
    """TrainClassifier --classifier-nproc 2 runs torchrun from the luigi worker and publishes a loadable model;
    the process count is not part of the output's identity."""
    import luigi
    import luigi.configuration

    from pipeline.classifier import load_classifier
    from tasks.base import gpu_resource
    from tasks.classifier import TrainClassifier

    common = dict(data_root=str(tmp_path / "data"), synth_trainval=5, synth_test=1, synth_image_px=96,
                  ss_image_max_px=64, ss_box_min_px=4, ss_shards=1, ss_splits=["trainval"], classifier_weights="random",
                  classifier_epochs=2, classifier_batch_size=4, classifier_input_px=32, classifier_workers=0,
                  device="cpu", classifier_max_crops_per_class=3)
    task = TrainClassifier(classifier_nproc=2, **common)
    assert task.stage_dir == TrainClassifier(**common).stage_dir
    # a DDP run takes as many units of the machine's GPU resource as it has processes, at most the configured ones
    assert task.resources == {gpu_resource(): 1}  # nothing configured: luigi's 1 unit
    config = luigi.configuration.get_config()
    if not config.has_section("resources"):
        config.add_section("resources")
    config.set("resources", gpu_resource(), "4")
    try:
        assert task.resources == {gpu_resource(): 2}
    finally:
        config.remove_option("resources", gpu_resource())
    res = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status.name == "SUCCESS", res.summary_text
    d = task.stage_dir
    assert sorted(p.name for p in d.iterdir()) == ["model.pt", "params.json", "report.json", "train_log.csv"]
    model = load_classifier(d / "model.pt", "cpu")
    assert model.classes == task.manifest().classes and model.input_size == 32
    report = pd.read_json(d / "report.json", typ="series")
    log = pd.read_csv(d / "train_log.csv")
    n = report["training_items"]
    assert report["processes"] == 2 and log.epoch.tolist() == [1, 2]
    assert log.crops.tolist() == [n // 4 * 4] * 2 and np.isfinite(log.loss).all()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, len(model.classes)) and torch.isfinite(out).all()
