"""Readers for point-annotation files (one click per object) and COCO ground-truth boxes.

Formats (:data:`POINT_FORMATS`):

* ``csv``: the pipeline's own ``image_id,class,x,y[,annotator][,object_index]`` (docs/method.md).
* ``coco``: COCO JSON; a click is an annotation's one labelled keypoint (``keypoints`` ``[x, y, v, ...]``,
  ``v > 0``) or its ``point: [x, y]``.
* ``cvat``: CVAT for images 1.1 XML; a click is each point of a ``<points>`` shape.
* ``labelstudio``: Label Studio JSON export; a click is a ``keypointlabels`` result (percent coordinates).

:func:`read_points` gives one row per click as the file states it (image named as in the file, coordinates not
validated); :func:`resolve_image_refs` maps the file's image names to dataset image ids;
:func:`pipeline.clicks.read_clicks` does both and validates against the dataset.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable
from urllib.parse import parse_qs, unquote, urlsplit

import pandas as pd

from .voc import AnnotationError

POINT_FORMATS = ("csv", "coco", "cvat", "labelstudio")
REQUIRED_COLUMNS = ("image_id", "class", "x", "y")
OPTIONAL_COLUMNS = ("annotator", "object_index")
POINT_COLUMNS = ["image_ref", "class", "x", "y", "annotator", "object_index", "where", "width", "height", "problem"]
CSV_HEADER_HINT = "image_id,class,x,y[,annotator][,object_index]"
_ACCEPTED = ("csv (.csv/.txt, header image_id,class,x,y), COCO JSON (object with 'images' and 'annotations'), "
             "CVAT for images 1.1 XML (root <annotations>), Label Studio JSON export (list of tasks)")


class ClickFileError(ValueError):
    """A click file is malformed or disagrees with the dataset; the message names file, location and problem."""


class AmbiguousImageRef(ValueError):
    """A file's image name matches several dataset image ids equally well (``ref``, ``candidates``)."""

    def __init__(self, ref: str, candidates: Iterable[str]):
        self.ref, self.candidates = ref, sorted(candidates)
        super().__init__(f"image {ref!r} matches several dataset images equally well: {', '.join(self.candidates)}")


# -- detection ----------------------------------------------------------------------------------------------
def detect_point_format(path: str | os.PathLike) -> str:
    """The format of a point file, one of :data:`POINT_FORMATS`: ``.csv``/``.txt`` -> csv; ``.xml`` with root
    ``<annotations>`` -> cvat; ``.json`` holding an object with ``images`` and ``annotations`` -> coco, or a list of
    tasks (each with ``data`` and ``annotations`` or ``completions``) -> labelstudio. Anything else raises
    :class:`ClickFileError` naming the file and the accepted formats."""
    return _load(Path(path), "auto")[0]


def _load(path: Path, fmt: str):
    """``(format, parsed content)``: the XML root for cvat, the JSON value for coco/labelstudio, None for csv."""
    if fmt != "auto" and fmt not in POINT_FORMATS:
        raise ValueError(f"fmt must be 'auto' or one of {POINT_FORMATS}, got {fmt!r}")
    if not path.is_file():
        raise ClickFileError(f"{path}: click file not found")
    ext = path.suffix.lower()
    if fmt == "csv" or (fmt == "auto" and ext in (".csv", ".txt")):
        return "csv", None
    if fmt == "cvat" or (fmt == "auto" and ext == ".xml"):
        return "cvat", _cvat_root(path)
    if fmt in ("coco", "labelstudio") or (fmt == "auto" and ext == ".json"):
        data = _json(path)
        found = _json_kind(data)
        if fmt == "auto" and found is None:
            raise ClickFileError(f"{path}: JSON is neither COCO (an object with 'images' and 'annotations') nor a "
                                 f"Label Studio export (a list of tasks with 'data' and 'annotations'); accepted "
                                 f"formats: {_ACCEPTED}")
        if fmt != "auto" and found != fmt:
            raise ClickFileError(f"{path}: not a {fmt} file (its content looks like {found or 'neither format'})")
        return found, data
    raise ClickFileError(f"{path}: cannot tell the point format from the extension {ext or '(none)'!r}; accepted "
                         f"formats: {_ACCEPTED}")


