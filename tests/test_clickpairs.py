"""Two clicks per object: pairing, the area model, its cross-fitting and the box area score."""
import numpy as np
import pandas as pd
import pytest

from pipeline.clickpairs import (AreaModel, area_score, crossfit_area, fit_area_model, image_fold, pair_clicks,
                                 pair_distance)


def _clicks(rows):
    return pd.DataFrame(rows, columns=["image_id", "class", "x", "y", "annotator", "object_index"])


def test_pairs_by_object_index_with_a_lone_click():
    clicks = _clicks([
        ("a", "dog", 10, 20, 1, 0), ("a", "dog", 14, 24, 2, 0),
        ("a", "cat", 100, 50, 1, 1), ("a", "cat", 90, 60, 2, 1),
        ("b", "dog", 5, 5, 2, 0),  # annotator 1 missed this one
    ])
    objects, report = pair_clicks(clicks, (1, 2))
    assert report == {"annotators": [1, 2], "pairs": 2, "by_object_index": 2, "by_assignment": 0,
                      "lone": {1: 0, 2: 1}}
    dog = objects[(objects.image_id == "a") & (objects["class"] == "dog")].iloc[0]
    assert (dog.x, dog.y, dog.n_clicks) == (12.0, 22.0, 2)
    assert (dog.x_a, dog.y_a, dog.x_b, dog.y_b) == (10, 20, 14, 24)
    lone = objects[objects.image_id == "b"].iloc[0]
    assert (lone.x, lone.y, lone.n_clicks, lone.annotator) == (5, 5, 1, 2)
    assert np.isnan(lone.x_b)
    np.testing.assert_allclose(pair_distance(objects.iloc[:2]), sorted([np.hypot(4, 4), np.hypot(10, 10)],
                                                                       key=lambda d: d != np.hypot(10, 10)))


def test_pairs_by_assignment_within_image_and_class():
    # no object_index: the nearest-total assignment, never across classes; an odd click stays alone
    clicks = _clicks([
        ("a", "dog", 10, 10, 1, -1), ("a", "dog", 100, 100, 1, -1), ("a", "dog", 300, 10, 1, -1),
        ("a", "dog", 98, 103, 2, -1), ("a", "dog", 12, 9, 2, -1),
        ("a", "cat", 11, 11, 2, -1),  # nearest to the first dog click, but another class
    ])
    objects, report = pair_clicks(clicks, (1, 2))
    assert report["pairs"] == 2 and report["by_assignment"] == 2 and report["by_object_index"] == 0
    assert report["lone"] == {1: 1, 2: 1}
    pairs = objects[objects.n_clicks == 2].sort_values("x_a")
    assert pairs[["x_a", "y_a", "x_b", "y_b"]].to_numpy().tolist() == [[10, 10, 12, 9], [100, 100, 98, 103]]
    assert set(objects[objects.n_clicks == 1]["class"]) == {"dog", "cat"}


def test_assignment_is_optimal_not_greedy():
    # greedy nearest-first pairs 3-2 (1) and then 0-5 (5): total 6; the optimal assignment 0-2, 3-5 totals 4
    clicks = _clicks([("a", "dog", 0, 0, 1, -1), ("a", "dog", 3, 0, 1, -1),
                      ("a", "dog", 2, 0, 2, -1), ("a", "dog", 5, 0, 2, -1)])
    objects, _ = pair_clicks(clicks, (1, 2))
    assert pair_distance(objects).sum() == pytest.approx(4.0)
    assert sorted(objects[["x_a", "x_b"]].to_numpy().tolist()) == [[0, 2], [3, 5]]


def test_pairing_errors_name_the_problem():
    with pytest.raises(ValueError, match="annotator 1 says 'dog', annotator 2 says 'cat'"):
        pair_clicks(_clicks([("a", "dog", 1, 1, 1, 0), ("a", "cat", 2, 2, 2, 0)]))
    with pytest.raises(ValueError, match="clicked object 0 of image a 2 times"):
        pair_clicks(_clicks([("a", "dog", 1, 1, 1, 0), ("a", "dog", 2, 2, 1, 0), ("a", "dog", 2, 2, 2, 0)]))
    with pytest.raises(ValueError, match="two distinct annotators"):
        pair_clicks(_clicks([("a", "dog", 1, 1, 1, 0)]), (1, 1))


