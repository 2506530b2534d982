"""Image reading with errors that name the file."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np


class ImageReadError(RuntimeError):
    """An image file is missing, unreadable, or corrupt."""


def read_image(path: str | os.PathLike, bgr: bool = False) -> np.ndarray:
    """Read an image as an ``HxWx3`` uint8 array (RGB unless ``bgr``).

    Raises :class:`ImageReadError` naming the file when it is missing, empty, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{path}: image file is empty")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError(f"{path}: not a decodable image (corrupt or unsupported format)")
    if path.suffix.lower() in (".jpg", ".jpeg") and not _jpeg_complete(data):
        raise ImageReadError(f"{path}: truncated JPEG (no end-of-image marker)")
    return img if bgr else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _jpeg_complete(data: np.ndarray) -> bool:
    tail = data[-64:].tobytes().rstrip(b"\x00\r\n ")
    return tail.endswith(b"\xff\xd9")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file."""
    h, w = read_image(path, bgr=True).shape[:2]
    return w, h
