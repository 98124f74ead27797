"""Per-frame normal maps (``normals/``): unit normals in each camera's frame, OpenCV axes (x right, y down, z
forward; a surface facing the camera has z < 0), at the original image resolution.

Stored as 8-bit RGB PNG, ``rgb = round((n + 1) / 2 · 255)`` (the usual normal-map encoding), with (0, 0, 0) = no
normal (pixels the network did not see, e.g. rows removed by the crop; no unit vector encodes to it). Read back with
``read_normals_png`` (unit vectors to about 0.5 %, zeros where there is none).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from ns_extreme.io.atomic import atomic_write_bytes

__all__ = ["write_normals_png", "read_normals_png"]


def write_normals_png(path: str | os.PathLike[str], normals: np.ndarray) -> None:
    """Write normals [H, W, 3] (unit vectors; all-zero or non-finite = none) as an 8-bit RGB PNG, atomically."""
    n = np.asarray(normals, dtype=np.float64)
    if n.ndim != 3 or n.shape[-1] != 3:
        raise ValueError(f"normals must be [H, W, 3], got {n.shape}")
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    ok = np.isfinite(length) & (length > 0)
    unit = np.where(ok, n / np.where(ok, length, 1.0), 0.0)
    rgb = np.clip(np.round((unit + 1.0) * 127.5), 0, 255).astype(np.uint8)
    rgb[~ok[..., 0]] = 0
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def read_normals_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Normals [H, W, 3] float32 (unit, camera frame; zeros where there is none) from ``write_normals_png``."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB")).astype(np.float32)
    n = rgb / np.float32(127.5) - np.float32(1.0)
    none = (rgb == 0).all(axis=-1)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), np.float32(1e-6))
    n[none] = 0.0
    return n
