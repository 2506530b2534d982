"""The proposal-free stages on a tiny synthetic dataset, run by luigi: ``PseudoLabels --proposals none``
(ProposalFreeBoxes on a SPAM image-level network) and the image-label-only ImageExtentBoxes (GMP), checked against the
pipeline functions; no selective search runs. And the parameters' checks and hashes."""
import numpy as np
import pandas as pd
import pytest

from harness import STAGE_FILES

TINY = dict(synth_trainval=6, synth_test=1, synth_image_px=96, classifier_weights="random", classifier_epochs=1,
            classifier_input_px=64, classifier_batch_size=8, device="cpu", report_images=2, report_worst=1)


@pytest.mark.slow  # trains two tiny image-level networks in luigi
def test_proposals_none_and_image_extent_boxes_end_to_end(outputs, tmp_path):
    import luigi

    from pipeline.boxes import BoxParams, classes_per_image, pseudo_boxes_and_candidates
    from pipeline.classifier import load_classifier
    from pipeline.export import read_pseudo_labels
    from pipeline.io import read_json
    from pipeline.proposal_free import click_maps, image_label_boxes, whole_image_fallbacks
    from tasks.defaults import TUNED
    from tasks.main import PseudoLabels
    from tasks.proposal_free import ImageExtentBoxes

    data = str(tmp_path / "data")
    main = PseudoLabels(data_root=data, proposals="none", **TINY)
    extent = ImageExtentBoxes(data_root=data, cam_network="gmp", box_threshold=100.0, **TINY)
    res = luigi.build([main, extent], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status.name == "SUCCESS", res.summary_text
    ran = {p.name for p in outputs.iterdir()}
    assert ran == {"PrepareDataset", "TrainClassifier", "ProposalFreeBoxes", "PseudoLabels", "ImageExtentBoxes"}

    pf = main.requires()
    out = pf.stage_dir
    for pattern in STAGE_FILES["FusePseudoBoxes"]:
        assert list(out.glob(pattern)), f"ProposalFreeBoxes lacks {pattern}"
    assert read_json(main.stage_dir / "summary.json")["files"]["pseudo_labels_csv"] == str(
        (out / "pseudo_labels.csv").resolve())
    manifest = main.manifest()
    trainval, clicks = manifest.split("trainval"), manifest.clicks
    model = load_classifier(pf.input_dir("classifier") / "model.pt", "cpu")
    assert model.pooling == "spam"  # --cam-network spam (default): an image-level network with the CAM layer
    labels = read_pseudo_labels(out / "pseudo_labels.csv")
    assert len(labels) == len(clicks) and set(labels.click_id) == set(clicks.click_id)
    expected, _ = pseudo_boxes_and_candidates(
        click_maps(model, trainval, clicks, manifest.classes, progress=False), whole_image_fallbacks(clicks, trainval),
        classes_per_image(clicks), BoxParams("fixed", 50.0, "max", "box_mean", 2.0, "same_class"),
        clicks=clicks)  # the stage defaults (tasks/defaults.py)
    pd.testing.assert_frame_equal(labels, expected, check_dtype=False)
    sizes = trainval.set_index("image_id")[["width", "height"]]
    for r in labels[labels.fallback].itertuples(index=False):  # no proposal: the whole image
        assert (r.x1, r.y1, r.x2, r.y2) == (0, 0, sizes.loc[r.image_id, "width"], sizes.loc[r.image_id, "height"])
    m = read_json(out / "metrics.json")
    assert m["params"]["proposals"] == "none" and m["params"]["cam_network"] == "spam"
    assert m["boxes"]["fallback"] == int(labels.fallback.sum())

    ext = read_pseudo_labels(extent.stage_dir / "pseudo_labels.csv")
    gmp = load_classifier(extent.input_dir("classifier") / "model.pt", "cpu")
    assert gmp.pooling == "gmp"
    want = image_label_boxes(gmp, trainval, manifest.image_labels(), manifest.classes, threshold_rule="fixed",
                             threshold_value=100.0, ratio=TUNED.box_extent_ratio, progress=False)
    pd.testing.assert_frame_equal(ext, want, check_dtype=False)
    assert (ext.click_id == -1).all()
    pairs = set(map(tuple, manifest.image_labels()[["image_id", "class"]].astype(str).to_numpy()))
    assert set(zip(ext.image_id, ext["class"])) == pairs  # every labelled class of every image has a box
    ok = ext[~ext.fallback]
    assert ((ok.x2 > ok.x1) & (ok.y2 > ok.y1)).all() and ok.score.between(0, 1).all()
    assert np.isfinite(read_json(extent.stage_dir / "metrics.json")["metrics"]["box_accuracy"])


def test_image_pooling_parameter_checks_and_hash(tmp_path):
    from tasks.classifier import TrainClassifier
    from tasks.main import PseudoLabels

    kw = dict(data_root=str(tmp_path / "data"), classifier_mode="image_labels")
    gap = TrainClassifier(**kw)
    assert "classifier_image_pooling" not in gap.significant_params()  # earlier outputs keep their directories
    assert TrainClassifier(**kw, classifier_image_pooling="gap").stage_hash == gap.stage_hash
    assert TrainClassifier(**kw, classifier_image_pooling="spam").stage_hash != gap.stage_hash
    assert TrainClassifier(**kw, classifier_image_pooling="spam").stage_hash != \
        TrainClassifier(**kw, classifier_image_pooling="gmp").stage_hash
    with pytest.raises(ValueError, match="needs --classifier-mode image_labels"):
        TrainClassifier(data_root=str(tmp_path / "data"), classifier_image_pooling="spam")
    with pytest.raises(ValueError, match="needs --box-method cam"):
        PseudoLabels(data_root=str(tmp_path / "data"), proposals="none", box_method="mil")
    with pytest.raises(ValueError, match="--cam-ensemble belong to the crop CAM stages"):
        PseudoLabels(data_root=str(tmp_path / "data"), proposals="none", cam_ensemble="efficientnet_lite1")
    with pytest.raises(ValueError, match="--box-area-prior belong to the crop CAM stages"):
        PseudoLabels(data_root=str(tmp_path / "data"), proposals="none", clicks_per_object="2", box_area_prior="axes")
    PseudoLabels(data_root=str(tmp_path / "data"), proposals="none", clicks_per_object="2")  # auto: no error
    default = PseudoLabels(data_root=str(tmp_path / "data"))
    assert "proposals" not in default.significant_params()
    assert PseudoLabels(data_root=str(tmp_path / "data"), proposals="none").requires().task_family == \
        "ProposalFreeBoxes"


def test_click_map_is_shifted_and_a_negative_map_still_gives_a_box():
    """A class map whose scores are all negative still locates the clicked object: the click's map is shifted to a
    minimum of 0, so stage 5 finds the region about the peak instead of calling the map empty."""
    from pipeline.boxes import BoxParams, box_from_cam
    from pipeline.proposal_free import LowResMaps

    clicks = pd.DataFrame({"click_id": [7], "image_id": ["a"], "class": ["dog"], "x": [20.0], "y": [12.0]})
    images = pd.DataFrame({"image_id": ["a"], "width": [32], "height": [32], "path": ["-"]})
    store = LowResMaps(clicks, images, ["cat", "dog"], [(4, 4, 0)], 32)   # 8x8 maps, one 4 px cell each
    maps = np.full((2, 8, 8), -5.0, np.float32)
    maps[1, 2:4, 4:6] = -1.0                                              # the dog's best cells, still negative
    store.add("a", np.zeros(2, np.float32), maps)
    cam = store.click_map(7)
    assert cam.shape == (32, 32) and cam.min() == pytest.approx(0.0) and cam.max() == pytest.approx(4.0)
    res = box_from_cam(cam, 20.0, 12.0, params=BoxParams("fixed", 128.0, symmetry="none"))
    assert res.status == "ok" and res.box == (16.0, 8.0, 24.0, 16.0)
    assert box_from_cam(maps[1].repeat(4, 0).repeat(4, 1), 20.0, 12.0).status == "empty"  # unshifted: no box


def test_the_fast_mode_trains_its_image_level_network_briefly(tmp_path):
    """``--proposals none`` trains its image-level network TUNED.proposal_free_image_epochs unless
    --classifier-epochs says otherwise; seed 003's boxes without clicks keep the image-level default, and the crop
    classifier (--cam-network crops) its own."""
    from tasks.defaults import TUNED
    from tasks.proposal_free import ImageExtentBoxes, ProposalFreeBoxes

    kw = dict(data_root=str(tmp_path / "data"))
    assert TUNED.proposal_free_image_epochs < TUNED.classifier_image_epochs
    for net in ("spam", "gmp", "gap"):
        assert ProposalFreeBoxes(**kw, cam_network=net).requires()["classifier"].epochs == \
            TUNED.proposal_free_image_epochs
        assert ImageExtentBoxes(**kw, cam_network=net).requires()["classifier"].epochs == \
            TUNED.classifier_image_epochs
    assert ProposalFreeBoxes(**kw, classifier_epochs=5).requires()["classifier"].epochs == 5
    crops = ProposalFreeBoxes(**kw, cam_network="crops").requires()["classifier"]
    assert crops.epochs == TUNED.classifier_epochs and crops.classifier_mode == "crops"
