"""Pseudo label exports are re-read correctly (pipeline/export.py)."""
import json

import numpy as np
import pandas as pd
import pytest

from pipeline.export import (LabelFileError, export_pseudo_labels, read_coco, read_pseudo_labels,
                             read_voc_annotations, to_coco, write_coco, write_pseudo_labels, write_voc_annotations)
from pipeline.voc import VOC_CLASSES, parse_annotation

CLASSES = ("cat", "dog", "person")


@pytest.fixture
def images():
    return pd.DataFrame({"image_id": ["000005", "000007", "000009", "000005"],
                         "split": ["trainval", "trainval", "trainval", "test"],
                         "width": [500, 320, 400, 500], "height": [375, 240, 300, 375],
                         "path": ["/d/JPEGImages/000005.jpg", "/d/JPEGImages/000007.jpg", "/d/JPEGImages/000009.jpg",
                                  "/d/JPEGImages/000005.jpg"]})


@pytest.fixture
def boxes():
    return pd.DataFrame({
        "image_id": ["000005", "000005", "000007"],
        "class": ["cat", "person", "dog"],
        "x1": [0.0, 10.25, 100.0], "y1": [0.0, 20.0, 50.5],
        "x2": [500.0, 60.75, 200.0], "y2": [100.0, 375.0, 240.0],
        "score": [0.9, 0.25, 0.5], "click_id": [3, 4, 9], "fallback": [False, True, False],
        "status": ["ok", "empty", "ok"],
    })


def test_csv_round_trip(tmp_path, boxes):
    path = write_pseudo_labels(boxes.iloc[:, ::-1], tmp_path / "pseudo_labels.csv")  # columns reordered on write
    assert path.read_text().splitlines()[0] == "image_id,class,x1,y1,x2,y2,score,click_id,fallback,status"
    back = read_pseudo_labels(path)
    pd.testing.assert_frame_equal(back, boxes, check_dtype=False)
    assert back["image_id"].tolist() == ["000005", "000005", "000007"]  # leading zeros kept


def test_csv_errors(tmp_path, boxes):
    with pytest.raises(LabelFileError, match="not found"):
        read_pseudo_labels(tmp_path / "nope.csv")
    bad = boxes.copy()
    bad.loc[1, "x2"] = 5.0  # x2 < x1
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(LabelFileError, match=r"bad.csv: row 3"):
        read_pseudo_labels(tmp_path / "bad.csv")
    boxes.drop(columns="y2").to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(LabelFileError, match=r"short.csv: lacks columns \['y2'\]"):
        read_pseudo_labels(tmp_path / "short.csv")


def test_voc_annotations_round_trip(tmp_path, boxes, images):
    written = write_voc_annotations(boxes, images, tmp_path / "Annotations")
    assert sorted(p.name for p in written) == ["000005.xml", "000007.xml"]
    ann = parse_annotation(tmp_path / "Annotations" / "000005.xml", VOC_CLASSES)
    assert (ann.width, ann.height) == (500, 375)
    assert [o.cls for o in ann.objects] == ["cat", "person"]
    # whole-pixel boxes come back exactly; fractional ones rounded to the nearest pixel edge
    o = ann.objects[0]
    assert (o.x1, o.y1, o.x2, o.y2) == (0.0, 0.0, 500.0, 100.0)
    o = ann.objects[1]
    assert (o.x1, o.y1, o.x2, o.y2) == (10.0, 20.0, 61.0, 375.0)
    back = read_voc_annotations(tmp_path / "Annotations")
    np.testing.assert_allclose(back[["x1", "y1", "x2", "y2"]], boxes[["x1", "y1", "x2", "y2"]], atol=0.5)
    assert back["class"].tolist() == boxes["class"].tolist()
    # empty images on request
    written = write_voc_annotations(boxes, images, tmp_path / "A2", include_empty=True)
    assert len(written) == 3 and parse_annotation(tmp_path / "A2" / "000009.xml").objects == []
    with pytest.raises(ValueError, match="not in the images table"):
        write_voc_annotations(boxes.assign(image_id="zzz"), images, tmp_path / "A3")


