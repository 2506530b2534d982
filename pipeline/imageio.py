"""Image reading with errors that name the file.

Every reader of image pixels goes through :func:`read_image`. Pixels are returned in the *stored* frame: a JPEG's
EXIF orientation tag is not applied (``cv2.IMREAD_IGNORE_ORIENTATION``), because VOC annotations, clicks and the
devkit all use the stored pixel frame. :func:`exif_orientation` reads the tag so a dataset check can count such
images.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import cv2
import numpy as np

#: decode flags of every image read: 3-channel colour, EXIF orientation not applied
IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION

#: file signatures (magic bytes) -> format name used in messages
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_SUFFIX_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".tif": "TIFF",
                  ".tiff": "TIFF", ".webp": "WEBP"}

#: libjpeg warnings after which the decoder has invented pixels (it fills what it could not read with grey):
#: "Corrupt JPEG data: premature end of data segment", "... bad Huffman code", "... found marker 0x.. instead of
#: RSTn", "Premature end of JPEG file", "Inconsistent progression sequence ...". Other decoder output (e.g.
#: libjpeg's "extraneous bytes before marker", libpng's iCCP warnings) is passed on to stderr unchanged.
_JPEG_CORRUPT = re.compile(r"(Corrupt JPEG data: (premature end of data segment|bad Huffman code|bad arithmetic code|"
                           r"found marker 0x[0-9a-f]+ instead of RST\d)|Premature end of JPEG file|"
                           r"Inconsistent progression sequence[^\n]*)", re.IGNORECASE)

_stderr_lock = threading.Lock()


class ImageReadError(RuntimeError):
    """An image file is missing, unreadable, or corrupt."""


def sniff_format(data: bytes | np.ndarray) -> str | None:
    """Format of encoded image bytes from their signature ("JPEG", "PNG", ...), None when unknown."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def read_image(path: str | os.PathLike, bgr: bool = False, verify: bool = False) -> np.ndarray:
    """Read an image as an ``HxWx3`` uint8 array (RGB unless ``bgr``), in its stored pixel frame (a JPEG's EXIF
    orientation is not applied).

    Raises :class:`ImageReadError` naming the file when it is missing, empty, not an image, or cannot be decoded;
    the message names the real format (sniffed from the file's first bytes, whatever its suffix).

    ``verify=False`` (the fast path, used for every crop and batch read) rejects what the decoder refuses and a
    JPEG without an end-of-image marker after its last scan. A JPEG cut short and then given an end-of-image
    marker still decodes, the missing part filled with grey: ``verify=True`` (the dataset check of
    :func:`pipeline.dataset.build_manifest`) also listens to the decoder's own warnings and rejects such a file.
    It redirects file descriptor 2 for the duration of the decode (serialised by a lock, so threads do not decode
    in parallel through it; decoder output that is not a JPEG corruption warning is written back to stderr).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{path}: image file is empty")
    fmt = sniff_format(data)
    if verify:
        img, messages = _decode_capturing_stderr(data)
    else:
        img, messages = cv2.imdecode(data, IMREAD_FLAGS), ""
    if img is None:
        raise ImageReadError(_undecodable(path, fmt, data, messages))
    if fmt == "JPEG" and not _jpeg_complete(data):
        raise ImageReadError(f"{path}: truncated JPEG{_named(path, fmt)} (no end-of-image marker)")
    corrupt = _JPEG_CORRUPT.search(messages) if fmt == "JPEG" and messages else None
    if corrupt:
        raise ImageReadError(f"{path}: corrupt JPEG{_named(path, fmt)}: the decoder reports {corrupt.group(0)!r} "
                             f"(a truncated or damaged file: the decoder fills what it cannot read with grey)")
    return img if bgr else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _named(path: Path, fmt: str | None) -> str:
    """`` file named .jpg`` when the suffix says another format than the content."""
    said = _SUFFIX_FORMAT.get(path.suffix.lower())
    return f" file named {path.suffix}" if fmt and said and said != fmt else ""


def _undecodable(path: Path, fmt: str | None, data: np.ndarray, messages: str) -> str:
    detail = " ".join(line.strip() for line in messages.splitlines() if line.strip())
    detail = f": the decoder reports {detail!r}" if detail else ""
    if fmt is None:
        return f"{path}: not a decodable image (unknown format; the file starts with {bytes(data[:8])!r})"
    if fmt == "JPEG" and not _jpeg_complete(data):
        return f"{path}: truncated JPEG{_named(path, fmt)} (no end-of-image marker){detail}"
    if fmt == "PNG" and not _png_complete(data):
        return f"{path}: truncated PNG{_named(path, fmt)} (no IEND chunk){detail}"
    return f"{path}: corrupt {fmt}{_named(path, fmt)}: the decoder cannot read it{detail}"


def _jpeg_complete(data: np.ndarray) -> bool:
    """An end-of-image marker follows the last start-of-scan marker (bytes after it, e.g. a camera's appended
    data, are allowed; inside a scan 0xFF is never followed by 0xD9)."""
    raw = data.tobytes()
    sos = raw.rfind(b"\xff\xda")
    return sos >= 0 and raw.find(b"\xff\xd9", sos) >= 0


def _png_complete(data: np.ndarray) -> bool:
    return b"IEND" in data[-64:].tobytes()


def _decode_capturing_stderr(data: np.ndarray) -> tuple[np.ndarray | None, str]:
    """``cv2.imdecode`` and what the codec libraries print on file descriptor 2 during the call. Lines that are
    not a JPEG corruption warning are written back to stderr."""
    with _stderr_lock:
        try:
            capture = os.memfd_create("clickscale-imdecode")
        except (AttributeError, OSError):  # no memfd (not Linux): a temporary file
            import tempfile

            with tempfile.TemporaryFile() as f:
                capture = os.dup(f.fileno())
        try:
            saved = os.dup(2)
            try:
                os.dup2(capture, 2)
                img = cv2.imdecode(data, IMREAD_FLAGS)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            os.lseek(capture, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(capture, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(capture)
    text = b"".join(chunks).decode("utf-8", errors="replace")
    other = [line for line in text.splitlines(keepends=True) if line.strip() and not _JPEG_CORRUPT.search(line)]
    if other and img is not None:  # not ours to swallow (a failed decode's messages go into the error)
        os.write(2, "".join(other).encode())
    return img, text


def exif_orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation tag (0x0112, 1..8) of an image file, 1 when absent or unreadable. Reads the header
    only (PIL opens lazily)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - not an image PIL knows, broken EXIF: no orientation to report
        return 1
    try:
        value = int(value)
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file in its stored frame, from its header (no decoding)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot read the image size ({e})") from None
