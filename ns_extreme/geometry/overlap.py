"""Overlap classes of an image pair: the paper's field-of-view rule (arXiv 2511.22686).

Relative rotation ``R = R2 · R1ᵀ`` of the two world-to-camera (OpenCV) rotations.
``Rotation.from_matrix(R).as_euler('ZXY', degrees=True)`` gives the angles about Z, X, Y in that order;
**yaw = the third angle (about Y)**, **pitch = minus the second (about X)**.
Per image ``fovx = 2·atan(w / 2fx)``, ``fovy = 2·atan(h / 2fy)``. With the mean fields of view of the two
images, a pair is

- ``none``  if |yaw| > mean fovx or |pitch| > mean fovy (strict),
- ``large`` if |yaw| < mean fovx / 2 and |pitch| < mean fovy / 2 (strict),
- ``small`` otherwise (boundaries included).

On the paper's released pair files this reproduces every ``none`` label; about 3 % of the released
large/small labels differ (they were also cross-checked with image matches).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from ns_extreme.geometry.rotations import relative_rotation

OverlapClass = Literal["large", "small", "none"]
OVERLAP_CLASSES: tuple[OverlapClass, ...] = ("large", "small", "none")


def fov_xy_deg(fx: float, fy: float, w: float, h: float) -> tuple[float, float]:
    """Horizontal and vertical field of view in degrees: ``2·atan(w / 2fx)``, ``2·atan(h / 2fy)``."""
    if not (fx > 0 and fy > 0 and w > 0 and h > 0):
        raise ValueError(f"fov_xy_deg needs positive fx, fy, w, h (got {fx}, {fy}, {w}, {h})")
    return (
        math.degrees(2.0 * math.atan(w / (2.0 * fx))),
        math.degrees(2.0 * math.atan(h / (2.0 * fy))),
    )


def yaw_pitch_deg(R_rel: np.ndarray) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Yaw and pitch (degrees) of a relative rotation ``[3, 3]`` (floats) or a stack ``[N, 3, 3]`` (arrays).

    ``as_euler('ZXY')`` → (about Z, about X, about Y); yaw = third angle, pitch = −second angle.
    At gimbal lock (pitch = ±90°) scipy's warning is silenced; the pitch alone then decides the class.
    """
    R = np.asarray(R_rel, dtype=np.float64)
    if R.shape[-2:] != (3, 3) or R.ndim not in (2, 3):
        raise ValueError(f"yaw_pitch_deg expects [3,3] or [N,3,3], got shape {R.shape}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]imbal lock.*")
        euler = Rotation.from_matrix(R).as_euler("ZXY", degrees=True)
    if R.ndim == 2:
        return float(euler[2]), float(-euler[1])
    return euler[:, 2].copy(), -euler[:, 1]


def overlap_class_from_angles(
    yaw_deg: float,
    pitch_deg: float,
    fov1_xy_deg: Sequence[float],
    fov2_xy_deg: Sequence[float],
) -> OverlapClass:
    """Apply the §4 thresholds to yaw/pitch (degrees) with the two images' (fovx, fovy) in degrees."""
    fovx = 0.5 * (float(fov1_xy_deg[0]) + float(fov2_xy_deg[0]))
    fovy = 0.5 * (float(fov1_xy_deg[1]) + float(fov2_xy_deg[1]))
    yaw, pitch = abs(float(yaw_deg)), abs(float(pitch_deg))
    if yaw > fovx or pitch > fovy:
        return "none"
    if yaw < fovx / 2.0 and pitch < fovy / 2.0:
        return "large"
    return "small"


def overlap_class(
    R1_w2c: np.ndarray,
    R2_w2c: np.ndarray,
    fov1_xy_deg: Sequence[float],
    fov2_xy_deg: Sequence[float],
) -> OverlapClass:
    """Overlap class of a pair from its world-to-camera rotations (``[3,3]`` or ``[3,4]``) and fields of view."""
    R1 = np.asarray(R1_w2c, dtype=np.float64)[:3, :3]
    R2 = np.asarray(R2_w2c, dtype=np.float64)[:3, :3]
    yaw, pitch = yaw_pitch_deg(relative_rotation(R1, R2))
    return overlap_class_from_angles(yaw, pitch, fov1_xy_deg, fov2_xy_deg)