def _json(path: Path):
    try:
        with path.open(encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ClickFileError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise ClickFileError(f"{path}: not UTF-8 text: {e}") from e


def _json_kind(data) -> str | None:
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, list) and all(isinstance(t, dict) and "data" in t and ("annotations" in t or "completions" in t)
                                      for t in data):
        return "labelstudio"
    return None


def _cvat_root(path: Path) -> ET.Element:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ClickFileError(f"{path}:{e.position[0]}: not well-formed XML: {e}") from e
    if root.tag != "annotations":
        raise ClickFileError(f"{path}: XML root is <{root.tag}>, expected <annotations> (CVAT for images 1.1); "
                             f"accepted formats: {_ACCEPTED}")
    if root.find("image") is None and root.find("track") is not None:
        raise ClickFileError(f"{path}: CVAT for video XML (tracks, no <image>); export the task as CVAT for images 1.1")
    return root


# -- reading ------------------------------------------------------------------------------------------------
def read_points(path: str | os.PathLike, fmt: str = "auto") -> pd.DataFrame:
    """One row per click of a point file (``fmt``: one of :data:`POINT_FORMATS` or ``"auto"``, see
    :func:`detect_point_format`), in file order, with :data:`POINT_COLUMNS`:

    - ``image_ref``: the image as the file names it (csv: ``image_id``; coco: ``images[].file_name``; cvat:
      ``<image name>``; labelstudio: the task's ``data.image``, URL-decoded, the ``d`` value of a local-storage URL)
    - ``class``; ``x``, ``y`` as the file gives them (csv: the field text; the others: pixel numbers, Label Studio
      percent converted with the result's ``original_width``/``original_height``), not yet validated
    - ``annotator`` (default 1), ``object_index`` (default -1)
    - ``where``: the location for messages (``line 5``, ``annotation id 17``, ``image '0001.jpg' shape 2``,
      ``task 3 result 'abc123'``)
    - ``width``, ``height``: the image size the file states (NaN when it states none)
    - ``problem``: why a row could not be read (csv: wrong field count, non-integer annotator), else None.

    A malformed file (bad header, broken JSON/XML, missing references) raises :class:`ClickFileError`.
    ``result.attrs`` holds ``format``, ``ignored`` (annotations that are not clicks, counted by reason) and
    ``multi_point_shapes`` (CVAT shapes with several points, each point read as one click).
    """
    path = Path(path)
    fmt, data = _load(path, fmt)
    ignored: Counter = Counter()
    multi = 0
    if fmt == "csv":
        rows = _read_csv(path)
    elif fmt == "coco":
        rows = _read_coco(path, data, ignored)
    elif fmt == "cvat":
        rows, multi = _read_cvat(path, data, ignored)
    else:
        rows = _read_labelstudio(path, data, ignored)
    df = pd.DataFrame(rows, columns=POINT_COLUMNS)
    df = df.astype({"annotator": int, "object_index": int, "width": float, "height": float})
    df.attrs = {"file": str(path), "format": fmt, "ignored": dict(ignored), "multi_point_shapes": multi}
    return df


def _row(ref, cls, x, y, annotator=1, object_index=-1, where="", width=None, height=None, problem=None):
    nan = float("nan")
    return (ref, cls, x, y, annotator, object_index, where,
            nan if width is None else width, nan if height is None else height, problem)


def _read_csv(path: Path) -> list:
    try:
        return _read_csv_rows(path)
    except UnicodeDecodeError as e:
        raise ClickFileError(f"{path}: not UTF-8 text: {e}") from e


