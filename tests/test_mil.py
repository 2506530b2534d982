"""Click-supervised MIL (pipeline/mil.py, tasks/mil.py): the box-center score and the initial window against hand
values, candidates and negatives, the appearance model, re-localisation by the argmax of the product, folds that
never train on their held-out images, determinism, two clicks, and the MILBoxes stage behind PseudoLabels."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import mil
from pipeline.mil import MILParams, box_center_score, init_window


# -- scores and geometry against hand values ------------------------------------------------------------------
def test_box_center_score_hand_values():
    # box (10, 20, 30, 60): center (20, 40), area 800; click (23, 44): d = 5
    box = [[10, 20, 30, 60]]
    d_area = 5 / np.sqrt(800)  # 0.176777
    assert box_center_score(box, (23, 44), 0.25)[0] == pytest.approx(np.exp(-d_area ** 2 / (2 * 0.25 ** 2)))
    assert box_center_score(box, (23, 44), 0.25)[0] == pytest.approx(0.7788007831)  # exp(-1/4)
    # divided by the diagonal of a 30 x 40 image (50 px): d = 0.1, sigma 0.1 -> exp(-1/2)
    assert box_center_score(box, (23, 44), 0.1, "diagonal", (30, 40))[0] == pytest.approx(0.6065306597)
    # a click on the center scores 1; the score falls with the distance, is symmetric, and one click per box works
    s = box_center_score([[0, 0, 10, 10]] * 4, [(5, 5), (8, 9), (2, 1), (5, 15)], 0.5)
    np.testing.assert_allclose(s, [1.0, np.exp(-0.5), np.exp(-0.5), np.exp(-2.0)])
    # sqrt_area: a larger box is more tolerant of the same pixel distance
    big, small = box_center_score([[0, 0, 100, 100], [40, 40, 60, 60]], (55, 55), 0.2)
    assert big > small
    np.testing.assert_allclose(mil.log_box_center_score(box, (23, 44), 0.25), [-0.25])
    with pytest.raises(ValueError, match="image_size"):
        box_center_score(box, (23, 44), 0.1, "diagonal")


def test_init_window_is_the_largest_click_centred_window_inside_the_image():
    np.testing.assert_allclose(init_window(30, 10, 100, 50), [0, 0, 60, 20])
    np.testing.assert_allclose(init_window(70, 30, 100, 50), [40, 10, 100, 50])
    np.testing.assert_allclose(init_window(50, 25, 100, 50), [0, 0, 100, 50])


def test_click_candidates_contain_the_click_nearest_first_capped():
    props = np.array([[0, 0, 10, 10], [0, 0, 100, 100], [40, 40, 60, 60], [45, 45, 58, 58], [70, 70, 90, 90]],
                     np.float32)
    cand = mil.click_candidates(props, 50, 50, cap=10)
    np.testing.assert_array_equal(cand, props[[1, 2, 3]])  # centers at 0, 0 (store order) and 2.1 px
    np.testing.assert_array_equal(mil.click_candidates(props, 50, 50, cap=2), props[[1, 2]])
    assert len(mil.click_candidates(props, 200, 200, cap=5)) == 0


def test_negative_sample_is_seeded_per_image():
    props = np.arange(400, dtype=np.float32).reshape(100, 4)
    a = mil.negative_sample(props, 10, 0, "img1")
    np.testing.assert_array_equal(a, mil.negative_sample(props, 10, 0, "img1"))
    assert not np.array_equal(a, mil.negative_sample(props, 10, 1, "img1"))
    assert not np.array_equal(a, mil.negative_sample(props, 10, 0, "img2"))
    assert (np.diff(a[:, 0]) > 0).all()  # store order
    assert len(mil.negative_sample(props[:5], 10, 0, "img1")) == 5


def test_params_are_checked():
    with pytest.raises(ValueError, match="center_norm"):
        MILParams(center_norm="pixels")
    with pytest.raises(ValueError, match="folds"):
        MILParams(folds=1)


# -- the appearance model ---------------------------------------------------------------------------------------
def _blobs(n=60, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, d))
    y = np.zeros((n, 2))
    y[: n // 2, 0] = 1
    x[: n // 2, 0] += 3  # class 0 along axis 0
    y[n // 2:, 1] = 1
    x[n // 2:, 1] += 3  # class 1 along axis 1
    return x, y


def test_fit_appearance_separates_and_ignores_masked_entries():
    x, y = _blobs()
    mask = np.ones_like(y, bool)
    W, b = mil.fit_appearance(x, y, mask, l2=1e-3)
    p = 1 / (1 + np.exp(-(x @ W + b)))
    assert (p[:30, 0] > 0.5).mean() > 0.9 and (p[30:, 0] < 0.5).mean() > 0.9
    assert W[0, 0] > 0 and W[1, 1] > 0
    # an entry outside the mask does not count, whatever its target
    mask[:5, 1] = False
    y2 = y.copy()
    y2[:5, 1] = 1
    (w1, b1), (w2, b2) = mil.fit_appearance(x, y, mask, 1e-3), mil.fit_appearance(x, y2, mask, 1e-3)
    np.testing.assert_array_equal(w1, w2)  # and deterministic
    np.testing.assert_array_equal(b1, b2)


def test_relocalize_picks_the_argmax_of_each_click_first_on_ties():
    scores = np.array([0.1, 0.9, 0.3, -1.0, 2.0, 2.0, 0.0])
    offsets = np.array([0, 3, 4, 7])
    np.testing.assert_array_equal(mil.relocalize(scores, offsets, [0, 1, 2]), [1, 3, 4])
    np.testing.assert_array_equal(mil.relocalize(scores, offsets, [2]), [4])


# -- a small MIL dataset: real feature extraction with a tiny net on synthetic images ------------------------------
def _synthetic(tmp_path, n_images=12, pairs=False):
    """Images of 64 x 48 with a bright square (class a) or a dark disk-like square (class b) and random proposals;
    clicks near the object centers."""
    rng = np.random.default_rng(0)
    rows, clicks, proposals = [], [], {}
    for i in range(n_images):
        img = rng.integers(90, 140, (48, 64, 3), dtype=np.uint8)
        cls = "a" if i % 2 == 0 else "b"
        x1, y1 = int(rng.integers(2, 30)), int(rng.integers(2, 20))
        img[y1:y1 + 20, x1:x1 + 24] = 250 if cls == "a" else 10
        path = tmp_path / f"im{i}.png"
        Image.fromarray(img).save(path)
        rows.append((f"im{i}", 64, 48, str(path)))
        cx, cy = x1 + 12 + rng.normal(0, 1), y1 + 10 + rng.normal(0, 1)
        click = {"click_id": i, "image_id": f"im{i}", "class": cls, "x": cx, "y": cy}
        if pairs:
            d = rng.uniform(1, 4)
            click.update(n_clicks=2, x_a=cx - d, y_a=cy, x_b=cx + d, y_b=cy)
        clicks.append(click)
        p = rng.uniform(0, 1, (40, 4)) * [64, 48, 64, 48]
        p = np.column_stack([np.minimum(p[:, 0], p[:, 2]), np.minimum(p[:, 1], p[:, 3]),
                             np.maximum(p[:, 0], p[:, 2]) + 4, np.maximum(p[:, 1], p[:, 3]) + 4])
        proposals[f"im{i}"] = np.vstack([p, [[x1, y1, x1 + 24, y1 + 20]]]).clip(0, [64, 48, 64, 48]).astype(
            np.float32)
    images = pd.DataFrame(rows, columns=["image_id", "width", "height", "path"])
    return pd.DataFrame(clicks), images, proposals


PARAMS = MILParams(rounds=2, folds=3, negatives_per_image=10, image_side=64, pca_dims=0, max_iter=30)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from nets import tiny_classifier

    clicks, images, proposals = _synthetic(tmp_path_factory.mktemp("mil"))
    model = tiny_classifier(2, seed=0)
    data = mil.build_mil_data(model, clicks, images, proposals, ("a", "b"), PARAMS)
    return model, clicks, images, proposals, data


def test_build_mil_data_layout(small):
    _, clicks, _, proposals, data = small
    assert mil.feature_layer(small[0]) == "conv2"
    assert len(data.cand_offsets) == len(clicks) + 1
    assert data.cand_feats.shape[0] == data.cand_boxes.shape[0] == data.cand_offsets[-1]
    assert data.neg_feats.shape == (10 * len(data.image_ids), data.init_feats.shape[1])
    np.testing.assert_allclose(np.linalg.norm(data.cand_feats.astype(np.float32), axis=1), 1.0, atol=2e-3)
    owner = data.cand_click()
    xy = data.clicks[["x", "y"]].to_numpy()[owner]
    b = data.cand_boxes
    assert ((b[:, 0] <= xy[:, 0]) & (xy[:, 0] <= b[:, 2]) & (b[:, 1] <= xy[:, 1]) & (xy[:, 1] <= b[:, 3])).all()
    assert data.image_labels.sum() == len(clicks) and not data.no_proposal.any()
    # the initial windows are centred on the clicks
    np.testing.assert_allclose((data.init_boxes[:, 0] + data.init_boxes[:, 2]) / 2, data.clicks.x, atol=1e-4)


def test_folds_never_train_on_their_held_out_images(small):
    """The model of fold k is the same whatever the held-out images hold: their features, boxes and labels are
    replaced by noise, and it does not change."""
    data = small[4]
    chosen = data.init_feats
    folds = data.image_fold
    for k in range(PARAMS.folds):
        held = folds == k
        assert held.any() and (~held).any()
        x, y, mask = mil.fold_training_set(data, chosen, k)
        assert len(x) == int((~held[data.click_image]).sum() + (~held[data.neg_image]).sum())
        rng = np.random.default_rng(k)
        noisy = lambda a, rows: np.where(rows[:, None], rng.normal(size=a.shape), a).astype(a.dtype)  # noqa: E731
        labels = data.image_labels.copy()
        labels[held] = ~labels[held]
        other = dataclasses.replace(
            data, neg_feats=noisy(data.neg_feats, held[data.neg_image]), image_labels=labels,
            cand_feats=noisy(data.cand_feats, held[data.click_image[data.cand_click()]]),
            click_class=np.where(held[data.click_image], 1 - data.click_class, data.click_class))
        chosen2 = noisy(chosen, held[data.click_image])
        a, b = mil.fit_fold(data, chosen, k, PARAMS), mil.fit_fold(other, chosen2, k, PARAMS)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_relocalisation_takes_the_argmax_of_appearance_times_center_score(small):
    data = small[4]
    params = dataclasses.replace(PARAMS, rounds=1)
    prior = mil.log_prior(data, params)
    res = mil.run_mil(data, params, prior)
    # the appearance scores are those of each fold's model trained on the initial windows of the other folds
    owner, folds = data.cand_click(), data.click_fold
    for k in range(params.folds):
        sel = np.flatnonzero(folds[owner] == k)
        logits = mil.fold_logits(data, mil.fit_fold(data, data.init_feats, k, params), sel)
        np.testing.assert_allclose(res.cand_log_app[sel], -np.logaddexp(0, -logits), rtol=1e-6)
    # each click's box is the candidate with the largest p_app * s_bc
    product = np.exp(res.cand_log_app) * box_center_score(data.cand_boxes, data.clicks[["x", "y"]].to_numpy()[owner],
                                                           params.sigma_bc)
    for i in range(len(data.click_image)):
        a, b = data.cand_offsets[i], data.cand_offsets[i + 1]
        assert res.choice[i] == a + int(np.argmax(product[a:b]))
    boxes, _ = mil.mil_boxes(data, params)
    np.testing.assert_allclose(boxes.score, boxes.p_app * boxes.s_bc * boxes.s_ba, rtol=1e-6)
    by_click = boxes.set_index("click_id").loc[data.clicks.click_id]  # the table is in click_id order
    np.testing.assert_allclose(by_click.score, product[res.choice], rtol=1e-6)
    np.testing.assert_array_equal(by_click[["x1", "y1", "x2", "y2"]].to_numpy(), data.cand_boxes[res.choice])


def test_mil_is_deterministic_and_depends_on_the_seed(small):
    model, clicks, images, proposals, data = small
    a, rep = mil.mil_boxes(data, PARAMS)
    again = mil.build_mil_data(model, clicks, images, proposals, ("a", "b"), PARAMS)
    b, _ = mil.mil_boxes(again, PARAMS)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns[:10]) == ["image_id", "class", "x1", "y1", "x2", "y2", "score", "click_id", "fallback",
                                    "status"]
    assert len(rep["changed_per_round"]) == PARAMS.rounds and rep["changed_per_round"][0] == 1.0
    other = mil.build_mil_data(model, clicks, images, proposals, ("a", "b"), dataclasses.replace(PARAMS, seed=3))
    assert not np.array_equal(other.neg_feats, data.neg_feats)  # another negative sample


def test_pca_projection_is_deterministic_and_keeps_the_layout(small):
    data = small[4]
    p1, kept = mil.project_pca(data, 4)
    p2, _ = mil.project_pca(data, 4)
    assert p1.cand_feats.shape == (len(data.cand_feats), 4) and 0 < kept < 1
    np.testing.assert_array_equal(p1.cand_feats, p2.cand_feats)
    assert mil.project_pca(data, 0)[0] is data


def test_click_inside_no_proposal_keeps_its_initial_window(tmp_path):
    from nets import tiny_classifier

    clicks, images, proposals = _synthetic(tmp_path, n_images=6)
    proposals["im0"] = np.array([[0, 0, 5, 5]], np.float32)  # away from the click
    data = mil.build_mil_data(tiny_classifier(2), clicks, images, proposals, ("a", "b"),
                              dataclasses.replace(PARAMS, folds=2))
    boxes, rep = mil.mil_boxes(data, dataclasses.replace(PARAMS, folds=2))
    row = boxes[boxes.click_id == 0].iloc[0]
    assert row.status == mil.NO_PROPOSAL and row.fallback and rep["no_proposal"] == 1
    np.testing.assert_allclose(row[["x1", "y1", "x2", "y2"]].to_numpy(float), data.init_boxes[0])


def test_two_clicks_add_the_cross_fitted_area_score(tmp_path):
    from nets import tiny_classifier

    clicks, images, proposals = _synthetic(tmp_path, pairs=True)
    clicks.loc[0, ["n_clicks", "x_b", "y_b"]] = [1, np.nan, np.nan]  # a lone click: no area evidence
    data = mil.build_mil_data(tiny_classifier(2), clicks, images, proposals, ("a", "b"), PARAMS)
    boxes, rep = mil.mil_boxes(data, dataclasses.replace(PARAMS, area_folds=2))
    assert len(rep["area_models"]) == 2 and "first_pass_changed_per_round" in rep
    assert boxes.loc[boxes.click_id == 0, "s_ba"].item() == 1.0
    assert ((boxes.s_ba > 0) & (boxes.s_ba <= 1)).all() and (boxes.s_ba < 1).any()
    np.testing.assert_allclose(boxes.score, boxes.p_app * boxes.s_bc * boxes.s_ba, rtol=1e-6)


# -- the stage ---------------------------------------------------------------------------------------------------
def test_pseudo_labels_box_method_selects_the_stage_and_hashes_only_its_ref(tmp_path):
    from tasks.main import PseudoLabels
    from tasks.mil import MILBoxes
    from tasks.pseudo import FusePseudoBoxes

    common = dict(data_root=str(tmp_path / "data"))
    cam, cam_again = PseudoLabels(**common), PseudoLabels(**common, mil_rounds=5)
    assert isinstance(cam.requires(), FusePseudoBoxes)
    assert cam.stage_hash == cam_again.stage_hash  # a MIL parameter does not move a CAM run
    assert cam.significant_params() == {"box_method": "cam"}  # the rest is in the box stage's ref
    run = PseudoLabels(**common, box_method="mil")
    assert isinstance(run.requires(), MILBoxes) and run.stage_hash != cam.stage_hash
    assert run.significant_params() == {"box_method": "mil"}
    assert PseudoLabels(**common, box_method="mil", mil_rounds=5).stage_hash != run.stage_hash
    assert set(run.requires().requires()) == {"dataset", "proposals", "classifier"}


@pytest.mark.slow
def test_mil_boxes_stage_writes_the_pseudo_label_files(outputs, tmp_path):
    """The whole chain on 4 tiny synthetic images (a random-weight classifier), PseudoLabels --box-method mil."""
    import harness as H
    import luigi

    from pipeline.export import read_pseudo_labels
    from pipeline.io import read_json
    from tasks.main import PseudoLabels

    task = PseudoLabels(data_root=str(tmp_path / "data"), synth_trainval=6, synth_test=1, synth_image_px=96,
                        ss_image_max_px=64, ss_box_min_px=4, ss_shards=1, classifier_weights="random",
                        classifier_epochs=1, classifier_input_px=64, device="cpu", box_method="mil", mil_folds=2,
                        mil_rounds=2, mil_image_side_px=96, mil_negatives_per_image=10, report_images=2, report_worst=1)
    res = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status.name == "SUCCESS", res.summary_text
    out = task.requires().stage_dir
    labels = read_pseudo_labels(out / "pseudo_labels.csv")
    manifest = task.requires().manifest()
    assert sorted(labels.click_id) == sorted(manifest.clicks.click_id)
    assert (out / "report" / "index.html").is_file()
    assert not H.incomplete_outputs(outputs)  # every published directory holds its files (harness.STAGE_FILES)
    m = read_json(out / "metrics.json")
    assert m["params"]["box_method"] == "mil" and "corloc" in m["metrics"]
    assert read_json(task.stage_dir / "summary.json")["files"]["pseudo_labels_csv"].startswith(str(out.resolve()))
