import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipeline.voc import (VOC_CLASSES, AnnotationError, VOCObject, annotation_xml, load_voc, parse_annotation,
                          read_split)


def _raw_boxes(xml_path):
    """Independent reading: regexes over the XML text, devkit 1-based inclusive boxes."""
    text = xml_path.read_text()
    objs = re.findall(r"<object>.*?</object>", text, flags=re.S)
    out = []
    for o in objs:
        name = re.search(r"<name>\s*(\S+)\s*</name>", o).group(1)
        vals = [float(re.search(rf"<{t}>\s*([-\d.]+)\s*</{t}>", o).group(1)) for t in ("xmin", "ymin", "xmax", "ymax")]
        out.append((name, *vals))
    return out


def test_real_annotations_match_their_xml(sample_root):
    voc = sample_root / "VOC2007"
    ids = read_split(voc, "trainval")
    assert len(ids) == 750
    for image_id in ids[:6]:
        ann = parse_annotation(voc / "Annotations" / f"{image_id}.xml", VOC_CLASSES)
        raw = _raw_boxes(voc / "Annotations" / f"{image_id}.xml")
        assert len(ann.objects) == len(raw) > 0
        for o, (name, xmin, ymin, xmax, ymax) in zip(ann.objects, raw):
            assert o.cls == name
            assert (o.x1, o.y1, o.x2, o.y2) == (xmin - 1, ymin - 1, xmax, ymax)
            assert 0 <= o.x1 < o.x2 <= ann.width and 0 <= o.y1 < o.y2 <= ann.height


def test_load_voc_tables(sample_root):
    images, objects = load_voc(sample_root / "VOC2007", ("trainval", "test"), VOC_CLASSES)
    assert (images.split == "trainval").sum() == 750 and (images.split == "test").sum() == 18
    n_xml_objects = sum(len(_raw_boxes(sample_root / "VOC2007" / "Annotations" / f"{i}.xml"))
                        for i in images.image_id.unique())
    assert len(objects) == n_xml_objects
    assert set(objects["class"]) == set(VOC_CLASSES)  # the sample has all 20 classes
    first = images.iloc[0]
    root = ET.parse(sample_root / "VOC2007" / "Annotations" / f"{first.image_id}.xml").getroot()
    assert (first.width, first.height) == (int(root.find("size/width").text), int(root.find("size/height").text))


def test_xml_round_trip(tmp_path):
    objs = [VOCObject("dog", 9.0, 19.0, 120.0, 80.0, difficult=True), VOCObject("cat", 0.0, 0.0, 50.0, 50.0)]
    p = tmp_path / "x.xml"
    p.write_text(annotation_xml("x", 200, 100, objs))
    ann = parse_annotation(p)
    assert (ann.width, ann.height) == (200, 100)
    assert [(o.cls, o.x1, o.y1, o.x2, o.y2, o.difficult) for o in ann.objects] == \
        [("dog", 9.0, 19.0, 120.0, 80.0, True), ("cat", 0.0, 0.0, 50.0, 50.0, False)]


@pytest.mark.parametrize("body, problem", [
    ("<annotation><size><width>10</width>", "malformed XML"),
    ("<annotation><object><name>dog</name></object></annotation>", "no <size>"),
    ("<annotation><size><width>50</width><height>50</height></size><object><name>unicorn</name>"
     "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>",
     "unknown class 'unicorn'"),
    ("<annotation><size><width>50</width><height>50</height></size><object><name>dog</name>"
     "<bndbox><xmin>10</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>",
     "degenerate box"),
    ("<annotation><size><width>50</width><height>50</height></size><object><name>dog</name>"
     "<bndbox><xmin>10</xmin><ymin>1</ymin><xmax>60</xmax><ymax>5</ymax></bndbox></object></annotation>",
     "outside the 50x50 image"),
    ("<annotation><size><width>50</width><height>50</height></size><object><name>dog</name>"
     "<bndbox><xmin>a</xmin><ymin>1</ymin><xmax>6</xmax><ymax>5</ymax></bndbox></object></annotation>",
     "is not a number"),
])
def test_bad_annotations_name_file_and_problem(tmp_path, body, problem):
    p = tmp_path / "000001.xml"
    p.write_text(body)
    with pytest.raises(AnnotationError) as e:
        parse_annotation(p, VOC_CLASSES)
    assert str(p) in str(e.value) and problem in str(e.value)


def test_missing_annotation(tmp_path):
    with pytest.raises(AnnotationError, match="annotation file not found"):
        parse_annotation(tmp_path / "nope.xml")


# -- <difficult> / <truncated> values --------------------------------------------------------------------------
def xml_with(tmp_path: Path, difficult: str, truncated: str = "0") -> Path:
    p = tmp_path / "000001.xml"
    text = annotation_xml("000001", 100, 80, [VOCObject("dog", 9.0, 9.0, 50.0, 40.0)])
    text = text.replace("<difficult>0</difficult>", f"<difficult>{difficult}</difficult>")
    text = text.replace("<truncated>0</truncated>", f"<truncated>{truncated}</truncated>")
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, value", [
    ("1", True), ("0", False), ("true", True), ("False", False), (" TRUE ", True), ("yes", True), ("No", False),
    ("1.0", True), ("0.0", False), ("\n  1\n ", True), ("", False),
])
def test_difficult_and_truncated_flag_spellings(tmp_path, text, value):
    ann = parse_annotation(xml_with(tmp_path, text, text))
    assert ann.objects[0].difficult is value and ann.objects[0].truncated is value


@pytest.mark.parametrize("tag", ["difficult", "truncated"])
@pytest.mark.parametrize("text", ["maybe", "2", "0.5", "-1", "nan"])
def test_bad_flag_names_file_object_and_value(tmp_path, tag, text):
    p = xml_with(tmp_path, text if tag == "difficult" else "0", text if tag == "truncated" else "0")
    with pytest.raises(AnnotationError) as e:
        parse_annotation(p)
    assert str(e.value) == f"{p}: object 0 (dog) <{tag}> is not a flag (0/1, true/false or yes/no): {text!r}"


# -- split lists -----------------------------------------------------------------------------------------------
def split_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ImageSets" / "Main" / "trainval.txt"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_split_lines_with_flags(tmp_path):
    split_file(tmp_path, "000001\n000002  1\n000003 -1\n\n000004\t0\n")
    assert read_split(tmp_path, "trainval") == ["000001", "000002", "000003", "000004"]


@pytest.mark.parametrize("line", ["my image", "000002 1 extra", "000002 +1", "000002 2"])
def test_split_line_with_a_space_in_the_id_names_file_line_and_text(tmp_path, line):
    p = split_file(tmp_path, f"000001\n{line}\n000003\n")
    with pytest.raises(AnnotationError) as e:
        read_split(tmp_path, "trainval")
    assert str(e.value) == (f"{p}:2: {line!r} is not an image id optionally followed by a flag -1, 0 or 1 "
                            f"(image ids cannot contain spaces)")
