"""Reading images and label maps with errors that name the file."""

from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageReadError", "check_dir", "check_file", "read_image", "read_label_ids",
           "read_label_ids_16bit", "write_png_uint16", "write_marker", "read_marker"]


class ImageReadError(OSError):
    """An image or label file exists but cannot be decoded."""


def check_dir(path: str, what: str = "directory") -> str:
    """Return ``path`` or raise FileNotFoundError naming it (and what it should be)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def check_file(path: str, what: str = "file") -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def write_marker(path: str, info: dict) -> None:
    """Record that a job producing files finished: ``info`` (what it was made from) as JSON."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=1, sort_keys=True)


def read_marker(path: str) -> Optional[dict]:
    """What :func:`write_marker` recorded at ``path``; None when there is no marker (not finished)."""
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def _open(path: str, what: str) -> Image.Image:
    check_file(path, what)
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read {what} {path}: {err}") from err
    return img


def read_image(path: str) -> Image.Image:
    """The RGB image at ``path`` (PIL, mode "RGB")."""
    return _open(path, "image").convert("RGB")


def read_label_ids(path: str) -> np.ndarray:
    """(H, W) integer array of the label IDs stored in an 8-bit (L or P) or 16-bit (I;16) PNG.

    For palette ("P") images, the palette index is the label ID (GTA5 stores its labels so).
    """
    img = _open(path, "label")
    if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        return np.asarray(img)
    if img.mode in ("RGB", "RGBA", "LA"):  # a colour label file: take the first channel
        return np.asarray(img)[..., 0]
    raise ImageReadError(f"cannot read label {path}: unsupported image mode {img.mode!r}")


def read_label_ids_16bit(path: str, channel: int = 0) -> np.ndarray:
    """(H, W) int32 array of one channel of a (possibly 16-bit, multi-channel) PNG.

    Pillow truncates 16-bit RGB PNGs to their high bytes (SYNTHIA's class IDs would all read 0),
    so this decodes with torchvision, which keeps all 16 bits, or with OpenCV when torchvision
    cannot (SYNTHIA's GT/LABELS: class ID in channel 0, instance ID in channel 1).
    """
    check_file(path, "label")
    try:
        planes = _decode_png_torchvision(path)
    except (ImportError, AttributeError):  # torchvision without image decoding
        planes = _decode_png_cv2(path)
    if channel >= planes.shape[0]:
        raise ImageReadError(f"cannot read label {path}: it has {planes.shape[0]} channel(s), "
                             f"channel {channel} was asked for")
    return planes[channel].astype(np.int32)


def _decode_png_torchvision(path: str) -> np.ndarray:
    import warnings

    import torch
    from torchvision.io import ImageReadMode, decode_png, read_file

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_png(read_file(path), mode=ImageReadMode.UNCHANGED)
    except RuntimeError as err:
        raise ImageReadError(f"cannot read label {path}: {err}") from err
    return decoded.to(torch.int32).numpy()


def _decode_png_cv2(path: str) -> np.ndarray:
    try:
        import cv2
    except ImportError as err:
        raise ImportError("reading 16-bit label PNGs needs torchvision's image decoding or "
                          "OpenCV (pip install opencv-python-headless)") from err
    arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(f"cannot read label {path}")
    if arr.ndim == 2:
        return arr[None]
    return np.ascontiguousarray(arr[..., [2, 1, 0] + list(range(3, arr.shape[2]))].transpose(2, 0, 1))


def write_png_uint16(path: str, array: np.ndarray) -> None:
    """Write an (H, W) or (H, W, 3) uint16 array as a 16-bit grey or RGB PNG (no dependencies)."""
    arr = np.asarray(array)
    if arr.dtype != np.uint16 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"expected a uint16 (H, W) or (H, W, 3) array, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    color_type = 0 if arr.ndim == 2 else 2
    rows = arr.astype(">u2").reshape(h, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
