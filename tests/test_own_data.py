"""Your own data: a folder of images and a click file, no boxes needed (``PrepareDataset --images``), ground truth
optional (``--gt``), a VOC root without a test split; and the cross-checks of clicks against the dataset."""
import json
from pathlib import Path

import cv2
import luigi
import numpy as np
import pandas as pd
import pytest

from pipeline.clicks import ClickFileError
from pipeline.dataset import DatasetError, Manifest, build_image_manifest, build_manifest, scan_images
from pipeline.imageio import ImageReadError

import harness as H

SIZES = {"a/0001": (64, 48), "b/0001": (40, 56), "b/deep/x": (50, 50), "top": (30, 20)}
EXTS = {"a/0001": ".jpg", "b/0001": ".PNG", "b/deep/x": ".jpeg", "top": ".bmp"}


@pytest.fixture
def folder(tmp_path) -> Path:
    """Four images in nested folders with mixed (and upper-case) extensions, plus a text file that is ignored."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for image_id, (w, h) in SIZES.items():
        p = root / (image_id + EXTS[image_id])
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), (rng.random((h, w, 3)) * 255).astype(np.uint8))
    (root / "notes.txt").write_text("not an image")
    return root


CLICKS = [("a/0001", "dog", 10.5, 20.0), ("a/0001", "cat", 40.0, 30.0), ("b/0001", "dog", 5.0, 50.0),
          ("b/deep/x", "cat", 25.0, 25.0)]


def write_csv_clicks(path: Path, rows=CLICKS, annotator=None) -> Path:
    lines = ["image_id,class,x,y" + (",annotator" if annotator else "")]
    lines += [f"{i},{c},{x},{y}" + (f",{annotator}" if annotator else "") for i, c, x, y in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_scan_images_ids_are_relative_paths_without_extension(folder, tmp_path):
    table = scan_images(folder)
    assert list(table.image_id) == sorted(SIZES)  # notes.txt left out, every extension case found
    assert all(Path(p).is_file() for p in table.path)
    (folder / "a" / "0001.png").write_bytes((folder / "a" / "0001.jpg").read_bytes())
    with pytest.raises(DatasetError, match=r"two images have the id 'a/0001'"):
        scan_images(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        scan_images(tmp_path / "empty")


def test_images_and_clicks_without_ground_truth(folder, tmp_path):
    m = build_image_manifest(folder, write_csv_clicks(tmp_path / "c.csv"))
    assert m.classes == ("cat", "dog")  # sorted classes of the clicks
    sizes = dict(zip(m.images.image_id, zip(m.images.width, m.images.height)))
    assert sizes == SIZES  # read from the images
    assert dict(zip(m.images.image_id, m.images.split)) == {"a/0001": "trainval", "b/0001": "trainval",
                                                            "b/deep/x": "trainval", "top": "unclicked"}
    assert m.objects.empty and m.report["ground_truth"] is False and m.report["source"] == "images"
    # without the decoding check the sizes come from the files' headers: the same
    quick = build_image_manifest(folder, tmp_path / "c.csv", check_images=False)
    pd.testing.assert_frame_equal(quick.images, m.images)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match=r"broken.png: cannot read the image size"):
        build_image_manifest(folder, tmp_path / "c.csv", check_images=False)
    assert sorted(zip(m.clicks.image_id, m.clicks["class"], m.clicks.x, m.clicks.y)) == sorted(CLICKS)
    assert list(m.clicks.click_id) == list(range(4))
    m.save(tmp_path / "m")
    back = Manifest.load(tmp_path / "m")
    assert list(back.images.image_id) == list(m.images.image_id) and back.objects.empty


def _coco_points(folder) -> dict:
    images = [{"id": k + 1, "file_name": i + EXTS[i], "width": w, "height": h}
              for k, (i, (w, h)) in enumerate(SIZES.items())]
    ids = {im["file_name"][: -len(EXTS[i])]: im["id"] for im, i in zip(images, SIZES)}
    cats = [{"id": 1, "name": "cat", "supercategory": "animal", "keypoints": ["center"], "skeleton": []},
            {"id": 2, "name": "dog", "supercategory": "animal", "keypoints": ["center"], "skeleton": []}]
    anns = [{"id": 10 + k, "image_id": ids[i], "category_id": 1 if c == "cat" else 2, "keypoints": [x, y, 2],
             "num_keypoints": 1, "iscrowd": 0} for k, (i, c, x, y) in enumerate(CLICKS)]
    return {"images": images, "annotations": anns, "categories": cats}


def _cvat(folder) -> str:
    out = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations>", "  <version>1.1</version>"]
    for k, (i, (w, h)) in enumerate(SIZES.items()):
        out.append(f'  <image id="{k}" name="{i + EXTS[i]}" width="{w}" height="{h}">')
        for ii, c, x, y in CLICKS:
            if ii == i:
                out.append(f'    <points label="{c}" source="manual" occluded="0" points="{x:.2f},{y:.2f}" '
                           'z_order="0"></points>')
        out.append("  </image>")
    return "\n".join(out + ["</annotations>"]) + "\n"


def _label_studio(folder) -> list:
    tasks = []
    for k, (i, (w, h)) in enumerate(SIZES.items()):
        results = [{"id": f"r{k}{j}", "type": "keypointlabels", "from_name": "kp", "to_name": "image",
                    "original_width": w, "original_height": h, "image_rotation": 0,
                    "value": {"x": 100 * x / w, "y": 100 * y / h, "width": 0.5, "keypointlabels": [c]}}
                   for j, (ii, c, x, y) in enumerate(CLICKS) if ii == i]
        tasks.append({"id": k + 1, "data": {"image": f"/data/local-files/?d=imgs/{i}{EXTS[i]}"},
                      "annotations": [{"id": 100 + k, "completed_by": 7, "was_cancelled": False,
                                       "result": results}]})
    return tasks


@pytest.mark.parametrize("fmt", ["csv", "coco", "cvat", "labelstudio"])
def test_every_click_format_gives_the_same_manifest(folder, tmp_path, fmt):
    ref = build_image_manifest(folder, write_csv_clicks(tmp_path / "c.csv"))
    path = {"csv": tmp_path / "c.csv", "coco": tmp_path / "points.json", "cvat": tmp_path / "cvat.xml",
            "labelstudio": tmp_path / "ls.json"}[fmt]
    if fmt == "coco":
        path.write_text(json.dumps(_coco_points(folder)))
    elif fmt == "cvat":
        path.write_text(_cvat(folder))
    elif fmt == "labelstudio":
        path.write_text(json.dumps(_label_studio(folder)))
    m = build_image_manifest(folder, path)
    assert m.report["clicks"]["format"] == fmt
    cols = ["click_id", "image_id", "class", "annotator"]
    pd.testing.assert_frame_equal(m.clicks[cols], ref.clicks[cols])
    np.testing.assert_allclose(m.clicks[["x", "y"]].to_numpy(), ref.clicks[["x", "y"]].to_numpy(), atol=1e-6)
    assert list(m.images.split) == list(ref.images.split)


def test_image_labels_come_from_clicks_without_ground_truth(folder, tmp_path):
    """The image-label-only baseline needs image-level labels: the ground truth's classes when there is one, else
    the classes clicked in each image."""
    m = build_image_manifest(folder, write_csv_clicks(tmp_path / "c.csv"))
    labels = m.image_labels()
    assert sorted(set(map(tuple, labels.to_numpy().tolist()))) == sorted({(i, c) for i, c, _, _ in CLICKS})
    with_gt = Manifest(m.images, pd.DataFrame({"image_id": ["a/0001", "top"], "class": ["cat", "dog"]}),
                       m.clicks, m.classes)
    # ground truth of trainval images only ("top" has no click: split unclicked)
    assert with_gt.image_labels().to_numpy().tolist() == [["a/0001", "cat"]]


def test_classes_option_fixes_order_and_rejects_other_classes(folder, tmp_path):
    clicks = write_csv_clicks(tmp_path / "c.csv")
    m = build_image_manifest(folder, clicks, classes=["dog", "cat", "bird"])
    assert m.classes == ("dog", "cat", "bird")
    with pytest.raises(ClickFileError, match=rf"{tmp_path / 'c.csv'}:3: unknown class: 'cat'"):
        build_image_manifest(folder, clicks, classes=["dog"])


def _voc_xml(w, h, objs) -> str:
    body = "".join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}"
                   f"</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for c, x1, y1, x2, y2 in objs)
    return f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{body}</annotation>"


GT = {"a/0001": [("dog", 2, 10, 20, 30), ("cat", 30, 20, 60, 40)], "b/0001": [("dog", 0, 40, 12, 56)],
      "b/deep/x": [("cat", 10, 10, 40, 40)], "top": []}


def test_ground_truth_as_voc_folder_and_as_coco_agree(folder, tmp_path):
    ann = tmp_path / "Annotations"
    for image_id, objs in GT.items():
        p = ann / f"{image_id}.xml"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_voc_xml(*SIZES[image_id], objs))
    coco = {"images": [{"id": k, "file_name": i + EXTS[i], "width": SIZES[i][0], "height": SIZES[i][1]}
                       for k, i in enumerate(GT)],
            "annotations": [{"id": 100 * k + j, "image_id": k, "category_id": 1 if c == "cat" else 2,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                            for k, objs in enumerate(GT.values()) for j, (c, x1, y1, x2, y2) in enumerate(objs)],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    clicks = write_csv_clicks(tmp_path / "c.csv")
    a = build_image_manifest(folder, clicks, gt=ann)
    b = build_image_manifest(folder, clicks, gt=tmp_path / "gt.json")
    assert a.report["ground_truth"] and len(a.objects) == 4
    pd.testing.assert_frame_equal(a.objects.astype({"difficult": bool, "truncated": bool}),
                                  b.objects.astype({"difficult": bool, "truncated": bool}), check_dtype=False)
    # boxes are the same pixels: VOC 1-based inclusive xmin..xmax = continuous x1 = xmin - 1 .. x2 = xmax
    assert a.objects.iloc[0][["x1", "y1", "x2", "y2"]].tolist() == [2, 10, 20, 30]
    # a ground-truth class outside the class list, a missing annotation, a size mismatch
    with pytest.raises(DatasetError, match=r"object 1 has class 'cat', which is not among the classes \['dog'\]"):
        build_image_manifest(folder, write_csv_clicks(tmp_path / "d.csv", [r for r in CLICKS if r[1] == "dog"]),
                             gt=ann)
    (ann / "top.xml").unlink()
    with pytest.raises(DatasetError, match=r"top.xml: ground-truth annotation of image top not found"):
        build_image_manifest(folder, clicks, gt=ann)
    (ann / "top.xml").write_text(_voc_xml(31, 20, []))
    with pytest.raises(DatasetError, match=r"top.xml: annotation says 31x20, the image is 30x20"):
        build_image_manifest(folder, clicks, gt=ann)


def test_click_cross_checks_duplicates_object_index_annotators(folder, tmp_path):
    ann = tmp_path / "Annotations"
    for image_id, objs in GT.items():
        (ann / image_id).parent.mkdir(parents=True, exist_ok=True)
        (ann / f"{image_id}.xml").write_text(_voc_xml(*SIZES[image_id], objs))
    dup = tmp_path / "dup.csv"
    write_csv_clicks(dup, CLICKS + [CLICKS[0]])
    with pytest.raises(ClickFileError, match=r"dup.csv: duplicate click: image a/0001, class 'dog' at \(10.5, 20\)"):
        build_image_manifest(folder, dup)
    m = build_image_manifest(folder, dup, on_bad_click="skip")
    assert len(m.clicks) == len(CLICKS) and m.report["clicks"]["duplicates"] == 1
    # object_index naming another class's object, or no object
    bad = tmp_path / "obj.csv"
    bad.write_text("image_id,class,x,y,annotator,object_index\na/0001,dog,10,20,1,0\na/0001,cat,40,30,1,0\n"
                   "b/0001,dog,5,50,1,3\n")
    with pytest.raises(ClickFileError, match=r"obj.csv: a 'cat' click names object_index 0, but object 0 of image "
                                             r"a/0001 is a 'dog'"):
        build_image_manifest(folder, bad, gt=ann)
    m = build_image_manifest(folder, bad, gt=ann, on_bad_click="skip", classes=["cat", "dog"])
    assert len(m.clicks) == 1 and m.report["clicks"]["bad_object_index"] == 2
    # --annotator: a file holding only annotator 2 is not used as annotator 1
    only2 = write_csv_clicks(tmp_path / "a2.csv", annotator=2)
    with pytest.raises(ClickFileError, match=r"a2.csv: no click of annotator 1; annotators present: \[2\]"):
        build_image_manifest(folder, only2)
    assert (build_image_manifest(folder, only2, annotator=2).clicks.annotator == 2).all()


def trainval_only_copy(sample_root: Path, tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    """The first ``n`` trainval images of the real sample as a VOC root with a trainval list and no test.txt."""
    return H.voc_sample_copy(sample_root, tmp_path, n)


def test_voc_root_without_test_split_and_unknown_xml_class(sample_root, tmp_path):
    root, ids = trainval_only_copy(sample_root, tmp_path, 4)
    m = build_manifest(root, None)
    assert set(m.images.split) == {"trainval"} and len(m.images) == 4 and m.classes[0] == "aeroplane"
    from tasks.detector import EvaluateVOC07

    with pytest.raises(ValueError, match=r"evaluation needs a test split with ground truth; .*test.txt not found"):
        EvaluateVOC07(voc_root=str(root))
    with pytest.raises(ValueError, match="evaluation needs a test split with ground truth; an --images dataset"):
        EvaluateVOC07(images=str(root / "JPEGImages"), clicks="c.csv")
    # one misspelt class among VOC names is an error naming the XML file and object, not a new class list
    xml = root / "Annotations" / f"{ids[2]}.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>x", 1))
    with pytest.raises(DatasetError, match=rf"{ids[2]}.xml: object 0 has class 'x\w+', not a VOC class"):
        build_manifest(root, None)


@pytest.mark.slow
def test_same_pseudo_boxes_from_voc_root_image_folder_with_and_without_gt(sample_root, tmp_path):
    """On 10 voc07-sample images: the pseudo boxes of --voc-root, of --images --gt Annotations and of --images
    alone are identical (ground truth is read for the metrics only), through the whole PseudoLabels chain."""
    root, ids = trainval_only_copy(sample_root, tmp_path, 10)
    raw = pd.read_csv(sample_root / "clicks_trainval.csv", dtype={"image_id": str})
    clicks = tmp_path / "clicks.csv"
    raw[raw.image_id.isin(ids)].to_csv(clicks, index=False)
    common = {k: v for k, v in H.TINY.items() if not k.startswith("synth")}
    common.update({"ss-image-max-px": 200, "ss-shards": 1})
    # a VOC root has VOC's 20 classes; a folder's classes are those of its clicks (fewer on 10 images): the same
    # class list makes the same classifier
    from pipeline.voc import VOC_CLASSES

    voc_classes = ["--classes", ",".join(VOC_CLASSES)]
    variants = {"voc": ["--voc-root", str(root), "--clicks", str(clicks)],
                "images+gt": ["--images", str(root / "JPEGImages"), "--clicks", str(clicks), "--gt",
                              str(root / "Annotations"), *voc_classes],
                "images": ["--images", str(root / "JPEGImages"), "--clicks", str(clicks), *voc_classes]}
    labels = {}
    for name, data_args in variants.items():
        out = tmp_path / f"out-{name}"
        args = data_args + [a for k, v in common.items() for a in (f"--{k}", str(v))]
        res = H.run_luigi("PseudoLabels", args, out, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        labels[name] = H.pseudo_labels(out)
        metrics = list(out.glob("FusePseudoBoxes/*/metrics.json"))
        assert ("metrics" in json.loads(metrics[0].read_text())) == (name != "images")
    assert len(labels["voc"]) == (raw.image_id.isin(ids) & (raw.annotator == 1)).sum()
    cols = ["click_id", "image_id", "class", "x1", "y1", "x2", "y2", "score", "fallback"]
    for name in ("images+gt", "images"):
        pd.testing.assert_frame_equal(labels[name][cols], labels["voc"][cols], check_like=False)