def _simulated_pairs(n=4000, k=0.08, seed=0, square=False):
    """Objects with log-uniform sides and two clicks each with per-axis error k * side (as the click simulator)."""
    rng = np.random.default_rng(seed)
    w, h = np.exp(rng.uniform(np.log(10), np.log(400), (2, n)))
    if square:
        h = w
    ex, ey = rng.standard_normal((2, 2, n))
    d = np.hypot(k * w * (ex[0] - ex[1]), k * h * (ey[0] - ey[1]))
    return d, w * h


def test_area_model_is_monotone_and_recovers_the_error_model():
    d, area = _simulated_pairs()
    free = fit_area_model(d, area)
    assert free.slope > 0.5  # the distance carries the size
    # square objects: d^2 / area ~ 2 k^2 chi2_2, so E[log area - 2 log d] = -log(4 k^2) + Euler's gamma
    fixed = fit_area_model(*_simulated_pairs(square=True), slope=2.0)
    assert fixed.intercept == pytest.approx(-np.log(4 * 0.08 ** 2) + np.euler_gamma, abs=0.1)
    grid = np.array([0.0, 0.5, 1, 2, 5, 10, 50, 200])
    for model in (free, fixed):
        mu = model.expected_log_area(grid)
        assert np.all(np.diff(mu) >= 0) and np.all(np.isfinite(mu))
    # a fitted negative slope is clipped: a larger distance never predicts a smaller object
    assert fit_area_model([1, 2, 4, 8], [100, 50, 25, 12]).slope == 0.0
    with pytest.raises(ValueError, match="at least 3"):
        fit_area_model([1, np.nan, 3], [10, 10, np.nan])


def test_crossfit_never_uses_an_images_own_reference_box():
    d, area = _simulated_pairs(n=400, seed=1)
    ids = [f"img{i // 2}" for i in range(len(d))]  # two objects per image
    mu, sigma, models = crossfit_area(ids, d, area, folds=5)
    assert len(models) == 5 and np.isfinite(mu).all()
    # wreck the reference boxes of one image: its own estimates must not move, other folds' must
    target = "img7"
    mine = np.array([i == target for i in ids])
    bad = area.copy()
    bad[mine] = 1e9
    mu2, sigma2, _ = crossfit_area(ids, d, bad, folds=5)
    np.testing.assert_array_equal(mu2[mine], mu[mine])
    np.testing.assert_array_equal(sigma2[mine], sigma[mine])
    other_folds = np.array([image_fold(i, 5) != image_fold(target, 5) for i in ids])
    assert np.all(mu2[other_folds] != mu[other_folds])
    # each image's estimate is the model fitted without its fold
    f = image_fold(target, 5)
    np.testing.assert_allclose(mu[mine], models[f].expected_log_area(d[mine]))


def test_area_score_hand_values():
    assert area_score(100.0, np.log(100.0), 0.5) == pytest.approx(1.0)
    assert area_score(100.0 * np.exp(0.5), np.log(100.0), 0.5) == pytest.approx(np.exp(-0.5))
    assert area_score(100.0 / np.exp(1.0), np.log(100.0), 0.5) == pytest.approx(np.exp(-2.0))
    assert area_score(0.0, 1.0, 1.0) == 0.0
    assert AreaModel(1.0, 2.0, 0.5).expected_log_area(np.e) == pytest.approx(3.0)


def test_manifest_with_two_annotators_pairs_every_object(sample_root):
    from pipeline.clicks import ClickFileError
    from pipeline.dataset import build_manifest

    root, clicks = sample_root / "VOC2007", sample_root / "clicks_trainval.csv"
    one = build_manifest(root, clicks, splits=("trainval",), annotator=1, check_images=False).clicks
    pairs = build_manifest(root, clicks, splits=("trainval",), annotator=(1, 2), check_images=False)
    assert pairs.report["clicks"]["pairs"]["pairs"] == len(one) == len(pairs.clicks)
    both = pd.read_csv(clicks, dtype={"image_id": str})
    mean = both.groupby(["image_id", "object_index"])[["x", "y"]].mean()
    got = pairs.clicks.set_index(["image_id", "object_index"]).loc[mean.index]
    np.testing.assert_allclose(got[["x", "y"]].to_numpy(), mean.to_numpy())
    assert (got.n_clicks == 2).all()
    with pytest.raises(ClickFileError, match=r"no click of annotator 3; annotators present: \[1, 2\]"):
        build_manifest(root, clicks, splits=("trainval",), annotator=(1, 3), check_images=False)