def _read_csv_rows(path: Path) -> list:
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ClickFileError(f"{path}:1: empty file, expected header {CSV_HEADER_HINT}")
        header = [h.strip() for h in header]
        reason = _header_problem(header)
        if reason:
            raise ClickFileError(f"{path}:1: bad header {','.join(header)!r}: {reason}; expected {CSV_HEADER_HINT}")
        col = {h: i for i, h in enumerate(header)}
        end = reader.line_num
        for fields in reader:
            lineno, end = end + 1, reader.line_num
            if not fields or all(not s.strip() for s in fields):
                continue
            where = f"line {lineno}"
            if len(fields) != len(col):
                rows.append(_row(None, None, None, None, where=where,
                                 problem=f"wrong number of fields: {len(fields)} instead of {len(col)}"))
                continue
            get = {h: fields[i].strip() for h, i in col.items()}
            annotator, object_index, problem = 1, -1, None
            try:
                if "annotator" in get:
                    annotator = int(get["annotator"])
                if get.get("object_index", "") != "":
                    object_index = int(get["object_index"])
            except ValueError:
                problem = (f"non-numeric annotator/object_index: annotator={get.get('annotator')!r} "
                           f"object_index={get.get('object_index')!r}")
                annotator, object_index = 1, -1
            rows.append(_row(get["image_id"], get["class"], fields[col["x"]], fields[col["y"]], annotator,
                             object_index, where, problem=problem))
    return rows


