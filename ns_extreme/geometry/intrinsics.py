"""Pinhole intrinsics and fields of view.

Pixel-coordinate convention used everywhere in ns_extreme: *continuous* coordinates in which an image
of W×H pixels spans [0, W]×[0, H] and the centre of pixel (row i, column j) is at (x, y) = (j + 0.5, i + 0.5).
This is the COLMAP / nerfstudio convention; in it VGGT's principal point ``cx = W/2, cy = H/2`` is the
exact image centre, and resizing an image by a factor s maps x ↦ s·x (no half-pixel shifts).
"""

from __future__ import annotations

import numpy as np


def intrinsics_matrix(
    fx: float | np.ndarray, fy: float | np.ndarray, cx: float | np.ndarray, cy: float | np.ndarray
) -> np.ndarray:
    """K [..., 3, 3] = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]; inputs broadcast."""
    fx, fy, cx, cy = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (fx, fy, cx, cy)))
    K = np.zeros(fx.shape + (3, 3), dtype=np.float64)
    K[..., 0, 0] = fx
    K[..., 1, 1] = fy
    K[..., 0, 2] = cx
    K[..., 1, 2] = cy
    K[..., 2, 2] = 1.0
    return K


def fov_from_focal(focal: float | np.ndarray, size: float | np.ndarray) -> float | np.ndarray:
    """Field of view in radians, ``2·atan(size / (2·focal))`` (size = W with fx, H with fy)."""
    fov = 2.0 * np.arctan(np.asarray(size, dtype=np.float64) / (2.0 * np.asarray(focal, dtype=np.float64)))
    return float(fov) if np.ndim(fov) == 0 else fov


def focal_from_fov(fov: float | np.ndarray, size: float | np.ndarray) -> float | np.ndarray:
    """Focal length in pixels, ``(size / 2) / tan(fov / 2)`` with fov in radians."""
    focal = (np.asarray(size, dtype=np.float64) / 2.0) / np.tan(np.asarray(fov, dtype=np.float64) / 2.0)
    return float(focal) if np.ndim(focal) == 0 else focal
