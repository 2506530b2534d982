"""Image reading integrity: EXIF orientation (pixels in the stored frame, counted in the manifest report) and
decoding (a truncated JPEG with an end marker appended, formats sniffed from the file's bytes). Task-level cases
are in test_bad_input.py; VOC XML and split-list values in test_voc.py."""
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.imageio import ImageReadError, exif_orientation, read_image


def pattern(h: int, w: int) -> np.ndarray:
    """An RGB image whose rotations differ a lot from it: four flat quadrants of different colours."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (230, 30, 30)
    img[: h // 2, w // 2:] = (30, 230, 30)
    img[h // 2:, : w // 2] = (30, 30, 230)
    img[h // 2:, w // 2:] = (230, 230, 30)
    return img


def save_jpeg(path: Path, rgb: np.ndarray, orientation: int | None = None, **kw) -> Path:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, "JPEG", quality=95, exif=exif.tobytes(), **kw)
    return path


# -- EXIF orientation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(48, 80), (64, 64)])
def test_exif_rotated_jpeg_is_read_in_its_stored_frame(tmp_path, h, w):
    stored = pattern(h, w)
    p = save_jpeg(tmp_path / "rot.jpg", stored, orientation=6)  # 6: "rotate 90 degrees clockwise to display"
    assert exif_orientation(p) == 6
    for verify in (False, True):
        img = read_image(p, verify=verify)
        assert img.shape == (h, w, 3)
        assert np.abs(img.astype(int) - stored).mean() < 3  # the stored pixels (JPEG-compressed)
        if h == w:  # not the displayed (rotated) ones
            assert np.abs(img.astype(int) - np.rot90(stored, -1)).mean() > 50
    assert read_image(p, bgr=True).shape == (h, w, 3)


def test_exif_orientation_absent_is_1(tmp_path):
    assert exif_orientation(save_jpeg(tmp_path / "plain.jpg", pattern(16, 24))) == 1
    assert exif_orientation(save_jpeg(tmp_path / "one.jpg", pattern(16, 24), orientation=1)) == 1
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), pattern(16, 24))
    assert exif_orientation(png) == 1
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert exif_orientation(tmp_path / "junk.jpg") == 1


def test_manifest_counts_exif_rotated_images_and_uses_stored_pixels(voc, caplog):
    from pipeline.dataset import build_manifest

    img_path = voc / "VOC2007" / "JPEGImages" / "000002.jpg"
    stored = read_image(img_path)
    save_jpeg(img_path, stored, orientation=6)
    with caplog.at_level(logging.WARNING):
        man = build_manifest(voc / "VOC2007", voc / "clicks_trainval.csv")
    rep = man.report["exif_rotated"]
    assert rep["count"] == 1 and len(rep["examples"]) == 1
    assert rep["examples"][0].endswith("000002.jpg: EXIF orientation 6"), rep
    assert "000002" in set(man.images.image_id)
    assert any("EXIF orientation" in r.getMessage() and "stored pixels are used" in r.getMessage()
               for r in caplog.records)
    assert np.abs(read_image(img_path).astype(int) - stored).mean() < 3


def test_manifest_without_rotated_images_reports_zero(voc):
    from pipeline.dataset import build_manifest

    man = build_manifest(voc / "VOC2007", voc / "clicks_trainval.csv")
    assert man.report["exif_rotated"] == {"count": 0, "examples": []}


# -- decoding --------------------------------------------------------------------------------------------------
def photo(h: int = 120, w: int = 160) -> np.ndarray:
    rng = np.random.default_rng(0)
    return cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (9, 9), 3)


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_with_an_end_marker_appended_is_rejected_by_the_check(tmp_path, progressive, capfd):
    params = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    data = cv2.imencode(".jpg", photo(), params)[1].tobytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    with pytest.raises(ImageReadError) as e:
        read_image(p, verify=True)
    msg = str(e.value)
    assert msg.startswith(f"{p}: corrupt JPEG: the decoder reports 'Corrupt JPEG data: premature end of data segment'")
    assert "truncated or damaged" in msg
    assert "Corrupt JPEG data" not in capfd.readouterr().err  # the warning went into the error, not to stderr
    os.write(2, b"stderr restored\n")
    assert capfd.readouterr().err == "stderr restored\n"
    # the fast path (crop reads, after the check) decodes it, grey where data is missing
    assert read_image(p).shape == (120, 160, 3)


def test_png_named_jpg_is_accepted(tmp_path):
    img = photo()
    p = tmp_path / "000001.jpg"
    p.write_bytes(cv2.imencode(".png", img)[1].tobytes())
    for verify in (False, True):
        assert np.array_equal(read_image(p, bgr=True, verify=verify), img)


@pytest.mark.parametrize("name, expected", [
    ("cut.png", "truncated PNG (no IEND chunk)"),
    ("cut.jpg", "truncated PNG file named .jpg (no IEND chunk)"),
])
def test_truncated_png_is_named_a_png(tmp_path, name, expected):
    data = cv2.imencode(".png", photo())[1].tobytes()
    p = tmp_path / name
    p.write_bytes(data[: len(data) // 2])
    for verify in (False, True):
        with pytest.raises(ImageReadError) as e:
            read_image(p, verify=verify)
        assert str(e.value).startswith(f"{p}: {expected}"), str(e.value)


def test_jpeg_errors_name_the_problem(tmp_path):
    data = cv2.imencode(".jpg", photo())[1].tobytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"<html>not found</html>")
    for verify in (False, True):
        with pytest.raises(ImageReadError, match=rf"^{cut}: truncated JPEG \(no end-of-image marker\)"):
            read_image(cut, verify=verify)
        with pytest.raises(ImageReadError) as e:
            read_image(junk, verify=verify)
        assert str(e.value) == f"{junk}: not a decodable image (unknown format; the file starts with b'<html>no')"


def test_bytes_after_the_end_of_image_marker_are_accepted(tmp_path):
    """A camera may append data after the image (the end-of-image marker is then not the file's last bytes)."""
    img = photo()
    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    p = tmp_path / "tail.jpg"
    p.write_bytes(data + b"\x00" * 16 + b"appended data " * 20)
    for verify in (False, True):
        assert np.array_equal(read_image(p, bgr=True, verify=verify), cv2.imdecode(np.frombuffer(data, np.uint8), 1))
