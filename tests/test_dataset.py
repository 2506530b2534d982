import luigi
import pandas as pd
import pytest

from pipeline.dataset import Manifest, build_manifest
from pipeline.imageio import ImageReadError
from tasks import PrepareDataset

import harness as H


def _small_voc_copy(sample_root, tmp_path, n=5):
    """A 5-image VOC root copied from the real sample (for tests that damage files), with an empty test list."""
    return H.voc_sample_copy(sample_root, tmp_path, n, empty_test_list=True)


def test_prepare_dataset_on_real_sample(sample_root, outputs):
    task = PrepareDataset(voc_root=str(sample_root / "VOC2007"), clicks=str(sample_root / "clicks_trainval.csv"))
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    m = Manifest.load(task.stage_dir)
    assert (m.images.split == "trainval").sum() == 750 and (m.images.split == "test").sum() == 18
    raw = pd.read_csv(sample_root / "clicks_trainval.csv", dtype={"image_id": str})
    assert len(m.clicks) == (raw.annotator == 1).sum()
    assert (m.clicks.annotator == 1).all() and list(m.clicks.click_id) == list(range(len(m.clicks)))
    assert len(m.classes) == 20 and m.report["bad_images"]["count"] == 0
    summary = pd.read_csv(task.stage_dir / "summary.csv")
    assert summary[summary.split == "trainval"].objects.sum() == \
        len(m.objects[m.objects.image_id.isin(m.split("trainval").image_id)])


def test_corrupt_and_missing_images(sample_root, tmp_path):
    root, ids = _small_voc_copy(sample_root, tmp_path)
    jpg = root / "JPEGImages" / f"{ids[1]}.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])  # truncated JPEG
    (root / "JPEGImages" / f"{ids[3]}.jpg").unlink()                  # missing image
    with pytest.raises(ImageReadError) as e:
        build_manifest(root, None, splits=("trainval",))
    assert f"{ids[1]}.jpg" in str(e.value)
    m = build_manifest(root, None, splits=("trainval",), on_bad_image="skip")
    assert m.report["bad_images"]["count"] == 2
    assert sorted(m.images.image_id) == sorted(set(ids) - {ids[1], ids[3]})
    assert set(m.clicks.image_id) <= set(m.images.image_id)


def test_simulated_clicks_when_no_file(sample_root, tmp_path):
    root, ids = _small_voc_copy(sample_root, tmp_path)
    m1 = build_manifest(root, None, splits=("trainval",), seed=5)
    m2 = build_manifest(root, None, splits=("trainval",), seed=5)
    assert m1.report["clicks"]["source"] == "simulated" and len(m1.clicks) == len(m1.objects)
    pd.testing.assert_frame_equal(m1.clicks, m2.clicks)