def test_coco_fields(boxes, images):
    coco = to_coco(boxes, images, CLASSES)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        (1, "000005.jpg", 500, 375), (2, "000007.jpg", 320, 240), (3, "000009.jpg", 400, 300)]
    a = coco["annotations"]
    assert [x["id"] for x in a] == [1, 2, 3]
    assert [x["image_id"] for x in a] == [1, 1, 2]
    assert [x["category_id"] for x in a] == [1, 3, 2]
    assert a[1]["bbox"] == [10.25, 20.0, 50.5, 355.0]
    assert a[1]["area"] == pytest.approx(50.5 * 355.0)
    assert all(x["iscrowd"] == 0 for x in a)
    assert [x["score"] for x in a] == [0.9, 0.25, 0.5]
    json.dumps(coco)  # plain JSON types only
    with pytest.raises(ValueError, match="classes not in the class list"):
        to_coco(boxes, images, ("cat",))


def test_coco_round_trip(tmp_path, boxes, images):
    path = write_coco(tmp_path / "coco.json", boxes, images, CLASSES)
    back, imgs, classes = read_coco(path)
    assert classes == CLASSES
    pd.testing.assert_frame_equal(back[["image_id", "class", "x1", "y1", "x2", "y2", "score"]],
                                  boxes[["image_id", "class", "x1", "y1", "x2", "y2", "score"]], check_dtype=False)
    assert imgs["image_id"].tolist() == ["000005", "000007", "000009"]
    assert imgs["width"].tolist() == [500, 320, 400]


