"""Per-frame depth maps in the two forms nerfstudio reads (`depth_file_path`).

* 16-bit PNG in millimetres of the dataset's unit (0 = invalid). nerfstudio multiplies by its
  `depth_unit_scale_factor` (default 1e-3) and by the dataparser scale, so these read back in
  dataset units. Range 1 mm .. 65.535 units; larger depths are clipped to 65535.
* float32 `.npy` in dataset units (nerfstudio applies the same 1e-3 factor to `.npy` files too,
  so a dataset using `.npy` depth must be trained with `--depth-unit-scale-factor 1`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ns_extreme.io.atomic import atomic_write_bytes

__all__ = ["write_depth_png_mm", "read_depth_png_mm", "write_depth_npy", "read_depth_npy"]

PNG_MM_MAX = 65535


def _check_depth(depth: np.ndarray) -> np.ndarray:
    depth = np.asarray(depth)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H,W] (or [H,W,1]), got {depth.shape}")
    if not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(f"depth must be floating point in dataset units, got {depth.dtype}")
    return depth


def depth_to_mm_uint16(depth_m: np.ndarray) -> tuple[np.ndarray, int]:
    """Depth in dataset units -> (uint16 millimetres, number of clipped pixels).

    Non-finite or non-positive depths become 0 (invalid); positive depths below 0.5 mm become 1 mm.
    """
    depth = _check_depth(depth_m).astype(np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    mm = np.zeros(depth.shape, dtype=np.float64)
    mm[valid] = np.rint(depth[valid] * 1000.0)
    n_clipped = int(np.count_nonzero(mm > PNG_MM_MAX))
    mm[valid] = np.clip(mm[valid], 1, PNG_MM_MAX)
    return mm.astype(np.uint16), n_clipped


def write_depth_png_mm(path: str | os.PathLike[str], depth_m: np.ndarray) -> int:
    """Write depth (dataset units, [H,W]) as a 16-bit millimetre PNG; returns the clipped-pixel count."""
    mm, n_clipped = depth_to_mm_uint16(depth_m)
    buf = io.BytesIO()
    Image.fromarray(mm).save(buf, format="PNG")  # uint16 -> mode "I;16", a 16-bit grey PNG
    atomic_write_bytes(path, buf.getvalue())
    return n_clipped


def read_depth_png_mm(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a 16-bit millimetre PNG as float32 depth in dataset units (0 = invalid)."""
    with Image.open(path) as img:
        if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"{path}: expected a 16-bit single-channel PNG, got mode {img.mode}")
        mm = np.asarray(img).astype(np.float32)
    return mm / np.float32(1000.0)


def write_depth_npy(path: str | os.PathLike[str], depth: np.ndarray) -> Path:
    """Write depth [H,W] as float32 `.npy` in dataset units (non-finite values stored as 0 = invalid)."""
    depth = _check_depth(depth).astype(np.float32)
    depth = np.where(np.isfinite(depth), depth, np.float32(0.0))
    buf = io.BytesIO()
    np.save(buf, depth, allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def read_depth_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a depth `.npy` as float32 [H,W] (never unpickles)."""
    return _check_depth(np.load(path, allow_pickle=False)).astype(np.float32)
