"""Bad input at the luigi-task level: each case fails the stage with a message naming the file (and line/object)
and the problem, or takes a documented fallback that the stage report counts; upstream results are never lost
and nothing incomplete is published. Library-level checks of the same readers are in test_voc.py,
test_clicks.py, test_dataset.py, test_selection.py, test_boxes.py and test_classifier.py."""
import errno
from pathlib import Path

import luigi
import numpy as np
import pandas as pd
import pytest

import harness as H

from pipeline.io import read_json


def build(task) -> tuple[bool, str]:
    """Run ``task`` in-process with the local scheduler; (succeeded, the failure's message as luigi logs it)."""
    errors: list[str] = []

    def on_failure(t, exc):
        errors.append(f"{type(exc).__name__}: {exc}")

    luigi.Task.event_handler(luigi.Event.FAILURE)(on_failure)
    try:
        res = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="CRITICAL")
    finally:
        luigi.Task._event_callbacks[luigi.Task][luigi.Event.FAILURE].discard(on_failure)
    ok = res.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY")
    return ok, "\n".join(errors)


def prepare(voc: Path, **kw):
    from tasks.dataset import PrepareDataset

    return PrepareDataset(voc_root=str(voc / "VOC2007"), clicks=str(voc / "clicks_trainval.csv"), **kw)


def failed_cleanly(task, outputs: Path):
    """Nothing published for the failed stage, no temporary file left in any published directory."""
    assert not task.stage_dir.exists()
    assert H.incomplete_outputs(outputs) == []


def bad_image_fails_then_is_skipped(voc: Path, outputs: Path, message: str, example: str) -> dict:
    """PrepareDataset fails with ``message`` (its start) and publishes nothing; with ``--on-bad-image skip`` it
    succeeds and counts one bad image whose example contains ``example``. Returns the manifest report."""
    task = prepare(voc)
    ok, msg = build(task)
    assert not ok and msg.startswith(message), msg
    failed_cleanly(task, outputs)
    skip = prepare(voc, on_bad_image="skip", on_bad_click="skip")
    ok, msg = build(skip)
    assert ok, msg
    report = read_json(skip.stage_dir / "manifest.json")["report"]
    assert report["bad_images"]["count"] == 1 and example in report["bad_images"]["examples"][0]
    return report


# -- images and annotations (PrepareDataset) ----------------------------------------------------------------
def test_missing_image_is_an_error_or_a_counted_skip(voc, outputs):
    img = voc / "VOC2007" / "JPEGImages" / "000002.jpg"
    img.unlink()
    report = bad_image_fails_then_is_skipped(voc, outputs, f"ImageReadError: {img}: image file not found",
                                             "000002.jpg: image file not found")
    images = pd.read_csv(prepare(voc, on_bad_image="skip", on_bad_click="skip").stage_dir / "images.csv",
                         dtype={"image_id": str})
    assert "000002" not in set(images.image_id) and len(images) == 4
    # its clicks now name an image that is not in the dataset: skipped and counted too
    assert report["clicks"]["skipped_by_reason"] == {"unknown image": report["clicks"]["skipped"]}
    assert report["clicks"]["skipped"] > 0


def test_truncated_jpeg(voc, outputs):
    img = voc / "VOC2007" / "JPEGImages" / "000003.jpg"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    task = prepare(voc)
    ok, msg = build(task)
    assert not ok
    assert msg.startswith(f"ImageReadError: {img}: ") and ("truncated JPEG" in msg or "not a decodable" in msg)
    failed_cleanly(task, outputs)


def test_truncated_jpeg_with_an_end_marker_appended(voc, outputs):
    """Cut short, then given an end-of-image marker: it decodes (grey where data is missing) but the decoder warns;
    the dataset check rejects it (or skips and counts it)."""
    img = voc / "VOC2007" / "JPEGImages" / "000003.jpg"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    bad_image_fails_then_is_skipped(voc, outputs, f"ImageReadError: {img}: corrupt JPEG: the decoder reports "
                                    "'Corrupt JPEG data: premature end of data segment'", "000003.jpg: corrupt JPEG")