def test_choose_by_area_picks_the_candidate_nearest_the_expected_area():
    from pipeline.clickpairs import choose_by_area

    rng = np.random.default_rng(0)
    sides = np.array([10.0, 20.0, 40.0, 80.0])  # candidate box sides at thresholds 200, 150, 100, 50
    n = 60
    true = rng.choice(sides, n)
    clicks = pd.DataFrame({"click_id": range(n), "image_id": [f"i{k}" for k in range(n)],
                           "n_clicks": 2, "x_a": 100.0, "y_a": 100.0, "x_b": 100.0 + true / 4, "y_b": 100.0})
    clicks.loc[0, ["n_clicks", "x_b", "y_b"]] = [1, np.nan, np.nan]  # a lone click keeps its box
    cands = pd.DataFrame([(k, t, 100 - s / 2, 100 - s / 2, 100 + s / 2, 100 + s / 2, 0.5)
                          for k in range(n) for t, s in zip((200.0, 150.0, 100.0, 50.0), sides)],
                         columns=["click_id", "threshold", "x1", "y1", "x2", "y2", "score"])
    default = cands[cands.threshold == 50.0].assign(status="ok").reset_index(drop=True)
    ref = pd.Series(true ** 2, index=range(n))  # reference boxes (e.g. ground truth of other images)
    out, report = choose_by_area(default, cands, clicks, map_sigma=None, reference_area=ref)
    got = (out.x2 - out.x1).to_numpy()
    assert got[0] == 80.0 and np.isnan(out.area_mu[0])
    np.testing.assert_array_equal(got[1:], true[1:])  # the distance says the size exactly here
    assert report["paired"] == n - 1 and report["chosen"] == n - 1
    # a map term that trusts the default box fully keeps it
    kept, _ = choose_by_area(default, cands, clicks, map_sigma=1e-6, reference_area=ref)
    np.testing.assert_array_equal((kept.x2 - kept.x1).to_numpy(), 80.0)


def test_reference_areas_by_object_index_else_smallest_containing_box():
    from pipeline.clickpairs import reference_areas

    objects = pd.DataFrame([("a", 0, "dog", 0, 0, 100, 100), ("a", 1, "dog", 10, 10, 30, 30),
                            ("a", 2, "cat", 0, 0, 50, 50)],
                           columns=["image_id", "object_index", "class", "x1", "y1", "x2", "y2"])
    clicks = pd.DataFrame({"click_id": [0, 1, 2, 3], "image_id": ["a", "a", "a", "b"],
                           "class": ["dog", "dog", "dog", "dog"], "x": [20.0, 20.0, 60.0, 5.0],
                           "y": [20.0, 20.0, 60.0, 5.0], "object_index": [0, -1, -1, -1]})
    got = reference_areas(clicks, objects)
    assert got[0] == 100 * 100  # named by its object_index, though a smaller dog box holds the click
    assert got[1] == 20 * 20  # the smallest dog box holding the click (not the cat's)
    assert got[2] == 100 * 100 and np.isnan(got[3])  # only the big box holds it; image b is not annotated


def test_extent_model_recovers_the_click_noise_and_the_maps_spread():
    """Self-calibration on simulated pairs: clicks with per-axis error k * side, default boxes whose log sides are
    off by N(0, sigma^2): the fit recovers both from the pairs and the default boxes alone."""
    from pipeline.clickpairs import TooFewPairs, fit_extent_model

    rng = np.random.default_rng(0)
    n, k, sigma = 20000, 0.08, 0.4
    w, h = rng.uniform(20, 300, n), rng.uniform(20, 300, n)
    dx, dy = rng.normal(0, np.sqrt(2) * k * w), rng.normal(0, np.sqrt(2) * k * h)
    w0, h0 = w * np.exp(rng.normal(0, sigma, n)), h * np.exp(rng.normal(0, sigma, n))
    m = fit_extent_model(dx, dy, w0, h0)
    assert m.k == pytest.approx(k, rel=0.06) and m.sigma == pytest.approx(sigma, rel=0.1)
    ref = fit_extent_model(dx, dy, w0, h0, ref_w=w, ref_h=h)  # reference boxes: k from them, sigma directly
    assert ref.k == pytest.approx(k, rel=0.03) and ref.sigma == pytest.approx(sigma, rel=0.03)
    with pytest.raises(TooFewPairs, match="at least 3 click pairs"):
        fit_extent_model([1.0, np.nan], [1.0, 2.0], [10.0, 10.0], [10.0, 10.0])


