"""Point-annotation readers (pipeline.pointformats) and read_clicks over every format.

The fixtures are written by hand after each format's public documentation: COCO keypoint annotations
(cocodataset.org "format-data"), CVAT for images 1.1 XML (docs.cvat.ai "XML annotation format"), Label Studio's
JSON export of KeyPointLabels results (labelstud.io "task format" and the KeyPointLabels tag's result fields).
"""
import json
import math

import pandas as pd
import pytest

from pipeline.clicks import ClickFileError, read_clicks
from pipeline.pointformats import (POINT_FORMATS, AmbiguousImageRef, detect_point_format, read_coco_boxes,
                                   read_points, resolve_image_refs)
from pipeline.voc import AnnotationError

SIZES = {"a/0001": (100, 50), "0002": (30, 30)}
CLASSES = ("cat", "dog")


# -- fixtures -------------------------------------------------------------------------------------------------
def coco_doc():
    return {
        "info": {"description": "center clicks", "version": "1.0", "year": 2024, "contributor": "lab",
                 "date_created": "2024-05-01"},
        "licenses": [{"id": 1, "name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}],
        "images": [
            {"id": 1, "width": 100, "height": 50, "file_name": "a/0001.jpg", "license": 1, "flickr_url": "",
             "coco_url": "", "date_captured": "2024-05-01 10:00:00"},
            {"id": 2, "width": 30, "height": 30, "file_name": "0002.jpg", "license": 1, "flickr_url": "",
             "coco_url": "", "date_captured": "2024-05-01 10:00:00"},
        ],
        "categories": [
            {"id": 1, "name": "dog", "supercategory": "animal", "keypoints": ["head", "center"], "skeleton": []},
            {"id": 2, "name": "cat", "supercategory": "animal", "keypoints": ["head", "center"], "skeleton": []},
        ],
        "annotations": [
            # first keypoint not labelled (v=0, x=y=0): the click is the second one
            {"id": 17, "image_id": 1, "category_id": 1, "segmentation": [], "area": 600.0,
             "bbox": [10.0, 5.0, 30.0, 20.0], "iscrowd": 0, "keypoints": [0, 0, 0, 25.5, 15.0, 2],
             "num_keypoints": 1},
            {"id": 18, "image_id": 2, "category_id": 2, "segmentation": [], "area": 100.0,
             "bbox": [5.0, 2.0, 10.0, 10.0], "iscrowd": 0, "keypoints": [12.0, 7.0, 1, 0, 0, 0],
             "num_keypoints": 1, "annotator": 2, "object_index": 0},
            # a plain box: no click
            {"id": 19, "image_id": 1, "category_id": 2, "segmentation": [[50, 5, 90, 5, 90, 45]], "area": 800.0,
             "bbox": [50.0, 5.0, 40.0, 40.0], "iscrowd": 1},
            {"id": 20, "image_id": 2, "category_id": 1, "point": [3.5, 4.25], "iscrowd": 0},
        ],
    }


CVAT_XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <task>
      <id>7</id>
      <name>center clicks</name>
      <size>2</size>
      <mode>annotation</mode>
      <overlap>0</overlap>
      <bugtracker></bugtracker>
      <created>2024-05-01 10:00:00.000000+00:00</created>
      <updated>2024-05-02 09:30:00.000000+00:00</updated>
      <subset>default</subset>
      <start_frame>0</start_frame>
      <stop_frame>1</stop_frame>
      <frame_filter></frame_filter>
      <segments>
        <segment><id>9</id><start>0</start><stop>1</stop><url>http://localhost:8080/api/jobs/9</url></segment>
      </segments>
      <owner><username>admin</username><email>admin@example.com</email></owner>
      <assignee></assignee>
      <labels>
        <label>
          <name>dog</name><color>#fa3253</color><type>points</type>
          <attributes>
            <attribute><name>annotator</name><mutable>False</mutable><input_type>number</input_type>
              <default_value>1</default_value><values>1;9;1</values></attribute>
          </attributes>
        </label>
        <label><name>cat</name><color>#33ddff</color><type>any</type><attributes></attributes></label>
      </labels>
    </task>
    <dumped>2024-05-02 09:31:00.000000+00:00</dumped>
  </meta>
  <image id="0" name="a/0001.jpg" width="100" height="50">
    <box label="dog" source="manual" occluded="0" xtl="10.00" ytl="5.00" xbr="40.00" ybr="25.00" z_order="0">
    </box>
    <points label="dog" source="manual" occluded="0" points="12.50,30.10" z_order="0">
      <attribute name="annotator">2</attribute>
    </points>
    <points label="cat" source="manual" occluded="0" points="60.00,10.00;70.25,20.75" z_order="0">
    </points>
  </image>
  <image id="1" name="0002.jpg" width="30" height="30">
    <points label="cat" source="manual" occluded="0" points="29.50,0.00" z_order="0">
    </points>
  </image>
</annotations>
"""


def _kp(rid, x, y, label, w, h):
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.6666666666666666, "keypointlabels": [label]},
            "id": rid, "from_name": "kp", "to_name": "image", "type": "keypointlabels", "origin": "manual"}


def _ann(aid, task, completed_by, result, cancelled=False):
    return {"id": aid, "completed_by": completed_by, "result": result, "was_cancelled": cancelled,
            "ground_truth": False, "created_at": "2024-05-01T10:00:00.000000Z",
            "updated_at": "2024-05-01T10:00:05.000000Z", "draft_created_at": None, "lead_time": 5.1,
            "prediction": {}, "result_count": 0, "unique_id": f"u-{aid}", "import_id": None,
            "last_action": None, "task": task, "project": 1, "updated_by": completed_by,
            "parent_prediction": None, "parent_annotation": None, "last_created_by": None}


def ls_doc():
    box = {"original_width": 100, "original_height": 50, "image_rotation": 0,
           "value": {"x": 10, "y": 10, "width": 30, "height": 40, "rotation": 0, "rectanglelabels": ["dog"]},
           "id": "bx1", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual"}
    task3 = {"id": 3, "annotations": [
        _ann(1, 3, 7, [_kp("abc123", 25.0, 50.0, "dog", 100, 50), box]),
        _ann(2, 3, 3, [_kp("def456", 75.0, 12.5, "cat", 100, 50)]),
        _ann(5, 3, 12, [_kp("zzz999", 50.0, 50.0, "dog", 100, 50)], cancelled=True),
    ], "file_upload": "1a2b3c4d-0001.jpg", "drafts": [], "predictions": [],
        "data": {"image": "/data/upload/1/1a2b3c4d-0001.jpg"}, "meta": {},
        "created_at": "2024-05-01T09:00:00.000000Z", "updated_at": "2024-05-01T10:00:05.000000Z", "inner_id": 1,
        "total_annotations": 2, "cancelled_annotations": 1, "total_predictions": 0, "comment_count": 0,
        "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1, "updated_by": 7,
        "comment_authors": []}
    task4 = {"id": 4, "annotations": [
        _ann(3, 4, {"id": 7, "first_name": "", "last_name": "", "email": "b@example.com"},
             [_kp("ghi789", 12.5, 25.0, "cat", 30, 30)]),
    ], "file_upload": None, "drafts": [], "predictions": [],
        "data": {"photo": "/data/local-files/?d=imgs%2F0002.jpg"}, "meta": {},
        "created_at": "2024-05-01T09:00:00.000000Z", "updated_at": "2024-05-01T10:00:05.000000Z", "inner_id": 2,
        "total_annotations": 1, "cancelled_annotations": 0, "total_predictions": 0, "comment_count": 0,
        "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1, "updated_by": 7,
        "comment_authors": []}
    return [task3, task4]


def write(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, (dict, list)):
        content = json.dumps(content, indent=1)
    p.write_text(content, encoding="utf-8")
    return p


def records(df):
    return list(df[["image_ref", "class", "x", "y", "annotator", "object_index", "where"]].itertuples(index=False,
                                                                                                      name=None))


# -- readers --------------------------------------------------------------------------------------------------
def test_csv_with_bom_blank_lines_and_optional_columns(tmp_path):
    p = tmp_path / "clicks.csv"
    p.write_bytes(b"\xef\xbb\xbfimage_id,class,x,y,annotator,object_index\n"
                  b"a/0001,dog,1.5,2,2,\n\n0002,cat,3,4,1,5\n")
    pts = read_points(p)
    assert pts.attrs["format"] == "csv"
    assert records(pts) == [("a/0001", "dog", "1.5", "2", 2, -1, "line 2"), ("0002", "cat", "3", "4", 1, 5, "line 4")]
    clicks, rep = read_clicks(p, SIZES, CLASSES)
    assert list(clicks.image_id) == ["a/0001", "0002"] and list(clicks.x) == [1.5, 3.0] and rep["format"] == "csv"


@pytest.mark.parametrize("header, reason", [
    ("image_id,klass,x,y", "missing column class; unknown column 'klass'"),
    ("image_id,class,x", "missing column y;"),
    ("image_id,class,x,y,x", "duplicated column x;"),
    ("image_id,class,x,y,score", "unknown column 'score';"),
])
def test_csv_bad_header_says_why(tmp_path, header, reason):
    p = write(tmp_path, "c.csv", header + "\na,dog,1,1\n")
    with pytest.raises(ClickFileError) as e:
        read_points(p)
    assert str(e.value).startswith(f"{p}:1: bad header {header!r}: {reason}")


def test_csv_columns_by_name_in_any_order(tmp_path):
    p = write(tmp_path, "c.csv", "x,y,class,image_id\n1,2,dog,0002\n")
    clicks, _ = read_clicks(p, SIZES, CLASSES)
    assert clicks.iloc[0].tolist() == ["0002", "dog", 1.0, 2.0, 1, -1]


def test_coco_points(tmp_path):
    pts = read_points(write(tmp_path, "clicks.json", coco_doc()))
    assert pts.attrs["format"] == "coco"
    assert records(pts) == [("a/0001.jpg", "dog", 25.5, 15.0, 1, -1, "annotation id 17"),
                            ("0002.jpg", "cat", 12.0, 7.0, 2, 0, "annotation id 18"),
                            ("0002.jpg", "dog", 3.5, 4.25, 1, -1, "annotation id 20")]
    assert pts.attrs["ignored"] == {"annotation without keypoints or point": 1}
    assert list(pts.width) == [100, 30, 30] and list(pts.height) == [50, 30, 30]


def test_coco_annotation_with_several_labelled_keypoints_is_an_error(tmp_path):
    doc = coco_doc()
    doc["annotations"][0]["keypoints"] = [10, 10, 2, 25.5, 15.0, 2]
    p = write(tmp_path, "c.json", doc)
    with pytest.raises(ClickFileError, match=rf"^{p}:annotation id 17: 2 labelled keypoints"):
        read_points(p)


def test_coco_missing_category_names_the_annotation(tmp_path):
    doc = coco_doc()
    doc["annotations"][1]["category_id"] = 9
    p = write(tmp_path, "c.json", doc)
    with pytest.raises(ClickFileError, match=rf"^{p}:annotation id 18: category_id 9 is not among"):
        read_points(p)


def test_cvat_points_and_multi_point_shapes(tmp_path):
    pts = read_points(write(tmp_path, "annotations.xml", CVAT_XML))
    assert pts.attrs["format"] == "cvat"
    assert records(pts) == [
        ("a/0001.jpg", "dog", 12.5, 30.1, 2, -1, "image 'a/0001.jpg' shape 1"),
        ("a/0001.jpg", "cat", 60.0, 10.0, 1, -1, "image 'a/0001.jpg' shape 2 point 0"),
        ("a/0001.jpg", "cat", 70.25, 20.75, 1, -1, "image 'a/0001.jpg' shape 2 point 1"),
        ("0002.jpg", "cat", 29.5, 0.0, 1, -1, "image '0002.jpg' shape 0"),
    ]
    assert pts.attrs["multi_point_shapes"] == 1 and pts.attrs["ignored"] == {"<box> shape (not points)": 1}
    assert list(pts.width) == [100, 100, 100, 30]


def test_labelstudio_keypoints(tmp_path):
    pts = read_points(write(tmp_path, "project-1.json", ls_doc()))
    assert pts.attrs["format"] == "labelstudio"
    # percent of original_width/original_height -> pixels; completed_by 3 -> annotator 1, 7 (int or dict) -> 2;
    # the cancelled annotation of user 12 is skipped and takes no annotator number
    assert records(pts) == [
        ("/data/upload/1/1a2b3c4d-0001.jpg", "dog", 25.0, 25.0, 2, -1, "task 3 result 'abc123'"),
        ("/data/upload/1/1a2b3c4d-0001.jpg", "cat", 75.0, 6.25, 1, -1, "task 3 result 'def456'"),
        ("imgs/0002.jpg", "cat", 3.75, 7.5, 2, -1, "task 4 result 'ghi789'"),
    ]
    assert pts.attrs["ignored"] == {"cancelled annotation": 1, "result that is not keypointlabels": 1}


def test_labelstudio_missing_original_size_names_task_and_result(tmp_path):
    doc = ls_doc()
    del doc[1]["annotations"][0]["result"][0]["original_width"]
    p = write(tmp_path, "ls.json", doc)
    with pytest.raises(ClickFileError, match=rf"^{p}:task 4 result 'ghi789': original_width/original_height missing"):
        read_points(p)


def test_labelstudio_url_decoding_and_missing_completed_by(tmp_path):
    doc = ls_doc()[:1]
    doc[0]["data"] = {"image": "https://example.com/my%20images/a/0001.jpg"}
    doc[0]["annotations"] = [dict(doc[0]["annotations"][1])]
    del doc[0]["annotations"][0]["completed_by"]
    pts = read_points(write(tmp_path, "ls.json", doc))
    assert list(pts.image_ref) == ["https://example.com/my images/a/0001.jpg"] and list(pts.annotator) == [1]


# -- detection --------------------------------------------------------------------------------------------------
def test_detect_by_extension_and_content(tmp_path):
    assert POINT_FORMATS == ("csv", "coco", "cvat", "labelstudio")
    assert detect_point_format(write(tmp_path, "c.csv", "image_id,class,x,y\n")) == "csv"
    assert detect_point_format(write(tmp_path, "c.txt", "image_id,class,x,y\n")) == "csv"
    assert detect_point_format(write(tmp_path, "c.xml", CVAT_XML)) == "cvat"
    assert detect_point_format(write(tmp_path, "c.json", coco_doc())) == "coco"
    assert detect_point_format(write(tmp_path, "l.json", ls_doc())) == "labelstudio"


@pytest.mark.parametrize("name, content, problem", [
    ("c.json", {"images": []}, "JSON is neither COCO"),
    ("c.json", [{"data": {}}], "JSON is neither COCO"),
    ("c.xml", "<annotation><filename>x.jpg</filename></annotation>", "XML root is <annotation>, expected"),
    ("c.yaml", "a: 1\n", "cannot tell the point format from the extension '.yaml'"),
    ("c.json", "{\"images\": [", "not valid JSON"),
])
def test_detect_rejects_other_files_naming_them(tmp_path, name, content, problem):
    p = write(tmp_path, name, content)
    with pytest.raises(ClickFileError) as e:
        detect_point_format(p)
    assert str(e.value).startswith(f"{p}") and problem in str(e.value)
    if "neither" in problem or "extension" in problem or "XML root" in problem:
        assert "Label Studio" in str(e.value) and "CVAT" in str(e.value)


def test_explicit_format_must_match_the_content(tmp_path):
    p = write(tmp_path, "c.json", coco_doc())
    assert read_points(p, fmt="coco").attrs["format"] == "coco"
    with pytest.raises(ClickFileError, match="not a labelstudio file"):
        read_points(p, fmt="labelstudio")


# -- image names ------------------------------------------------------------------------------------------------
def test_resolve_image_refs_rules():
    ids = ["000005", "a/0001", "0001", "b/c/0007", "x/0009"]
    refs = ["000005", "000005.jpg", "/data/upload/3/a/0001.jpg", "./0001.png", "C:\\imgs\\b\\c\\0007.JPG",
            "0009.jpg", "/data/upload/3/1a2b3c4d-0009.jpg", "https://h.org/p/a/0001.jpg?sig=1", "nope.jpg",
            "y/0009.jpg"]
    assert resolve_image_refs(refs, ids) == {
        "000005": "000005", "000005.jpg": "000005",
        "/data/upload/3/a/0001.jpg": "a/0001",           # longest tail match: a/0001 over 0001
        "./0001.png": "0001", "C:\\imgs\\b\\c\\0007.JPG": "b/c/0007",
        "0009.jpg": "x/0009",                             # the ref is the tail of one id
        "/data/upload/3/1a2b3c4d-0009.jpg": "x/0009",     # Label Studio upload prefix
        "https://h.org/p/a/0001.jpg?sig=1": "a/0001",
        "nope.jpg": None, "y/0009.jpg": None,             # y/ contradicts x/
    }


def test_resolve_image_refs_ambiguity_names_ref_and_candidates():
    with pytest.raises(AmbiguousImageRef) as e:
        resolve_image_refs(["0001.jpg"], ["a/0001", "b/0001"])
    assert "'0001.jpg'" in str(e.value) and "a/0001, b/0001" in str(e.value)
    assert resolve_image_refs(["a/0001.jpg"], ["a/0001", "b/0001"]) == {"a/0001.jpg": "a/0001"}
    with pytest.raises(AmbiguousImageRef) as e:  # through the Label Studio upload rule: the ref as the file has it
        resolve_image_refs(["/data/upload/2/0a1b2c3d-0001.jpg"], ["a/0001", "b/0001"])
    assert e.value.ref == "/data/upload/2/0a1b2c3d-0001.jpg" and e.value.candidates == ["a/0001", "b/0001"]


# -- read_clicks over every format -------------------------------------------------------------------------------
def test_read_clicks_coco(tmp_path):
    clicks, rep = read_clicks(write(tmp_path, "c.json", coco_doc()), SIZES, CLASSES)
    assert clicks.values.tolist() == [["a/0001", "dog", 25.5, 15.0, 1, -1], ["0002", "cat", 12.0, 7.0, 2, 0],
                                      ["0002", "dog", 3.5, 4.25, 1, -1]]
    assert rep["format"] == "coco" and rep["kept"] == 3
    assert rep["ignored"] == {"annotation without keypoints or point": 1}


def test_read_clicks_coco_click_outside_names_the_annotation(tmp_path):
    doc = coco_doc()
    doc["annotations"][3]["point"] = [30.0, 4.0]  # x == width of the 30x30 image
    p = write(tmp_path, "c.json", doc)
    with pytest.raises(ClickFileError) as e:
        read_clicks(p, SIZES, CLASSES)
    assert str(e.value) == f"{p}:annotation id 20: click outside the image: (30, 4) not in the 30x30 image 0002"
    clicks, rep = read_clicks(p, SIZES, CLASSES, on_bad="skip")
    assert len(clicks) == 2 and rep["skipped_by_reason"] == {"click outside the image": 1}
    assert rep["examples"] == [str(e.value)]


def test_read_clicks_cvat(tmp_path):
    clicks, rep = read_clicks(write(tmp_path, "annotations.xml", CVAT_XML), SIZES, CLASSES)
    assert clicks.values.tolist() == [["a/0001", "dog", 12.5, 30.1, 2, -1], ["a/0001", "cat", 60.0, 10.0, 1, -1],
                                      ["a/0001", "cat", 70.25, 20.75, 1, -1], ["0002", "cat", 29.5, 0.0, 1, -1]]
    assert rep["format"] == "cvat" and rep["multi_point_shapes"] == 1


def test_read_clicks_labelstudio(tmp_path):
    clicks, rep = read_clicks(write(tmp_path, "ls.json", ls_doc()), SIZES, CLASSES)
    assert clicks.values.tolist() == [["a/0001", "dog", 25.0, 25.0, 2, -1], ["a/0001", "cat", 75.0, 6.25, 1, -1],
                                      ["0002", "cat", 3.75, 7.5, 2, -1]]
    assert rep["format"] == "labelstudio" and rep["skipped"] == 0


def test_read_clicks_file_size_differs_from_the_dataset(tmp_path):
    p = write(tmp_path, "annotations.xml", CVAT_XML.replace('width="30" height="30"', 'width="60" height="60"'))
    with pytest.raises(ClickFileError) as e:
        read_clicks(p, SIZES, CLASSES)
    assert str(e.value) == (f"{p}:image '0002.jpg' shape 0: image size mismatch: the file says 60x60 for "
                            f"'0002.jpg', the dataset's image 0002 is 30x30")


def test_read_clicks_ambiguous_image_is_an_error_naming_where(tmp_path):
    p = write(tmp_path, "c.csv", "image_id,class,x,y\n0001.jpg,dog,1,1\n")
    with pytest.raises(ClickFileError) as e:
        read_clicks(p, {"a/0001": (10, 10), "b/0001": (10, 10)}, CLASSES, on_bad="skip")
    assert str(e.value).startswith(f"{p}:2: image '0001.jpg' matches several") and "a/0001, b/0001" in str(e.value)


def test_read_clicks_split_of_names_the_split(tmp_path):
    p = write(tmp_path, "c.csv", "image_id,class,x,y\n0002,cat,1,1\n000009,dog,1,1\n")
    with pytest.raises(ClickFileError) as e:
        read_clicks(p, SIZES, CLASSES, split_of={"000009": "test"})
    assert str(e.value) == (f"{p}:3: image '000009' is in the test split; clicks are read for trainval images "
                            f"only")
    _, rep = read_clicks(p, SIZES, CLASSES, on_bad="skip", split_of={"000009": "test"})
    assert rep["skipped_by_reason"] == {"image in another split": 1}
    with pytest.raises(ClickFileError, match="unknown image: '000009' is not in the dataset"):
        read_clicks(p, SIZES, CLASSES)


def test_read_clicks_classes_none_takes_any_class(tmp_path):
    p = write(tmp_path, "c.csv", "image_id,class,x,y\n0002,dragon,1,1\n")
    with pytest.raises(ClickFileError, match="unknown class: 'dragon'"):
        read_clicks(p, SIZES, CLASSES)
    clicks, _ = read_clicks(p, SIZES, None)
    assert list(clicks["class"]) == ["dragon"]


# -- COCO boxes ---------------------------------------------------------------------------------------------------
def test_read_coco_boxes(tmp_path):
    doc = coco_doc()
    doc["annotations"].append({"id": 21, "image_id": 1, "category_id": 1, "bbox": [0.5, 0.0, 99.5, 50.0],
                               "iscrowd": 0, "area": 4975.0, "segmentation": []})
    images, objects = read_coco_boxes(write(tmp_path, "instances.json", doc))
    assert images.values.tolist() == [["a/0001.jpg", 100, 50], ["0002.jpg", 30, 30]]
    assert objects.values.tolist() == [
        ["a/0001.jpg", 0, "dog", 10.0, 5.0, 40.0, 25.0, False, False],
        ["0002.jpg", 0, "cat", 5.0, 2.0, 15.0, 12.0, False, False],
        ["a/0001.jpg", 1, "cat", 50.0, 5.0, 90.0, 45.0, True, False],   # iscrowd -> difficult
        ["a/0001.jpg", 2, "dog", 0.5, 0.0, 100.0, 50.0, False, False],
    ]


@pytest.mark.parametrize("ann, problem", [
    ({"category_id": 5}, "annotation id 18: category_id 5 is not among the file's categories"),
    ({"bbox": [5.0, 2.0, 0.0, 10.0]}, "annotation id 18: box has non-positive size 0x10"),
    ({"bbox": [25.0, 2.0, 10.0, 10.0]}, "annotation id 18: box (25, 2, 35, 12) lies outside the 30x30 image "
                                         "'0002.jpg'"),
    ({"bbox": [5.0, -1.0, 10.0, 10.0]}, "annotation id 18: box (5, -1, 15, 9) lies outside"),
    ({"image_id": 77}, "annotation id 18: image_id 77 is not among the file's images"),
])
def test_read_coco_boxes_errors_name_file_and_annotation(tmp_path, ann, problem):
    doc = coco_doc()
    doc["annotations"][1].update(ann)
    p = write(tmp_path, "instances.json", doc)
    with pytest.raises(AnnotationError) as e:
        read_coco_boxes(p)
    assert str(e.value).startswith(f"{p}:{problem}")


def test_points_frame_types(tmp_path):
    pts = read_points(write(tmp_path, "c.json", coco_doc()))
    assert pts.annotator.dtype.kind == "i" and pts.object_index.dtype.kind == "i"
    assert pts.problem.isna().all() and not any(math.isnan(v) for v in pts.width)
    empty = read_points(write(tmp_path, "e.json", []))
    assert empty.attrs["format"] == "labelstudio" and len(empty) == 0 and isinstance(empty, pd.DataFrame)