def test_split_list_id_with_a_space(voc, outputs):
    split = voc / "VOC2007" / "ImageSets" / "Main" / "trainval.txt"
    lines = split.read_text().splitlines()
    lines[1] = f"{lines[1]} copy"
    split.write_text("\n".join(lines) + "\n")
    task = prepare(voc)
    ok, msg = build(task)
    assert not ok and msg == (f"AnnotationError: {split}:2: {lines[1]!r} is not an image id optionally followed by "
                              f"a flag -1, 0 or 1 (image ids cannot contain spaces)"), msg
    failed_cleanly(task, outputs)


def test_malformed_and_missing_annotation_xml(voc, outputs):
    xml = voc / "VOC2007" / "Annotations" / "000001.xml"
    xml.write_text(xml.read_text()[:200])
    ok, msg = build(prepare(voc))
    assert not ok and msg.startswith(f"AnnotationError: {xml}: ") and "XML" in msg
    xml.unlink()
    ok, msg = build(prepare(voc))
    assert not ok and msg.startswith("AnnotationError: ") and str(xml) in msg


@pytest.mark.parametrize("edit, problem", [
    (("<xmax>", "<xmax>-"), "degenerate box"),                       # xmax < xmin
    (("<ymax>", "<ymax>9"), "lies outside the"),                    # ymax 9xx > image height
])
def test_bad_boxes_name_the_object(voc, outputs, edit, problem):
    xml = voc / "VOC2007" / "Annotations" / "000001.xml"
    xml.write_text(xml.read_text().replace(*edit, 1))
    ok, msg = build(prepare(voc))
    assert not ok and msg.startswith(f"AnnotationError: {xml}: object 0") and problem in msg, msg


def test_unknown_object_class_of_the_embedded_dataset(voc, outputs):
    """The embedded dataset's class list is fixed: an object of another class is an error naming it."""
    from pipeline.synthetic import SYNTH_CLASSES
    from pipeline.voc import load_voc

    xml = voc / "VOC2007" / "Annotations" / "000001.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>dino", 1))
    with pytest.raises(ValueError, match=rf"{xml}: object 0 .*has unknown class 'dino"):
        load_voc(voc / "VOC2007", ("trainval", "test"), SYNTH_CLASSES)


# -- clicks (PrepareDataset) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("row, problem", [
    ("{id},{cls},500,5", "click outside the image: (500, 5) not in the 96x"),
    ("{id},dino,5,5", "unknown class: 'dino' (image {id})"),
    ("{id},{cls},five,5", "non-numeric coordinates: x='five' y='5'"),
    ("{id},{cls},nan,5", "non-numeric coordinates: x=nan y=5.0"),
])
def test_bad_click_rows_name_file_line_problem_or_are_counted(voc, outputs, row, problem):
    clicks = voc / "clicks_trainval.csv"
    lines = clicks.read_text().splitlines()
    image_id, cls = lines[1].split(",")[:2]
    row, problem = row.format(id=image_id, cls=cls), problem.format(id=image_id)
    lines.insert(3, row + ",1,-1")
    clicks.write_text("\n".join(lines) + "\n")
    task = prepare(voc)
    ok, msg = build(task)
    assert not ok and msg.startswith(f"ClickFileError: {clicks}:4: {problem}"), msg
    failed_cleanly(task, outputs)
    skip = prepare(voc, on_bad_click="skip")
    ok, msg = build(skip)
    assert ok, msg
    rep = read_json(skip.stage_dir / "manifest.json")["report"]["clicks"]
    assert rep["skipped"] == 1 and rep["kept"] == len(lines) - 2 and rep["examples"][0].startswith(f"{clicks}:4: ")


def test_click_file_with_a_wrong_header(voc, outputs):
    clicks = voc / "clicks_trainval.csv"
    clicks.write_text(clicks.read_text().replace("image_id,class,x,y", "image,cls,x,y", 1))
    ok, msg = build(prepare(voc, on_bad_click="skip"))  # a bad header is an error under either policy
    assert not ok and msg.startswith(f"ClickFileError: {clicks}:1: bad header 'image,cls,x,y")


