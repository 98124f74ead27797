"""Display frames: where the model world lands in viser's world.

``standalone_frame`` (nerfstudio-like auto orientation, centring and scaling) is used by ``ns-extreme-view``;
``nerfstudio_frame`` (the dataparser's transform and scale times ``VISER_NERFSTUDIO_SCALE_RATIO``) makes the
panel line up with nerfstudio's own training cameras. viser frusta use OpenCV camera axes, like our
world-to-camera poses, so no axis flip is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ns_extreme.geometry.conventions import camera_centres_from_w2c
from ns_extreme.geometry.rotations import nearest_rotation
from ns_extreme.viewer.scene_data import SceneData

__all__ = ["DisplayFrame", "DisplayPoses", "SceneLayout", "standalone_frame", "nerfstudio_frame"]


@dataclass(frozen=True)
class DisplayPoses:
    """Camera frusta in viser's world: orientations ``wxyz`` [N, 4] and ``positions`` [N, 3]."""

    wxyz: np.ndarray
    positions: np.ndarray


@dataclass(frozen=True)
class DisplayFrame:
    """Model world -> viser world: ``x_display = s · (R x + t)`` (R a rotation)."""

    R: np.ndarray
    t: np.ndarray
    s: float
    name: str = "display"

    def points(self, x: np.ndarray) -> np.ndarray:
        return self.s * (np.asarray(x, dtype=np.float64) @ self.R.T + self.t)

    def cameras(self, w2c: np.ndarray) -> DisplayPoses:
        """viser frusta (OpenCV camera axes) of world-to-camera poses [N, 3, 4]."""
        import viser.transforms as vtf

        R_display = nearest_rotation(np.einsum("ij,nkj->nik", self.R, np.asarray(w2c)[:, :3, :3]))
        return DisplayPoses(
            wxyz=vtf.SO3.from_matrix(R_display).wxyz, positions=self.points(camera_centres_from_w2c(w2c))
        )


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector a to unit vector b."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    if c < -1 + 1e-9:  # opposite: rotate pi about any axis orthogonal to a
        axis = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def standalone_frame(data: SceneData, radius: float = 10.0) -> DisplayFrame:
    """Like nerfstudio's default parser frame ("up" orientation, centred on the cameras, max |t| = 1), times
    ``radius``: the mean camera up vector becomes +z (viser's up), the cameras fit a ±radius box."""
    w2c = data.poses["aligned"]
    centres = camera_centres_from_w2c(w2c)
    up = -w2c[:, 1, :3].mean(axis=0)  # the cameras' y axes (rows of R_w2c) point down in OpenCV
    R = _rotation_between(up, np.array([0.0, 0.0, 1.0])) if np.linalg.norm(up) > 1e-6 else np.eye(3)
    rotated = centres @ R.T
    centre = rotated.mean(axis=0)
    extent = float(np.abs(rotated - centre).max()) if len(rotated) else 0.0
    if extent < 1e-9 and len(data.points_xyz):  # cameras at one point (rotation-only capture): use the points
        extent = float(np.percentile(np.linalg.norm(data.points_xyz @ R.T - centre, axis=1), 90))
    if not math.isfinite(extent) or extent < 1e-9:
        extent = 1.0
    return DisplayFrame(R=R, t=-centre, s=radius / extent, name="standalone")


def nerfstudio_frame(dataparser_transform: Any, scale_factor: float, ratio: float = 10.0) -> DisplayFrame:
    """The dataparser's frame in nerfstudio's viewer: ``ratio · scale_factor · (T x)``, where T (3x4) maps the
    model world to the training frame (``dataparser_transform``) and ratio is VISER_NERFSTUDIO_SCALE_RATIO."""
    T = np.asarray(dataparser_transform, dtype=np.float64)[:3, :4]
    scale = float(scale_factor) * ratio
    return DisplayFrame(R=nearest_rotation(T[:, :3]), t=T[:, 3].copy(), s=scale, name="nerfstudio")


@dataclass(frozen=True)
class SceneLayout:
    """Where the cameras are in viser's world and the default sizes that suit them."""

    centre: np.ndarray
    extent: float
    """Largest camera distance from the centre (from the points when the cameras coincide)."""
    frustum_scale: float
    point_size: float

    @classmethod
    def of(cls, cameras: DisplayPoses, points: np.ndarray) -> "SceneLayout":
        pos = cameras.positions
        centre = pos.mean(axis=0) if len(pos) else np.zeros(3)
        extent = float(np.linalg.norm(pos - centre, axis=1).max()) if len(pos) > 1 else 0.0
        if extent < 1e-9:
            extent = float(np.percentile(np.linalg.norm(points - centre, axis=1), 90)) if len(points) else 1.0
        extent = extent if math.isfinite(extent) and extent > 1e-9 else 1.0
        if len(pos) > 1:
            d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
            np.fill_diagonal(d, np.inf)
            nearest = float(np.median(d.min(axis=1)))
        else:
            nearest = extent
        frustum_scale = float(np.clip(0.3 * nearest, 0.03 * extent, 0.1 * extent))
        return cls(centre=centre, extent=extent, frustum_scale=frustum_scale, point_size=0.004 * extent)
