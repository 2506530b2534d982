"""PASCAL VOC reader/writer.

VOC XML boxes are 1-based and inclusive; inside clickscale boxes are 0-based continuous
``(x1, y1, x2, y2)`` with ``x1 = xmin - 1`` and ``x2 = xmax`` (see docs/architecture.md). This module is the only
place that converts.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

OBJECT_COLUMNS = ["image_id", "object_index", "class", "x1", "y1", "x2", "y2", "difficult", "truncated"]


class AnnotationError(ValueError):
    """A VOC annotation file is missing or malformed."""


@dataclass
class VOCObject:
    cls: str
    x1: float
    y1: float
    x2: float
    y2: float
    difficult: bool = False
    truncated: bool = False
    score: float | None = None  # a detection's confidence, written as <score> (readers ignore it)


@dataclass
class VOCAnnotation:
    image_id: str
    width: int
    height: int
    filename: str
    objects: list[VOCObject] = field(default_factory=list)


#: the flags a split list line may carry after its image id (the per-class lists' -1 / 0 / 1)
SPLIT_FLAGS = ("-1", "0", "1")


def read_split(voc_root: str | os.PathLike, split: str) -> list[str]:
    """Image ids of ``ImageSets/Main/<split>.txt``: one id a line, optionally followed by a flag -1, 0 or 1.

    Raises :class:`AnnotationError` naming the file, the line number and the line when a line has anything else
    (image ids cannot contain spaces).
    """
    path = Path(voc_root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split list not found (is {voc_root} a VOC<year> root?)")
    ids = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and fields[1] not in SPLIT_FLAGS):
            raise AnnotationError(f"{path}:{lineno}: {line!r} is not an image id optionally followed by a flag "
                                  f"-1, 0 or 1 (image ids cannot contain spaces)")
        ids.append(fields[0])
    return ids


def _text(node: ET.Element, tag: str, path: Path, what: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise AnnotationError(f"{path}: {what} has no <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, what: str) -> float:
    text = _text(node, tag, path, what)
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(f"{path}: {what} <{tag}> is not a number: {text!r}") from None


_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def _flag(node: ET.Element, tag: str, path: Path, what: str) -> bool:
    """An optional 0/1 element (``<difficult>``, ``<truncated>``): absent or empty is False; 1/0, true/false,
    yes/no (any case) and numbers equal to 1 or 0 (``1.0``) are accepted."""
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return False
    text = child.text.strip()
    low = text.lower()
    if low in _TRUE or low in _FALSE:
        return low in _TRUE
    try:
        value = float(text)
    except ValueError:
        value = None
    if value in (0.0, 1.0):
        return value == 1.0
    raise AnnotationError(f"{path}: {what} <{tag}> is not a flag (0/1, true/false or yes/no): {text!r}")


def parse_annotation(path: str | os.PathLike, classes: Sequence[str] | None = None) -> VOCAnnotation:
    """Parse one VOC XML file into 0-based continuous boxes.

    Raises :class:`AnnotationError` naming the file and the object when the XML is missing or malformed, a box
    is degenerate or outside the image, or (when ``classes`` is given) an object has an unknown class.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: malformed XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise AnnotationError(f"{path}: no <size> element")
    width = int(_number(size, "width", path, "<size>"))
    height = int(_number(size, "height", path, "<size>"))
    if width <= 0 or height <= 0:
        raise AnnotationError(f"{path}: image size {width}x{height} is not positive")
    filename_node = root.find("filename")
    image_id = path.stem
    filename = filename_node.text.strip() if filename_node is not None and filename_node.text else f"{image_id}.jpg"
    objects = []
    for i, obj in enumerate(root.findall("object")):
        what = f"object {i}"
        name = _text(obj, "name", path, what)
        what = f"object {i} ({name})"
        if classes is not None and name not in classes:
            raise AnnotationError(f"{path}: {what} has unknown class {name!r}")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise AnnotationError(f"{path}: {what} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bnd, t, path, what) for t in ("xmin", "ymin", "xmax", "ymax"))
        x1, y1, x2, y2 = xmin - 1.0, ymin - 1.0, xmax, ymax
        if not (x2 > x1 and y2 > y1):
            raise AnnotationError(f"{path}: {what} has a degenerate box {xmin:g},{ymin:g},{xmax:g},{ymax:g}")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise AnnotationError(
                f"{path}: {what} box {xmin:g},{ymin:g},{xmax:g},{ymax:g} lies outside the {width}x{height} image")
        objects.append(VOCObject(name, x1, y1, x2, y2, difficult=_flag(obj, "difficult", path, what),
                                 truncated=_flag(obj, "truncated", path, what)))
    return VOCAnnotation(image_id, width, height, filename, objects)


def load_voc(voc_root: str | os.PathLike, splits: Iterable[str] = ("trainval", "test"),
             classes: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read splits of a VOC<year> root.

    Returns ``(images, objects)``: ``images`` has ``image_id, split, width, height, path``; ``objects`` has
    :data:`OBJECT_COLUMNS`. A split whose list file does not exist is skipped only if it is not the first.
    """
    voc_root = Path(voc_root)
    img_rows, obj_rows = [], []
    seen: dict[str, VOCAnnotation] = {}
    for k, split in enumerate(splits):
        if k > 0 and not (voc_root / "ImageSets" / "Main" / f"{split}.txt").is_file():
            continue
        for image_id in read_split(voc_root, split):
            ann = seen.get(image_id)
            if ann is None:
                ann = parse_annotation(voc_root / "Annotations" / f"{image_id}.xml", classes)
                seen[image_id] = ann
                for j, o in enumerate(ann.objects):
                    obj_rows.append((image_id, j, o.cls, o.x1, o.y1, o.x2, o.y2, o.difficult, o.truncated))
            img_rows.append((image_id, split, ann.width, ann.height,
                             str((voc_root / "JPEGImages" / f"{image_id}.jpg").resolve())))
    images = pd.DataFrame(img_rows, columns=["image_id", "split", "width", "height", "path"])
    objects = pd.DataFrame(obj_rows, columns=OBJECT_COLUMNS)
    return images, objects


def annotation_xml(image_id: str, width: int, height: int, objects: Iterable[VOCObject],
                   folder: str = "VOC2007", depth: int = 3, filename: str | None = None) -> str:
    """VOC XML text for an image; boxes given in 0-based continuous coordinates, written 1-based inclusive.
    ``filename``: the image's file name (default ``<image_id>.jpg``)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename or f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(int(width))
    ET.SubElement(size, "height").text = str(int(height))
    ET.SubElement(size, "depth").text = str(depth)
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = o.cls
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(o.truncated))
        ET.SubElement(node, "difficult").text = str(int(o.difficult))
        if o.score is not None:
            ET.SubElement(node, "score").text = f"{float(o.score):.6f}"
        bb = ET.SubElement(node, "bndbox")
        xmin = max(1, int(round(o.x1)) + 1)
        ymin = max(1, int(round(o.y1)) + 1)
        xmax = min(int(width), max(xmin, int(round(o.x2))))
        ymax = min(int(height), max(ymin, int(round(o.y2))))
        for tag, v in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(bb, tag).text = str(v)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def write_annotation(path: str | os.PathLike, image_id: str, width: int, height: int,
                     objects: Iterable[VOCObject], **kwargs) -> Path:
    from .io import write_text

    return write_text(path, annotation_xml(image_id, width, height, objects, **kwargs))


def write_image_sets(voc_root: str | os.PathLike, splits: dict[str, list[str]], objects: pd.DataFrame,
                     classes: Sequence[str]) -> None:
    """Write ``ImageSets/Main/<split>.txt`` and the per-class ``<class>_<split>.txt`` lists (1 / -1 / 0)."""
    from .io import write_text

    main = Path(voc_root) / "ImageSets" / "Main"
    for split, ids in splits.items():
        write_text(main / f"{split}.txt", "".join(f"{i}\n" for i in ids))
        sub = objects[objects.image_id.isin(set(ids))]
        for cls in classes:
            rows = sub[sub["class"] == cls]
            present = set(rows.image_id[~rows.difficult.astype(bool)])
            only_difficult = set(rows.image_id) - present
            lines = []
            for i in ids:
                flag = 1 if i in present else (0 if i in only_difficult else -1)
                lines.append(f"{i} {flag:2d}\n")
            write_text(main / f"{cls}_{split}.txt", "".join(lines))