def _header_problem(header: list[str]) -> str | None:
    """Why a CSV header is not acceptable (columns by name, any order), or None."""
    reasons = []
    dup = sorted(h for h, n in Counter(header).items() if n > 1)
    missing = [h for h in REQUIRED_COLUMNS if h not in header]
    unknown = [h for h in dict.fromkeys(header) if h not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if missing:
        reasons.append(f"missing column{'s' * (len(missing) > 1)} {', '.join(missing)}")
    if unknown:
        reasons.append(f"unknown column{'s' * (len(unknown) > 1)} {', '.join(repr(h) for h in unknown)}")
    if dup:
        reasons.append(f"duplicated column{'s' * (len(dup) > 1)} {', '.join(dup)}")
    return "; ".join(reasons) or None


def _int_field(value, path: Path, where: str, name: str) -> int:
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ClickFileError(f"{path}:{where}: {name} must be an integer, got {value!r}") from None


def _coco_tables(path: Path, data: dict):
    """``(images by id, category names by id, annotations)`` of a COCO file, checked for structure."""
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ClickFileError(f"{path}: COCO 'images' and 'annotations' must be lists")
    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ClickFileError(f"{path}:images[{i}]: a COCO image needs 'id' and 'file_name'")
        if im["id"] in images:
            raise ClickFileError(f"{path}:image id {im['id']}: duplicated image id")
        images[im["id"]] = im
    cats = {}
    for i, c in enumerate(data.get("categories") or []):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise ClickFileError(f"{path}:categories[{i}]: a COCO category needs 'id' and 'name'")
        cats[c["id"]] = c["name"]
    return images, cats, data["annotations"]


def _check_coco_refs(ann: dict, images: dict, cats: dict, where: str, error: type[Exception]) -> None:
    """An annotation's ``image_id`` and ``category_id`` must name an image and a category of the file."""
    if ann.get("image_id") not in images:
        raise error(f"{where}: image_id {ann.get('image_id')!r} is not among the file's images")
    if ann.get("category_id") not in cats:
        raise error(f"{where}: category_id {ann.get('category_id')!r} is not among the file's categories")


def _coco_where(ann, i: int) -> str:
    return f"annotation id {ann['id']}" if isinstance(ann, dict) and "id" in ann else f"annotations[{i}]"


def _read_coco(path: Path, data: dict, ignored: Counter) -> list:
    images, cats, anns = _coco_tables(path, data)
    rows = []
    for i, ann in enumerate(anns):
        where = _coco_where(ann, i)
        if not isinstance(ann, dict):
            raise ClickFileError(f"{path}:{where}: an annotation must be an object")
        kps, point = ann.get("keypoints"), ann.get("point")
        if kps:
            if not isinstance(kps, list) or len(kps) % 3:
                raise ClickFileError(f"{path}:{where}: 'keypoints' must be a list of x, y, v triplets")
            labelled = [(kps[k], kps[k + 1]) for k in range(0, len(kps), 3) if _positive(kps[k + 2])]
            if not labelled:
                ignored["annotation without a labelled keypoint"] += 1
                continue
            if len(labelled) > 1:
                raise ClickFileError(f"{path}:{where}: {len(labelled)} labelled keypoints (v > 0); a click annotation "
                                     f"has exactly one")
            x, y = labelled[0]
        elif point is not None:
            if not isinstance(point, list) or len(point) != 2:
                raise ClickFileError(f"{path}:{where}: 'point' must be [x, y], got {point!r}")
            x, y = point
        else:
            ignored["annotation without keypoints or point"] += 1
            continue
        _check_coco_refs(ann, images, cats, f"{path}:{where}", ClickFileError)
        im = images[ann["image_id"]]
        annotator = _int_field(ann.get("annotator", 1), path, where, "annotator")
        object_index = _int_field(ann.get("object_index", -1), path, where, "object_index")
        rows.append(_row(im["file_name"], cats[ann["category_id"]], x, y, annotator, object_index, where,
                         im.get("width"), im.get("height")))
    return rows


def _positive(v) -> bool:
    try:
        return float(v) > 0
    except (TypeError, ValueError):
        return False


def _read_cvat(path: Path, root: ET.Element, ignored: Counter) -> tuple[list, int]:
    rows, multi = [], 0
    for image in root.iter("image"):
        name = image.get("name")
        if name is None:
            raise ClickFileError(f"{path}:image id {image.get('id')}: <image> without a name")
        size = [_cvat_number(image.get(k), path, f"image {name!r}", k) if image.get(k) is not None else None
                for k in ("width", "height")]
        for s, shape in enumerate(image):
            where = f"image {name!r} shape {s}"
            if shape.tag != "points":
                ignored[f"<{shape.tag}> shape (not points)"] += 1
                continue
            label = shape.get("label")
            if not label:
                raise ClickFileError(f"{path}:{where}: <points> without a label")
            annotator = 1
            for attr in shape.findall("attribute"):
                if attr.get("name") == "annotator":
                    annotator = _int_field((attr.text or "").strip(), path, where, "annotator attribute")
            pts = [p for p in (shape.get("points") or "").split(";") if p.strip()]
            if not pts:
                raise ClickFileError(f"{path}:{where}: <points> without points")
            if len(pts) > 1:
                multi += 1
            for k, p in enumerate(pts):
                w = where if len(pts) == 1 else f"{where} point {k}"
                xy = p.split(",")
                if len(xy) != 2:
                    raise ClickFileError(f"{path}:{w}: points must be 'x,y' pairs separated by ';', got {p!r}")
                x, y = (_cvat_number(v, path, w, "coordinate") for v in xy)
                rows.append(_row(name, label, x, y, annotator, -1, w, *size))
    return rows, multi


def _cvat_number(text: str, path: Path, where: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ClickFileError(f"{path}:{where}: {what} {text!r} is not a number") from None


def _ls_image_ref(task: dict, where: str, path: Path) -> str:
    data = task.get("data")
    value = data.get("image") if isinstance(data, dict) else None
    if not isinstance(value, str) and isinstance(data, dict):
        value = next((v for v in data.values() if isinstance(v, str)), None)
    if not isinstance(value, str):
        raise ClickFileError(f"{path}:{where}: task data names no image (no 'image' key and no string value)")
    parts = urlsplit(value)
    if parts.path.rstrip("/").endswith("/data/local-files") or parts.path.rstrip("/") == "data/local-files":
        d = parse_qs(parts.query).get("d")
        if d:
            return d[0]
    return unquote(value)


def _ls_user(completed_by):
    return completed_by.get("id") if isinstance(completed_by, dict) else completed_by


def _read_labelstudio(path: Path, tasks: list, ignored: Counter) -> list:
    def task_where(t, i):
        return f"task {t['id']}" if "id" in t else f"task at position {i}"

    annotations = []  # (task position, task, annotation)
    for i, task in enumerate(tasks):
        anns = task.get("annotations") if "annotations" in task else task.get("completions")
        if not isinstance(anns, list):
            raise ClickFileError(f"{path}:{task_where(task, i)}: 'annotations' must be a list")
        for ann in anns:
            if not isinstance(ann, dict):
                raise ClickFileError(f"{path}:{task_where(task, i)}: an annotation must be an object")
            if ann.get("was_cancelled"):
                ignored["cancelled annotation"] += 1
                continue
            annotations.append((i, task, ann))
    users = {_ls_user(a.get("completed_by")) for _, _, a in annotations} - {None}
    order = sorted(users, key=lambda u: (0, u, "") if isinstance(u, (int, float)) else (1, 0, str(u)))
    annotator_of = {u: k for k, u in enumerate(order, start=1)}
    rows = []
    for i, task, ann in annotations:
        tw = task_where(task, i)
        ref = None
        for r, res in enumerate(ann.get("result") or []):
            if not isinstance(res, dict) or res.get("type") != "keypointlabels":
                ignored["result that is not keypointlabels"] += 1
                continue
            where = f"{tw} result {res['id']!r}" if "id" in res else f"{tw} result {r}"
            value = res.get("value") or {}
            labels = value.get("keypointlabels")
            if not labels or not isinstance(labels, list):
                raise ClickFileError(f"{path}:{where}: keypoint without a label (value.keypointlabels)")
            w, h = res.get("original_width"), res.get("original_height")
            if not _positive(w) or not _positive(h):
                raise ClickFileError(f"{path}:{where}: original_width/original_height missing (got {w!r}, {h!r}); "
                                     f"they are needed to turn the percent coordinates into pixels")
            try:
                x, y = float(value["x"]) / 100 * float(w), float(value["y"]) / 100 * float(h)
            except (KeyError, TypeError, ValueError):
                raise ClickFileError(f"{path}:{where}: value.x/value.y must be numbers, got "
                                     f"{value.get('x')!r}, {value.get('y')!r}") from None
            if ref is None:
                ref = _ls_image_ref(task, tw, path)
            annotator = annotator_of.get(_ls_user(ann.get("completed_by")), 1)
            rows.append(_row(ref, labels[0], x, y, annotator, -1, where, float(w), float(h)))
    return rows


# -- image names -> dataset ids -----------------------------------------------------------------------------
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_LS_UPLOAD = re.compile(r"^[0-9a-fA-F]{8}-(.+)$")


def _components(ref: str) -> list[str]:
    """The ref's path components, backslashes normalised, leading ``./`` or ``/`` dropped, extension dropped."""
    if _URL.match(ref):
        ref = urlsplit(ref).path
    ref = ref.replace("\\", "/")
    while ref.startswith("./"):
        ref = ref[2:]
    parts = [p for p in ref.strip("/").split("/") if p not in ("", ".")]
    if parts:
        parts[-1] = os.path.splitext(parts[-1])[0]
    return parts


def resolve_image_refs(refs: Iterable[str], image_ids: Iterable[str]) -> dict:
    """Map each image name of a point file to a dataset image id (a path relative to the image folder, no
    extension, '/' separators, e.g. ``a/0001`` or ``000005``), or None when nothing matches. Rules, in order:

    1. the ref is an id; 2. the ref without its extension is an id;
    3. the ref's path (backslashes normalised, leading ``./`` or ``/`` and a URL's scheme, host and query
       dropped, extension dropped) ends with the components of an id (``/data/upload/3/a/0001.jpg`` ->
       ``a/0001``); the longest such id wins; failing that, the path is the tail of an id (``0001.jpg`` ->
       ``a/0001``), which must then be the only such id;
    4. a Label Studio upload name ``1a2b3c4d-0001.jpg`` (8 hex digits and a dash) -> rules 1-3 on ``0001.jpg``.

    Two ids matching equally well (``0001.jpg`` with ids ``a/0001`` and ``b/0001``) raise
    :class:`AmbiguousImageRef` naming the ref and the candidates.
    """
    ids = set(map(str, image_ids))
    by_last = defaultdict(list)
    for i in ids:
        by_last[i.split("/")[-1]].append(i.split("/"))
    out = {}
    for ref in refs:
        s = str(ref)
        hit = _match(s, ids, by_last)
        if hit is None:
            base = s.replace("\\", "/").rstrip("/").split("/")[-1]
            m = _LS_UPLOAD.match(base)
            if m:
                try:
                    hit = _match(m.group(1), ids, by_last)
                except AmbiguousImageRef as e:
                    raise AmbiguousImageRef(ref, e.candidates) from None
        out[ref] = hit
    return out


def _match(ref: str, ids: set, by_last: dict) -> str | None:
    if ref in ids:
        return ref
    stem = os.path.splitext(ref)[0]
    if stem in ids:
        return stem
    parts = _components(ref)
    if not parts:
        return None
    tails, heads = {}, []  # ids that are a tail of the ref (by length); ids the ref is a tail of
    for cand in by_last.get(parts[-1], ()):
        if len(cand) <= len(parts) and cand == parts[-len(cand):]:
            tails[len(cand)] = "/".join(cand)
        elif len(cand) > len(parts) and cand[-len(parts):] == parts:
            heads.append("/".join(cand))
    if tails:
        return tails[max(tails)]
    if len(heads) > 1:
        raise AmbiguousImageRef(ref, heads)
    return heads[0] if heads else None


# -- COCO boxes ---------------------------------------------------------------------------------------------
def read_coco_boxes(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ground-truth boxes of a COCO JSON file.

    Returns ``(images, objects)``: ``images`` has ``image_ref`` (``file_name``), ``width``, ``height``; ``objects``
    has ``image_ref, object_index, class, x1, y1, x2, y2, difficult, truncated`` with one row per annotation
    that has a ``bbox``: ``[x, y, w, h]`` -> ``x1=x, y1=y, x2=x+w, y2=y+h`` (continuous 0-based coordinates, no
    +-1), ``difficult`` = ``iscrowd == 1``, ``truncated`` False, ``object_index`` = the annotation's position
    among its image's box annotations in file order. A missing category or image, a non-positive size or a box
    outside its image raise :class:`pipeline.voc.AnnotationError` naming the file and the annotation id.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: COCO file not found")
    try:
        data = _json(path)
        if _json_kind(data) != "coco":
            raise ClickFileError(f"{path}: not a COCO file (expected an object with 'images' and 'annotations')")
        images, cats, anns = _coco_tables(path, data)
    except ClickFileError as e:
        raise AnnotationError(str(e)) from e
    image_rows = []
    for im in images.values():
        w, h = im.get("width"), im.get("height")
        if not (_positive(w) and _positive(h)):
            raise AnnotationError(f"{path}:image id {im['id']}: width/height missing or not positive ({w!r}, {h!r})")
        image_rows.append((im["file_name"], int(w), int(h)))
    rows, count = [], Counter()
    for i, ann in enumerate(anns):
        where = _coco_where(ann, i)
        if not isinstance(ann, dict) or ann.get("bbox") is None:
            continue
        _check_coco_refs(ann, images, cats, f"{path}:{where}", AnnotationError)
        box = ann["bbox"]
        try:
            x, y, w, h = (float(v) for v in box)
        except (TypeError, ValueError):
            raise AnnotationError(f"{path}:{where}: bbox must be [x, y, width, height], got {box!r}") from None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise AnnotationError(f"{path}:{where}: bbox has non-finite values {box!r}")
        if w <= 0 or h <= 0:
            raise AnnotationError(f"{path}:{where}: box has non-positive size {w:g}x{h:g}")
        im = images[ann["image_id"]]
        iw, ih = float(im["width"]), float(im["height"])
        eps = 1e-6
        if x < -eps or y < -eps or x + w > iw + eps or y + h > ih + eps:
            raise AnnotationError(f"{path}:{where}: box ({x:g}, {y:g}, {x + w:g}, {y + h:g}) lies outside the "
                                  f"{iw:g}x{ih:g} image {im['file_name']!r}")
        ref = im["file_name"]
        rows.append((ref, count[ref], cats[ann["category_id"]], x, y, x + w, y + h, ann.get("iscrowd", 0) == 1, False))
        count[ref] += 1
    images_df = pd.DataFrame(image_rows, columns=["image_ref", "width", "height"])
    objects = pd.DataFrame(rows, columns=["image_ref", "object_index", "class", "x1", "y1", "x2", "y2",
                                          "difficult", "truncated"])
    objects = objects.astype({"object_index": int, "x1": float, "y1": float, "x2": float, "y2": float,
                              "difficult": bool, "truncated": bool})
    return images_df, objects