def test_extent_posterior_hand_values():
    from pipeline.clickpairs import ExtentModel

    m = ExtentModel(k=0.1, sigma=0.5)
    # a box of sides 100 x 50, the default box 100 x 100: s = sqrt(2) * 0.1 * side per axis
    sx, sy = np.sqrt(2) * 10, np.sqrt(2) * 5
    want = (-np.log(sx) - 3.0 ** 2 / (2 * sx ** 2) - np.log(sy) - 4.0 ** 2 / (2 * sy ** 2)
            - np.log(0.5) ** 2 / (2 * 0.25))
    assert float(m.log_posterior(3.0, 4.0, 100.0, 50.0, 100.0, 100.0)) == pytest.approx(want)
    # the pair's spread along an axis moves the box's side along that axis only
    sides = np.array([25.0, 50.0, 100.0, 200.0])
    wide = m.log_posterior(40.0, 2.0, sides[:, None], sides[None, :], 60.0, 60.0)
    i, j = np.unravel_index(np.argmax(wide), wide.shape)
    assert sides[i] > sides[j]


def test_choose_by_extent_follows_each_axis_and_is_cross_fitted():
    """Candidates of 4 widths x 4 heights; the pair's x / y differences say the object's width / height. A lone
    click and a fallback keep their box. Cross-fitting: changing the clicks of one fold's images leaves that
    fold's own model unchanged (the test fails if a click's own pair entered its model)."""
    from pipeline.clickpairs import choose_by_extent, image_fold

    rng = np.random.default_rng(1)
    sides = np.array([20.0, 40.0, 80.0, 160.0])
    n = 1000
    tw, th = rng.choice(sides, n), rng.choice(sides, n)
    dx, dy = rng.normal(0, np.sqrt(2) * 0.08 * tw), rng.normal(0, np.sqrt(2) * 0.08 * th)
    clicks = pd.DataFrame({"click_id": range(n), "image_id": [f"i{k}" for k in range(n)], "n_clicks": 2,
                           "x_a": 200.0, "y_a": 200.0, "x_b": 200.0 + dx, "y_b": 200.0 + dy})
    clicks.loc[0, ["n_clicks", "x_b", "y_b"]] = [1, np.nan, np.nan]
    rows, t = [], 0
    for k in range(n):
        for a in sides:
            for b in sides:
                rows.append((k, float(t % 24 * 10 + 10), 200 - a / 2, 200 - b / 2, 200 + a / 2, 200 + b / 2, 0.5))
                t += 1
    cands = pd.DataFrame(rows, columns=["click_id", "threshold", "x1", "y1", "x2", "y2", "score"])
    # the default boxes: the true box with log-normal error (the map's evidence)
    w0, h0 = tw * np.exp(rng.normal(0, 0.5, n)), th * np.exp(rng.normal(0, 0.5, n))
    default = pd.DataFrame({"click_id": range(n), "image_id": clicks.image_id, "class": "dog",
                            "x1": 200 - w0 / 2, "y1": 200 - h0 / 2, "x2": 200 + w0 / 2, "y2": 200 + h0 / 2,
                            "score": 0.5, "threshold": 50.0, "status": "ok"})
    default.loc[1, "status"] = "fallback"
    out, report = choose_by_extent(default, cands, clicks)
    got_w, got_h = (out.x2 - out.x1).to_numpy(), (out.y2 - out.y1).to_numpy()
    assert got_w[0] == pytest.approx(w0[0]) and got_w[1] == pytest.approx(w0[1])  # lone click, fallback: kept
    hit = (got_w[2:] == tw[2:]) & (got_h[2:] == th[2:])
    nearest = lambda v: sides[np.abs(np.log(sides)[None] - np.log(v)[:, None]).argmin(1)]  # noqa: E731
    prior_only = (nearest(w0[2:]) == tw[2:]) & (nearest(h0[2:]) == th[2:])
    assert hit.mean() > prior_only.mean() + 0.04  # the clicks' spread adds to the map's evidence (0.48 vs 0.40)
    assert report["paired"] == n - 1 and report["chosen"] == n - 2 and len(report["models"]) == 5
    # cross-fitting: scale the clicks of fold 0's images by 10; fold 0's own model must not move
    f0 = np.array([image_fold(i, 5) == 0 for i in clicks.image_id])
    moved = clicks.copy()
    moved.loc[f0, "x_b"] = 200.0 + 10 * dx[f0]
    moved.loc[f0, "y_b"] = 200.0 + 10 * dy[f0]
    assert report["changed"] == int((out.threshold != default.threshold).sum()) > 0
    _, report2 = choose_by_extent(default, cands, moved)
    assert report2["models"][0] == report["models"][0]
    assert report2["models"][1] != report["models"][1]