def test_read_external_coco(tmp_path):
    ext = {"images": [{"id": 42, "file_name": "a/b/img_1.png", "width": 10, "height": 8}],
           "annotations": [{"id": 7, "image_id": 42, "category_id": 5, "bbox": [1, 2, 3, 4], "iscrowd": 1}],
           "categories": [{"id": 5, "name": "zebra"}, {"id": 2, "name": "ant"}]}
    (tmp_path / "ext.json").write_text(json.dumps(ext))
    back, imgs, classes = read_coco(tmp_path / "ext.json")
    assert classes == ("ant", "zebra")
    assert back.iloc[0].tolist() == ["img_1", "zebra", 1.0, 2.0, 4.0, 6.0, 1.0, 1]


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.pop("annotations"), "needs the lists"),
    (lambda d: d["annotations"][0].update(category_id=9), "annotation 7 refers to unknown category id 9"),
    (lambda d: d["annotations"][0].update(image_id=1), "annotation 7 refers to unknown image id 1"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 0, 4]), "annotation 7 has an invalid bbox"),
    (lambda d: d["annotations"][0].pop("bbox"), "annotation 7 lacks"),
    (lambda d: d["images"][0].pop("width"), "lacks a valid 'id', 'width'"),
])
def test_coco_errors(tmp_path, mutate, match):
    d = {"images": [{"id": 42, "file_name": "x.jpg", "width": 10, "height": 8}],
         "annotations": [{"id": 7, "image_id": 42, "category_id": 5, "bbox": [1, 2, 3, 4]}],
         "categories": [{"id": 5, "name": "zebra"}]}
    mutate(d)
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(LabelFileError, match=match):
        read_coco(tmp_path / "c.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(LabelFileError, match="not valid JSON"):
        read_coco(tmp_path / "junk.json")


def with_image_files(images: pd.DataFrame, tmp_path) -> pd.DataFrame:
    """``images`` (one row per image) with ``path``: grey JPEGs of each image's size written under ``tmp_path``."""
    import cv2

    imgs = images.drop_duplicates("image_id").reset_index(drop=True)
    paths = []
    for image_id, w, h in imgs[["image_id", "width", "height"]].itertuples(index=False):
        p = tmp_path / f"{image_id}.jpg"
        cv2.imwrite(str(p), np.full((int(h), int(w), 3), 120, np.uint8))
        paths.append(str(p))
    return imgs.assign(path=paths)


def test_export_pseudo_labels_writes_everything(tmp_path, boxes, images):
    from pipeline.io import read_json
    from pipeline.voc import OBJECT_COLUMNS

    imgs = with_image_files(images, tmp_path)
    objects = pd.DataFrame([("000005", 0, "cat", 0, 0, 500, 200, False, False),     # IoU 0.5 with box 0
                            ("000005", 1, "person", 10, 20, 60, 375, False, False),  # IoU ~0.99 with box 1
                            ("000007", 0, "dog", 0, 0, 100, 100, False, False),      # box 2 misses
                            ("000009", 0, "dog", 0, 0, 50, 50, False, False)],       # no box: CorLoc miss
                           columns=OBJECT_COLUMNS)
    clicks = pd.DataFrame({"click_id": [3, 4, 9], "image_id": ["000005", "000005", "000007"],
                           "class": ["cat", "person", "dog"], "x": [250.0, 35.0, 150.0], "y": [50.0, 200.0, 150.0],
                           "object_index": [0, 1, 0]})
    maps = {3: np.random.default_rng(0).random((375, 500)).astype(np.float32)}
    out = tmp_path / "stage"
    result = export_pseudo_labels(out, boxes, imgs[imgs.image_id != "000009"], CLASSES, objects, clicks,
                                  params={"symmetry": "max"}, load_map=maps.get, report_images=3, report_worst=1)
    for name in ("pseudo_labels.csv", "coco.json", "metrics.json", "per_class.csv", "summary.md",
                 "Annotations/000005.xml", "Annotations/000007.xml", "report/index.html", "report/grid.png",
                 "report/per_class.png", "report/worst_dog.png"):
        assert (out / name).is_file(), name
    m = read_json(out / "metrics.json")
    assert m["metrics"]["n_boxes"] == result["metrics"]["n_boxes"] == 3
    assert m["boxes"]["fallback"] == 1 and m["params"]["symmetry"] == "max"
    assert m["metrics"]["box_accuracy"] == pytest.approx((1 + 1 + 0) / 3)  # cat 1/1, person 1/1, dog 0/1
    assert m["metrics"]["corloc"] == pytest.approx((1 + 0 + 1) / 3)  # dog: 000007 wrong, 000009 no box
    assert m["metrics"]["clicked_iou"] == pytest.approx(np.mean([0.5, 49.75 / 50.75, 0.0]))
    page = (out / "report" / "index.html").read_text()
    assert 'src="grid.png"' in page and 'src="worst_dog.png"' in page and "symmetry" in page
    assert read_pseudo_labels(out / "pseudo_labels.csv")["click_id"].tolist() == [3, 4, 9]
    assert "CorLoc 66.7" in (out / "summary.md").read_text()


def test_export_without_ground_truth_reports_counts_and_histograms(tmp_path, boxes, images):
    """No ground truth (a folder of images and clicks): boxes, exports and a report with per-class counts, box-size
    and score histograms and the sample grid; no metrics."""
    from pipeline.io import read_json
    from pipeline.report import class_counts

    imgs = with_image_files(images, tmp_path)
    out = tmp_path / "stage"
    export_pseudo_labels(out, boxes, imgs, CLASSES, objects=None, report_images=3, report_worst=1)
    for name in ("pseudo_labels.csv", "coco.json", "metrics.json", "summary.md", "report/index.html",
                 "report/grid.png", "report/histograms.png"):
        assert (out / name).is_file(), name
    assert "metrics" not in read_json(out / "metrics.json") and not (out / "per_class.csv").exists()
    page = (out / "report" / "index.html").read_text()
    assert "Boxes per class" in page and 'src="histograms.png"' in page and "worst_" not in page
    counts = class_counts(boxes)
    assert counts.boxes.sum() == len(boxes) and list(counts["class"]) == sorted(set(boxes["class"]))
    assert counts.fallbacks.sum() == int(boxes.fallback.sum())


def test_markdown_table():
    from pipeline.markdown import markdown_table

    assert markdown_table(["class", "n"], [("cat", 3), ("dog", 1.5)], "lr") == (
        "| class | n |\n|---|---:|\n| cat | 3 |\n| dog | 1.5 |")
    assert markdown_table(["a"], []) == "| a |\n|---|"
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a", "b"], [], "l")


def test_summary_markdown_per_class_table(boxes):
    """summary.md: counts, the metrics line and a per-class table (``-`` where a value is undefined)."""
    from pipeline.export import summary_markdown

    result = {"boxes": {"fallback": 1}, "metrics": {"corloc": 2 / 3, "box_accuracy": 0.5, "mean_iou": 0.25}}
    per_class = pd.DataFrame({"class": ["cat", "dog"], "boxes": [2, 1], "images": [1, 1], "corloc": [1.0, np.nan],
                              "box_accuracy": [0.5, 0.0], "mean_iou": [0.375, 0.0]})
    text = summary_markdown(boxes, result, per_class, report=False)
    assert text == (f"# pseudo boxes: {len(boxes)} boxes on {boxes.image_id.nunique()} images, 1 fallbacks\n\n"
                    "CorLoc 66.7  box-CorLoc 50.0  mean IoU 25.0\n\n"
                    "| class | boxes | images | CorLoc | box-CorLoc | mean IoU |\n|---|---:|---:|---:|---:|---:|\n"
                    "| cat | 2 | 1 | 100.0 | 50.0 | 37.5 |\n| dog | 1 | 1 | - | 0.0 | 0.0 |\n\n"
                    "Files (in this directory): pseudo_labels.csv, coco.json, Annotations/ (VOC XML), metrics.json, "
                    "per_class.csv\n")
    no_gt = summary_markdown(boxes, {"boxes": {"fallback": 0}}, None, report=True)
    assert "CorLoc" not in no_gt and no_gt.endswith("metrics.json, report/index.html\n")


def test_report_sampling_covers_classes(boxes):
    from pipeline.report import sample_rows

    many = pd.concat([boxes] * 10, ignore_index=True)
    s = sample_rows(many, 4, seed=1)
    assert len(s) == 4 and set(s["class"]) == {"cat", "dog", "person"}
    assert s.index.tolist() == sample_rows(many, 4, seed=1).index.tolist()


# -- the FusePseudoBoxes stage (tasks/pseudo.py) --------------------------------------------------------------
def _tiny_classifier(num_classes: int, seed: int = 0, names: tuple[str, str] = ("stage5_expand", "stage6")):
    """A tiny random net whose two layers stand in for efficientnet_lite0's default CAM layers."""
    from nets import tiny_classifier

    return tiny_classifier(num_classes, seed=seed, conv2_stride=1, names=names)


def test_fuse_pseudo_boxes_stage(outputs, tmp_path):
    """Real stages 1-2 on tiny synthetic images, the CAM store of the two default layers (one GenerateCAMs, both
    layers from one pass) written with a tiny random net in place of stages 3-4 (so no classifier is trained), then
    FusePseudoBoxes: its files agree with the pipeline functions on the mean of the two layers' max-scaled maps."""
    import luigi

    from pipeline.boxes import BoxParams, classes_per_image, ensemble_map, pseudo_boxes_from_cams, rank1_proposals
    from pipeline.cam import CamStore, click_entries, write_cam_store
    from pipeline.io import read_json
    from pipeline.metrics import pseudo_box_metrics
    from tasks.pseudo import FusePseudoBoxes

    task = FusePseudoBoxes(data_root=str(tmp_path / "data"), synth_trainval=4, synth_test=1, synth_image_px=96,
                           ss_image_max_px=64, ss_box_min_px=4, ss_shards=1, classifier_weights="random", device="cpu",
                           box_symmetry="mean", report_images=4, report_worst=1)
    reqs = task.requires()
    sel_task, cam_task = reqs["selected"], reqs["cams"]
    assert set(reqs) == {"selected", "cams"}  # one GenerateCAMs for both of tasks.defaults.TUNED.cam_layers
    assert cam_task.cam_layers == "stage5_expand,stage6"
    assert luigi.build([sel_task], local_scheduler=True, log_level="WARNING")
    manifest = sel_task.manifest()
    selected = pd.read_parquet(sel_task.stage_dir / "selected.parquet")
    trainval = manifest.split("trainval")
    write_cam_store(_tiny_classifier(len(manifest.classes)), click_entries(selected, manifest.classes),
                    dict(zip(trainval.image_id, trainval.path)), cam_task.stage_dir, layers=("stage5_expand", "stage6"),
                    progress=False)
    res = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status.name == "SUCCESS", res.summary_text
    assert not cam_task.requires()["classifier"].stage_dir.exists()  # the stand-in stores were used

    out = task.stage_dir
    labels = read_pseudo_labels(out / "pseudo_labels.csv")
    with CamStore(cam_task.stage_dir, "stage5_expand") as a, CamStore(cam_task.stage_dir, "stage6") as b:
        assert a.layers == ["stage5_expand", "stage6"]
        items = [(i, ensemble_map([a.load(i)[0], b.load(i)[0]])[0], a.load(i)[1]) for i in manifest.clicks.click_id]
        assert not np.allclose(a.load(items[0][0])[0], b.load(items[0][0])[0])  # two different layers' maps
    expected = pseudo_boxes_from_cams(items, rank1_proposals(selected), classes_per_image(manifest.clicks),
                                      BoxParams("fixed", 50.0, symmetry="mean", partition="same_class"),
                                      clicks=manifest.clicks)  # the stage defaults, --box-symmetry mean
    pd.testing.assert_frame_equal(labels, expected, check_dtype=False)
    assert len(labels) == len(manifest.clicks)
    objects = manifest.objects[manifest.objects.image_id.isin(set(trainval.image_id))]
    summary, per_class = pseudo_box_metrics(labels.merge(manifest.clicks[["click_id", "object_index"]]), objects,
                                            classes=manifest.classes)
    m = read_json(out / "metrics.json")
    assert m["metrics"]["corloc"] == pytest.approx(summary["corloc"])
    assert m["metrics"]["box_accuracy"] == pytest.approx(summary["box_accuracy"])
    assert m["boxes"]["fallback"] == int(labels["fallback"].sum())
    assert m["params"]["symmetry"] == "mean" and m["params"]["partition"] == "same_class"
    assert pd.read_csv(out / "per_class.csv")["class"].tolist() == list(manifest.classes)
    coco, _, classes = read_coco(out / "coco.json")
    assert classes == manifest.classes and len(coco) == len(labels)
    voc = read_voc_annotations(out / "Annotations")
    assert len(voc) == len(labels) and set(voc.image_id) == set(labels.image_id)
    assert (out / "report" / "index.html").is_file() and (out / "report" / "grid.png").is_file()


def test_fuse_pseudo_boxes_cam_ensemble(outputs, tmp_path):
    """--cam-ensemble: one GenerateCAMs per backbone (different stage directories), and the boxes come from the mean
    of the max-scaled maps (pipeline.boxes.ensemble_map); a click one member lacks is counted and uses the rest."""
    import luigi

    from pipeline.boxes import (BoxParams, classes_per_image, ensemble_map, pseudo_boxes_from_cams,
                                rank1_proposals)
    from pipeline.cam import CamStore, click_entries, write_cam_store
    from pipeline.io import read_json
    from tasks.pseudo import FusePseudoBoxes

    task = FusePseudoBoxes(data_root=str(tmp_path / "data"), synth_trainval=4, synth_test=1, synth_image_px=96,
                           ss_image_max_px=64, ss_box_min_px=4, ss_shards=1, classifier_weights="random", device="cpu",
                           cam_ensemble="efficientnet_lite1", cam_layers="stage6", report_images=2, report_worst=1)
    reqs = task.requires()
    assert set(reqs) == {"selected", "cams", "cams:efficientnet_lite1"}  # one layer per member
    sel_task, main_cams, lite1_cams = reqs["selected"], reqs["cams"], reqs["cams:efficientnet_lite1"]
    assert main_cams.classifier_backbone == "efficientnet_lite0"
    assert lite1_cams.classifier_backbone == "efficientnet_lite1"
    assert main_cams.stage_dir != lite1_cams.stage_dir
    single = FusePseudoBoxes(**{k: v for k, v in task.param_kwargs.items() if k != "cam_ensemble"})
    assert single.stage_hash != task.stage_hash
    assert luigi.build([sel_task], local_scheduler=True, log_level="WARNING")
    manifest = sel_task.manifest()
    selected = pd.read_parquet(sel_task.stage_dir / "selected.parquet")
    trainval = manifest.split("trainval")
    paths = dict(zip(trainval.image_id, trainval.path))
    entries = click_entries(selected, manifest.classes)
    dropped = entries[0].entry_id
    write_cam_store(_tiny_classifier(len(manifest.classes), seed=0), entries, paths, main_cams.stage_dir,
                    progress=False)  # layer stage6, the tiny net's default
    write_cam_store(_tiny_classifier(len(manifest.classes), seed=1), entries[1:], paths, lite1_cams.stage_dir,
                    progress=False)
    res = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status.name == "SUCCESS", res.summary_text

    labels = read_pseudo_labels(task.stage_dir / "pseudo_labels.csv")
    with CamStore(main_cams.stage_dir) as a, CamStore(lite1_cams.stage_dir) as b:
        items = []
        for cid in manifest.clicks.click_id:
            cam_a, meta = a.load(cid)
            cam_b = b.load(cid)[0] if cid in b else None
            assert (cam_b is None) == (cid == dropped)
            fused, used = ensemble_map([cam_a, cam_b])
            assert used == (1 if cid == dropped else 2)
            items.append((cid, fused, meta))
    expected = pseudo_boxes_from_cams(items, rank1_proposals(selected), classes_per_image(manifest.clicks),
                                      BoxParams("fixed", 50.0, partition="same_class"), clicks=manifest.clicks)
    pd.testing.assert_frame_equal(labels, expected, check_dtype=False)
    with CamStore(main_cams.stage_dir) as a:  # the ensemble changes boxes: not the main store's alone
        alone = pseudo_boxes_from_cams([(cid, *a.load(cid)) for cid in manifest.clicks.click_id],
                                       rank1_proposals(selected), classes_per_image(manifest.clicks),
                                       BoxParams("fixed", 50.0, partition="same_class"), clicks=manifest.clicks)
    assert not np.allclose(alone[["x1", "y1", "x2", "y2"]].to_numpy(), labels[["x1", "y1", "x2", "y2"]].to_numpy())
    params = read_json(task.stage_dir / "metrics.json")["params"]
    assert params["cam_stores"] == {"cams": str(main_cams.stage_dir),
                                    "cams:efficientnet_lite1": str(lite1_cams.stage_dir)}
    assert params["stores_partial"] == 1
    from tasks.main import PseudoLabels  # its summary lists both CAM stages (and both classifiers)

    chain = PseudoLabels(**task.param_kwargs).stage_chain()
    assert chain["GenerateCAMs"] == str(main_cams.stage_dir.resolve())
    assert chain[lite1_cams.stage_ref] == str(lite1_cams.stage_dir.resolve())
    assert lite1_cams.requires()["classifier"].stage_ref in chain


@pytest.mark.parametrize("value, message", [
    ("resnet_nope", "unknown backbone"),
    ("efficientnet_lite0", "not the main"),
    ("efficientnet_lite1,efficientnet_lite1", "each backbone once"),
])
def test_cam_ensemble_rejects_bad_backbones(tmp_path, value, message):
    from tasks.pseudo import FusePseudoBoxes

    with pytest.raises(ValueError, match=message):  # at creation, before anything runs
        FusePseudoBoxes(data_root=str(tmp_path / "data"), cam_ensemble=value)
    with pytest.raises(ValueError, match="image_labels"):
        FusePseudoBoxes(data_root=str(tmp_path / "data"), classifier_mode="image_labels",
                        cam_ensemble="efficientnet_lite1")
    with pytest.raises(ValueError, match="each layer once"):
        FusePseudoBoxes(data_root=str(tmp_path / "data"), cam_layers="stage6,stage6")


@pytest.mark.slow
@pytest.mark.parametrize("prior,images", [("on", 24), ("learned", 24), ("auto", 6), ("auto", 1)])
def test_fuse_pseudo_boxes_area_prior_with_two_clicks(outputs, tmp_path, prior, images):
    """--clicks-per-object 2 --box-area-prior on / learned: the stage's boxes are clickpairs.choose_by_area's /
    choose_by_learned_extent's choice among the candidates of the pipeline functions (stand-in CAM stores as above);
    without two clicks the option is an error at creation. The default (auto = learned) on 6 images, too few pairs
    for the learned prior: choose_by_extent's boxes, the fallback said in metrics.json; on 1 image, too few for
    either: the default threshold's boxes, said as well."""
    import luigi

    from pipeline.boxes import BoxParams, classes_per_image, ensemble_map, pseudo_boxes_and_candidates, rank1_proposals
    from pipeline.cam import CamStore, click_entries, write_cam_store
    from pipeline.clickpairs import AREA_THRESHOLDS, choose_by_area, choose_by_extent, choose_by_learned_extent
    from pipeline.io import read_json
    from tasks.pseudo import FusePseudoBoxes

    if prior != "auto":
        with pytest.raises(ValueError, match="needs two clicks per object"):
            FusePseudoBoxes(data_root=str(tmp_path / "data"), box_area_prior=prior)
    task = FusePseudoBoxes(data_root=str(tmp_path / "data"), synth_trainval=images, synth_test=1, synth_image_px=96,
                           ss_image_max_px=64, ss_box_min_px=4, ss_shards=1, classifier_weights="random", device="cpu",
                           clicks_per_object="2", box_area_prior=prior, report_images=0, report_worst=0)
    reqs = task.requires()
    sel_task, cam_task = reqs["selected"], reqs["cams"]
    assert luigi.build([sel_task], local_scheduler=True, log_level="WARNING")
    manifest = sel_task.manifest()
    clicks = manifest.clicks
    assert (clicks.n_clicks == 2).all() and clicks.x.to_numpy() == pytest.approx((clicks.x_a + clicks.x_b) / 2)
    selected = pd.read_parquet(sel_task.stage_dir / "selected.parquet")
    trainval = manifest.split("trainval")
    write_cam_store(_tiny_classifier(len(manifest.classes)), click_entries(selected, manifest.classes),
                    dict(zip(trainval.image_id, trainval.path)), cam_task.stage_dir, layers=("stage5_expand", "stage6"),
                    progress=False)
    res = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert res.status.name == "SUCCESS", res.summary_text
    labels = read_pseudo_labels(task.stage_dir / "pseudo_labels.csv")
    with CamStore(cam_task.stage_dir, "stage5_expand") as a, CamStore(cam_task.stage_dir, "stage6") as b:
        items = [(i, ensemble_map([a.load(i)[0], b.load(i)[0]])[0], a.load(i)[1]) for i in clicks.click_id]
    boxes, cands = pseudo_boxes_and_candidates(items, rank1_proposals(selected), classes_per_image(clicks),
                                               BoxParams("fixed", 50.0, partition="same_class"), clicks=clicks,
                                               candidate_thresholds=AREA_THRESHOLDS)
    if prior == "on":
        expected, report = choose_by_area(boxes, cands, clicks, map_sigma=0.5)
        expected = expected.drop(columns=["area_mu", "area_sigma"])
    elif prior == "learned":
        sizes = {str(r.image_id): (int(r.width), int(r.height)) for r in trainval.itertuples(index=False)}
        expected, report = choose_by_learned_extent(boxes, cands, clicks, image_sizes=sizes)
    elif images > 1:
        expected, report = choose_by_extent(boxes, cands, clicks)
    else:
        expected, report = boxes, {"model": "off"}
    pd.testing.assert_frame_equal(labels, expected, check_dtype=False)
    got = read_json(task.stage_dir / "metrics.json")["params"]["area_prior"]
    if images > 1:
        assert got["paired"] == len(clicks) and got["changed"] == report["changed"]
    assert got.get("model") == ("axes" if prior == "auto" and images > 1 else report.get("model"))
    if prior == "auto":
        assert got["fallback_from"] == "learned" and "click pairs" in got["why"]
    if images == 1:
        assert "click pairs" in got["why_not_axes"]
