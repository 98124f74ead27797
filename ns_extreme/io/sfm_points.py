"""Triangulated points with their tracks, as arrays (no pycolmap import: the refinement stage's results use it
before knowing whether pycolmap loads)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POINT_SOURCE_MODEL, POINT_SOURCE_SFM = 0, 1
"""Values of the per-point ``source`` (sparse_pc.ply): the 3D model's depth, or a triangulated feature track."""


@dataclass
class SfmPoints:
    """Triangulated points with their tracks; observations flattened, in original-resolution pixels."""

    xyz: np.ndarray  # [M, 3] float64
    rgb: np.ndarray  # [M, 3] uint8
    error: np.ndarray  # [M] mean reprojection error in original pixels
    obs_point: np.ndarray  # [O] index into xyz
    obs_view: np.ndarray  # [O] index of the observing image
    obs_xy: np.ndarray  # [O, 2] continuous pixel position, [0, W] x [0, H]

    def __len__(self) -> int:
        return len(self.xyz)

    def subset(self, keep_points: np.ndarray, keep_obs: np.ndarray | None = None) -> "SfmPoints":
        """Points ``keep_points`` (bool [M]) with their observations (and only ``keep_obs``, bool [O], if given)."""
        obs = keep_points[self.obs_point] & (True if keep_obs is None else keep_obs)
        new_index = np.cumsum(keep_points) - 1
        return SfmPoints(
            self.xyz[keep_points], self.rgb[keep_points], self.error[keep_points],
            new_index[self.obs_point[obs]], self.obs_view[obs], self.obs_xy[obs],
        )  # fmt: skip

    def transformed(self, xyz: np.ndarray) -> "SfmPoints":
        return SfmPoints(xyz, self.rgb, self.error, self.obs_point, self.obs_view, self.obs_xy)

    @staticmethod
    def empty() -> "SfmPoints":
        z = np.zeros(0, dtype=np.int64)
        return SfmPoints(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0), z, z, np.zeros((0, 2)))
