"""Overlap classes (the field-of-view rule of arXiv 2511.22686) on hand-made rotations at the class boundaries."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ns_extreme.geometry.overlap import (
    OVERLAP_CLASSES,
    fov_xy_deg,
    overlap_class,
    overlap_class_from_angles,
    yaw_pitch_deg,
)

W, H = 800, 600


def focal_for_fov(fov_deg: float, size: float) -> float:
    return size / (2.0 * math.tan(math.radians(fov_deg) / 2.0))


def rel_rot(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """A relative rotation whose ZXY Euler angles are (roll, −pitch, yaw)."""
    return Rotation.from_euler("ZXY", [roll, -pitch, yaw], degrees=True).as_matrix()


# A generic (non-identity) first camera: the class must depend only on R2·R1ᵀ.
R1 = Rotation.from_euler("xyz", [17.0, -33.0, 71.0], degrees=True).as_matrix()
FOV = (60.0, 45.0)


def classify(yaw: float, pitch: float, fov1=FOV, fov2=FOV, roll: float = 0.0) -> str:
    R2 = rel_rot(yaw, pitch, roll) @ R1
    return overlap_class(R1, R2, fov1, fov2)


def test_constants():
    assert OVERLAP_CLASSES == ("large", "small", "none")


def test_fov_xy_deg():
    fx = focal_for_fov(60.0, W)
    fy = focal_for_fov(45.0, H)
    fovx, fovy = fov_xy_deg(fx, fy, W, H)
    assert fovx == pytest.approx(60.0, abs=1e-9)
    assert fovy == pytest.approx(45.0, abs=1e-9)
    # strecha castle intrinsics (768x512, fx 689.87, fy 691.04): 2·atan(384/689.87), 2·atan(256/691.04)
    fovx, fovy = fov_xy_deg(689.87, 691.04, 768, 512)
    assert fovx == pytest.approx(58.2030, abs=1e-4)
    assert fovy == pytest.approx(40.6549, abs=1e-4)
    with pytest.raises(ValueError):
        fov_xy_deg(0.0, 500.0, W, H)


@pytest.mark.parametrize(
    "yaw,pitch,roll", [(29.9, 0.0, 0.0), (-61.0, 12.0, 0.0), (37.0, -22.6, 10.0), (150.0, 5.0, -4.0)]
)
def test_yaw_pitch_roundtrip(yaw, pitch, roll):
    got_yaw, got_pitch = yaw_pitch_deg(rel_rot(yaw, pitch, roll))
    assert got_yaw == pytest.approx(yaw, abs=1e-9)
    assert got_pitch == pytest.approx(pitch, abs=1e-9)


def test_yaw_pitch_axes_and_batch():
    # yaw is the rotation about the camera's Y axis, pitch minus the one about X
    yaw, pitch = yaw_pitch_deg(Rotation.from_rotvec([0, math.radians(40), 0]).as_matrix())
    assert (yaw, pitch) == (pytest.approx(40.0), pytest.approx(0.0, abs=1e-12))
    yaw, pitch = yaw_pitch_deg(Rotation.from_rotvec([math.radians(20), 0, 0]).as_matrix())
    assert (yaw, pitch) == (pytest.approx(0.0, abs=1e-12), pytest.approx(-20.0))
    stack = np.stack([rel_rot(10, 5), rel_rot(-70, 30)])
    yaws, pitches = yaw_pitch_deg(stack)
    np.testing.assert_allclose(yaws, [10, -70], atol=1e-9)
    np.testing.assert_allclose(pitches, [5, 30], atol=1e-9)


@pytest.mark.parametrize(
    "yaw,pitch,expected",
    [
        (29.9, 0.0, "large"),
        (30.1, 0.0, "small"),
        (59.9, 0.0, "small"),
        (60.1, 0.0, "none"),
        (-29.9, 0.0, "large"),
        (-30.1, 0.0, "small"),
        (-60.1, 0.0, "none"),
        (0.0, 22.4, "large"),
        (0.0, 22.6, "small"),
        (0.0, 44.9, "small"),
        (0.0, 45.1, "none"),
        (0.0, -22.6, "small"),
        (0.0, -45.1, "none"),
        (179.0, 0.0, "none"),
    ],
)
def test_single_axis_boundaries(yaw, pitch, expected):
    assert classify(yaw, pitch) == expected
    # roll about the optical axis does not change the class
    assert classify(yaw, pitch, roll=10.0) == expected


@pytest.mark.parametrize(
    "yaw,pitch,expected",
    [
        (29.0, 22.0, "large"),  # both under half the fov
        (29.0, 23.0, "small"),  # pitch alone over half
        (31.0, 22.0, "small"),  # yaw alone over half
        (59.0, 44.0, "small"),  # both large but within the fov
        (59.0, 45.5, "none"),  # pitch beyond the fov
        (60.5, 10.0, "none"),  # yaw beyond the fov
        (-20.0, -46.0, "none"),
    ],
)
def test_combined_yaw_pitch(yaw, pitch, expected):
    assert classify(yaw, pitch) == expected


def test_different_fovs_use_the_mean():
    fov1, fov2 = (50.0, 40.0), (70.0, 50.0)  # means: fovx 60, fovy 45
    assert classify(29.9, 0.0, fov1, fov2) == "large"  # would be small with view 1's fovx (threshold 25)
    assert classify(30.1, 0.0, fov1, fov2) == "small"
    assert classify(60.1, 0.0, fov1, fov2) == "none"  # would be small with view 2's fovx (70)
    assert classify(0.0, 22.4, fov1, fov2) == "large"  # view 1 alone: 22.4 > 20
    assert classify(0.0, 45.1, fov1, fov2) == "none"  # view 2 alone: 45.1 < 50
    assert classify(0.0, 22.4, fov1, fov1) == "small"
    assert classify(60.1, 0.0, fov2, fov2) == "small"


def test_relative_rotation_order_is_R2_R1T():
    # camera 1 rolled 90° about its optical axis; camera 2 = yaw 50° relative to it.
    R1z = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    R2 = rel_rot(50.0, 0.0) @ R1z
    assert overlap_class(R1z, R2, FOV, FOV) == "small"  # R2·R1ᵀ: yaw 50 < 60
    # the other composition R1ᵀ·R2 would be a 50° pitch (> 45) and give "none"
    wrong = R1z.T @ R2
    assert overlap_class_from_angles(*yaw_pitch_deg(wrong), FOV, FOV) == "none"
    # [3,4] extrinsics are accepted
    E1 = np.hstack([R1z, np.ones((3, 1))])
    E2 = np.hstack([R2, np.zeros((3, 1))])
    assert overlap_class(E1, E2, FOV, FOV) == "small"


def test_gimbal_lock_is_quiet_and_none():
    R2 = rel_rot(0.0, 90.0) @ R1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert classify(0.0, 90.0) == "none"
        assert overlap_class(R1, R2, FOV, FOV) == "none"