def test_side_prior_recovers_a_known_prior_from_the_click_differences_alone():
    """Objects whose log click-error scale follows a feature (slope 0.8) with spread 0.3; only the pairs'
    differences are given: the marginal-likelihood fit recovers the coefficients and the spread."""
    from pipeline.clickpairs import TooFewPairs, fit_side_prior

    rng = np.random.default_rng(3)
    n = 6000
    feat = rng.uniform(2, 6, n)
    X = np.column_stack([np.ones(n), feat])
    log_s = X @ np.array([-1.0, 0.8]) + rng.normal(0, 0.3, n)
    d = rng.normal(0, np.exp(log_s))
    prior = fit_side_prior(X, d)
    assert prior.beta == pytest.approx([-1.0, 0.8], abs=0.08) and prior.sigma == pytest.approx(0.3, abs=0.06)
    with pytest.raises(TooFewPairs, match="at least 6 click pairs"):
        fit_side_prior(X[:5], d[:5])


def test_extent_features_hand_values():
    from pipeline.clickpairs import extent_features

    boxes = pd.DataFrame({"click_id": [0, 1, 2], "image_id": ["a", "a", "b"], "class": ["dog", "cat", "dog"],
                          "x1": [0.0, 0, 0], "y1": [0.0, 0, 0], "x2": [40.0, 10, 100], "y2": [20.0, 10, 50]})
    clicks = pd.DataFrame({"click_id": [0, 1, 2], "image_id": ["a", "a", "b"], "class": ["dog", "cat", "dog"],
                           "x": [10.0, 13, 5], "y": [10.0, 14, 5]})
    X = extent_features(boxes, clicks, "x", ["dog"], image_sizes={"b": (30, 40)})
    # intercept, log own side, log other side, is-dog, log n in image, log n of class, log nearest, alone
    assert X[0] == pytest.approx([1, np.log(40), np.log(20), 1, np.log(2), 0, np.log(5), 0])
    assert X[1] == pytest.approx([1, np.log(10), np.log(10), 0, np.log(2), 0, np.log(5), 0])
    assert X[2] == pytest.approx([1, np.log(100), np.log(50), 1, 0, 0, np.log(50), 1])  # alone: the diagonal
    assert extent_features(boxes, clicks, "y", ["dog"])[0][1:3] == pytest.approx([np.log(20), np.log(40)])