def test_image_without_clicks_is_counted_and_the_chain_goes_on(voc, outputs):
    from tasks.proposals import SelectProposals

    clicks = voc / "clicks_trainval.csv"
    df = pd.read_csv(clicks, dtype={"image_id": str})
    df[df.image_id != "000002"].to_csv(clicks, index=False)
    task = SelectProposals(voc_root=str(voc / "VOC2007"), clicks=str(clicks), ss_splits=["trainval"], ss_shards=1)
    ok, msg = build(task)
    assert ok, msg
    man = read_json(task.find_upstream("PrepareDataset").stage_dir / "manifest.json")["report"]["clicks"]
    assert man["images_without_clicks"] == 1
    sel = pd.read_parquet(task.stage_dir / "selected.parquet")
    assert "000002" not in set(sel.image_id.astype(str)) and sel.image_id.nunique() == 3


# -- CAMs and training ----------------------------------------------------------------------------------------
def test_all_zero_and_nan_cams_take_the_counted_fallback():
    from pipeline.boxes import pseudo_boxes_from_cams

    fallback = pd.DataFrame({"click_id": [0, 1, 2], "x1": [10.0, 20, 5], "y1": [10.0, 20, 5],
                             "x2": [40.0, 50, 30], "y2": [30.0, 45, 30]}).set_index("click_id", drop=False)
    good = np.zeros((64, 64), np.float32)
    good[20:40, 10:30] = 1.0
    nan = np.full((64, 64), np.nan, np.float32)
    meta = [{"image_id": "a", "class": "star", "x": 20.0, "y": 30.0}] * 3
    items = [(0, good, meta[0]), (1, np.zeros((64, 64), np.float32), meta[1]), (2, nan, meta[2])]
    boxes = pseudo_boxes_from_cams(items, fallback, {"a": 1}).set_index("click_id")
    assert list(boxes.status) == ["ok", "empty", "nonfinite"]
    assert list(boxes.fallback) == [False, True, True]
    assert boxes.loc[1, ["x1", "y1", "x2", "y2"]].tolist() == [20, 20, 50, 45]
    assert boxes.loc[2, ["x1", "y1", "x2", "y2"]].tolist() == [5, 5, 30, 30]
    assert boxes.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [10, 20, 30, 40]


def tiny_classifier(voc: Path, **kw):
    from tasks.classifier import TrainClassifier

    return TrainClassifier(voc_root=str(voc / "VOC2007"), clicks=str(voc / "clicks_trainval.csv"),
                           ss_splits=["trainval"], ss_shards=1, classifier_weights="random", classifier_input_px=32,
                           classifier_batch_size=16, device="cpu", **kw)


@pytest.mark.slow
def test_nan_loss_stops_the_stage_and_keeps_upstream_and_the_checkpoint(voc, outputs):
    task = tiny_classifier(voc, classifier_epochs=2, classifier_lr=1e30)
    ok, msg = build(task)
    assert not ok, msg
    assert msg.startswith("NonFiniteLossError: training stopped at a non-finite classifier loss (loss is nan"), msg
    assert "Lower the learning rate" in msg and str(task.work_dir) in msg
    failed_cleanly(task, outputs)
    assert task.find_upstream("SelectProposals").stage_dir.is_dir()  # the earlier stages' results are kept
    assert (task.work_dir / "params.json").is_file()


def test_disk_full_while_writing_fails_cleanly_and_reruns(voc, outputs, monkeypatch):
    import tasks.proposals as tp

    task = tp.SelectProposals(voc_root=str(voc / "VOC2007"), clicks=str(voc / "clicks_trainval.csv"),
                              ss_splits=["trainval"], ss_shards=1)
    real = tp.write_json

    def full(path, obj):  # the disk fills up while report.json (after selected.parquet) is written
        if "SelectProposals" not in str(path):
            return real(path, obj)
        with open(Path(path).with_name(".report.partial.tmp"), "w") as f:
            f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(tp, "write_json", full)
    ok, msg = build(task)
    assert not ok and msg == f"OSError: [Errno 28] No space left on device: '{task.work_dir / 'report.json'}'"
    failed_cleanly(task, outputs)
    assert task.requires()["proposals"].stage_dir.is_dir()  # SelectiveSearch kept
    monkeypatch.setattr(tp, "write_json", real)
    ok, msg = build(task)  # space again: the rerun completes from the kept work directory
    assert ok, msg
    assert sorted(p.name for p in task.stage_dir.iterdir()) == ["params.json", "report.json", "selected.parquet"]
    assert H.incomplete_outputs(outputs) == []
