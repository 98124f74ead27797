"""A level world: the rotation that makes gravity point along +y (COLMAP's convention, as its orientation aligner
leaves a model), so that nerfstudio's ``applied_transform`` (x, y, z) -> (x, z, -y) puts up on +z.

Up is estimated from the cameras (the mean of their up vectors: photos are mostly taken upright, as nerfstudio's
``orientation_method="up"`` assumes) and, where it is more reliable, from a ground plane fitted to the points: a
plane that holds a large share of the points and whose normal is close to the cameras' up (a floor or the ground,
not a facade).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

GRAVITY_COLMAP = np.array([0.0, 1.0, 0.0])
"""Gravity in a levelled COLMAP / OpenCV world (y down)."""
PLANE_MIN_INLIERS = 0.1
"""Share of the points a ground plane must hold to be used."""
PLANE_MAX_SPREAD = 0.3
"""A plane's inliers must lie closer to it than this fraction of the inlier threshold (RMS): points of a curved or
rough surface fill the band around any plane evenly (RMS = 0.58 of the threshold), those of a plane hug it."""
PLANE_MAX_TILT_DEG = 25.0
"""A plane whose normal is further than this from the cameras' up is a wall, not the ground."""


@dataclass
class Orientation:
    rotation: np.ndarray
    """[3, 3] world rotation applied (new = R · old)."""
    method: str
    """cameras, ground-plane, or none."""
    up_before: list[float]
    """The estimated up direction in the unrotated world."""
    camera_spread_deg: float
    """Median angle between a camera's up vector and their mean."""
    plane_inliers: float = 0.0
    """Share of the points on the fitted ground plane (0 when none was found)."""
    plane_spread: float = 1.0
    """RMS distance of those points to the plane, as a fraction of the inlier threshold."""

    def summary(self) -> dict:
        return {
            "method": self.method,
            "rotation": self.rotation.tolist(),
            "up_before": self.up_before,
            "camera_up_spread_deg": self.camera_spread_deg,
            "plane_inlier_fraction": self.plane_inliers,
            "plane_rms_over_threshold": self.plane_spread,
            "convention": "colmap/: gravity along +y; transforms.json: up along +z",
        }


def camera_up_vectors(w2c_opencv: np.ndarray) -> np.ndarray:
    """[N, 3] world direction of each camera's up (its -y axis, OpenCV)."""
    return -np.asarray(w2c_opencv)[:, 1, :3]


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = (a @ b) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def fit_ground_plane(
    points: np.ndarray, threshold: float, iterations: int = 300, seed: int = 0
) -> tuple[Optional[np.ndarray], float, float]:
    """RANSAC plane: (unit normal refined on the inliers, or None; share of inliers; their RMS distance to the
    refined plane over ``threshold``)."""
    n = len(points)
    if n < 50:
        return None, 0.0, 1.0
    rng = np.random.default_rng(seed)
    best, best_count = None, 0
    for _ in range(iterations):
        a, b, c = points[rng.choice(n, 3, replace=False)]
        normal = np.cross(b - a, c - a)
        norm = np.linalg.norm(normal)
        if norm < 1e-12:
            continue
        inliers = np.abs((points - a) @ (normal / norm)) < threshold
        count = int(inliers.sum())
        if count > best_count:
            best, best_count = inliers, count
    if best is None:
        return None, 0.0, 1.0
    on_plane = points[best] - points[best].mean(0)
    _, _, vt = np.linalg.svd(on_plane, full_matrices=False)
    rms = float(np.sqrt(np.mean((on_plane @ vt[2]) ** 2)))
    return vt[2], best_count / n, rms / threshold


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation R with R · a = b (unit vectors)."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if c < -1.0 + 1e-12:  # opposite: half a turn about any axis perpendicular to a
        axis = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def level_world(w2c_opencv: np.ndarray, points_xyz: np.ndarray, seed: int = 0) -> Orientation:
    """The rotation that levels the world (gravity -> +y), from the cameras' up vectors or a ground plane."""
    ups = camera_up_vectors(w2c_opencv)
    up = ups.sum(0)
    up = up / np.linalg.norm(up) if np.linalg.norm(up) > 1e-9 else -GRAVITY_COLMAP
    spread = float(np.median(_angle_deg(ups, up)))
    method, plane_share, plane_spread = "cameras", 0.0, 1.0
    centres = -np.einsum("nji,nj->ni", w2c_opencv[:, :3, :3], w2c_opencv[:, :3, 3])
    points = np.asarray(points_xyz, dtype=np.float64)
    if len(points):
        extent = float(np.median(np.linalg.norm(points - np.median(points, 0), axis=1)))
        normal, plane_share, plane_spread = fit_ground_plane(points, 0.02 * max(extent, 1e-9), seed=seed)
        if normal is not None:
            normal = normal if normal @ up >= 0 else -normal
            # The cameras must be above the ground: the plane's up side.
            on_plane = points[np.argmin(np.abs((points - points.mean(0)) @ normal))]
            above = float(np.median((centres - on_plane) @ normal)) > 0
            tilt = float(_angle_deg(normal, up))
            planar = plane_share >= PLANE_MIN_INLIERS and plane_spread <= PLANE_MAX_SPREAD
            if planar and tilt <= PLANE_MAX_TILT_DEG and above:
                up, method = normal, "ground-plane"
    rotation = rotation_between(up, -GRAVITY_COLMAP)
    return Orientation(rotation, method, up.tolist(), spread, float(plane_share), float(plane_spread))