def _learned_case(seed=4, n=1600):
    """Two classes with the same default boxes but true sides 2x apart (big: 2x the default box's, small: 1x):
    a prior around the default box cannot tell them apart, a prior learned with the class can."""
    rng = np.random.default_rng(seed)
    sides = np.array([20.0, 28.0, 40.0, 56.0, 80.0, 113.0, 160.0, 226.0, 320.0])
    cls = np.where(rng.random(n) < 0.5, "big", "small")
    base = rng.choice(sides[1:5], n)  # the default box's side (both axes)
    true = np.where(cls == "big", 2 * base / 1.414, base / 1.414)  # mean log side = the default box's
    dx, dy = rng.normal(0, np.sqrt(2) * 0.08 * true), rng.normal(0, np.sqrt(2) * 0.08 * true)
    ids = [f"i{k}" for k in range(n)]
    clicks = pd.DataFrame({"click_id": range(n), "image_id": ids, "class": cls, "n_clicks": 2, "x": 400.0,
                           "y": 400.0, "x_a": 400.0, "y_a": 400.0, "x_b": 400.0 + dx, "y_b": 400.0 + dy})
    rows = [(k, float(10 + 10 * j), 400 - s / 2, 400 - s / 2, 400 + s / 2, 400 + s / 2, 0.5)
            for k in range(n) for j, s in enumerate(sides)]
    cands = pd.DataFrame(rows, columns=["click_id", "threshold", "x1", "y1", "x2", "y2", "score"])
    default = pd.DataFrame({"click_id": range(n), "image_id": ids, "class": cls, "x1": 400 - base / 2,
                            "y1": 400 - base / 2, "x2": 400 + base / 2, "y2": 400 + base / 2, "score": 0.5,
                            "threshold": 50.0, "status": "ok"})
    return clicks, cands, default, true, sides


def test_choose_by_learned_extent_learns_the_class_and_is_cross_fitted():
    """The learned prior gets each class's scale from the click pairs (no box): its boxes match the true sides
    more often than the default-box prior's (choose_by_extent). Lone clicks and fallbacks keep their box; the
    report counts the changed thresholds; cross-fitting: changing fold 0's clicks leaves fold 0's model as it was
    (the test fails if a click's own pair entered its model); reference sides set k."""
    from pipeline.clickpairs import TooFewPairs, choose_by_extent, choose_by_learned_extent, image_fold

    clicks, cands, default, true, sides = _learned_case()
    clicks.loc[0, ["n_clicks", "x_b", "y_b"]] = [1, np.nan, np.nan]
    default.loc[1, "status"] = "fallback"
    out, report = choose_by_learned_extent(default, cands, clicks)
    got = (out.x2 - out.x1).to_numpy()
    assert got[0] == pytest.approx(default.x2[0] - default.x1[0]) and got[1] == pytest.approx(default.x2[1] - default.x1[1])
    nearest = sides[np.abs(np.log(sides)[None] - np.log(true)[:, None]).argmin(1)]
    axes = choose_by_extent(default, cands, clicks)[0]
    hit = (got[2:] == nearest[2:]).mean()
    hit_axes = ((axes.x2 - axes.x1).to_numpy()[2:] == nearest[2:]).mean()
    assert hit > hit_axes + 0.1
    big = (clicks["class"] == "big").to_numpy()[2:]
    assert np.median(got[2:][big] / (default.x2 - default.x1).to_numpy()[2:][big]) > 1.2  # the big class's scale
    assert report["chosen"] == len(clicks) - 2 and report["changed"] == int((out.threshold != default.threshold).sum())
    assert report["changed"] > 0 and len(report["models"]) == 5
    assert all(m["k"] == pytest.approx(0.08, rel=0.15) for m in report["models"])
    f0 = np.array([image_fold(i, 5) == 0 for i in clicks.image_id])
    moved = clicks.copy()
    moved.loc[f0, "x_b"] = 400.0 + 10 * (clicks.x_b[f0] - 400.0)
    _, report2 = choose_by_learned_extent(default, cands, moved)
    assert report2["models"][0] == report["models"][0] and report2["models"][1] != report["models"][1]
    # reference sides twice the truth: k halves (the anchor follows the reference, not the default boxes)
    ref = pd.DataFrame({"w": 2 * true, "h": 2 * true}, index=pd.Index(clicks.click_id, name="click_id"))
    _, report3 = choose_by_learned_extent(default, cands, clicks, reference=ref)
    assert report3["reference"] == "reference boxes"
    assert report3["models"][0]["k"] == pytest.approx(report["models"][0]["k"] / 2, rel=0.1)
    with pytest.raises(ValueError, match="unknown feature groups"):
        choose_by_learned_extent(default, cands, clicks, groups=("colour",))
    few = clicks.click_id < 10
    with pytest.raises(TooFewPairs, match="needs at least 14 click pairs.*axes"):
        choose_by_learned_extent(default[few], cands[cands.click_id < 10], clicks[few])
