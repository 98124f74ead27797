"""Point cloud from depth maps: confidence and edge filtering, voxel downsampling, a point budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ns_extreme.geometry.projection import unproject_depth


@dataclass
class PointCloud:
    xyz: np.ndarray
    rgb: np.ndarray
    conf: np.ndarray

    @classmethod
    def concatenate(cls, clouds: list["PointCloud"]) -> "PointCloud":
        if not clouds:
            return cls(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0, np.float32))
        return cls(*(np.concatenate([getattr(c, k) for c in clouds]) for k in ("xyz", "rgb", "conf")))

    def subset(self, index: np.ndarray) -> "PointCloud":
        return PointCloud(self.xyz[index], self.rgb[index], self.conf[index])


def edge_mask(depth: np.ndarray, threshold: float) -> np.ndarray:
    """True where the relative depth change to any 4-neighbour is below ``threshold`` (no discontinuity)."""
    d = np.maximum(depth, 1e-8)
    ok = np.ones(depth.shape, dtype=bool)
    dy = np.abs(np.diff(d, axis=0)) / np.minimum(d[1:], d[:-1])
    dx = np.abs(np.diff(d, axis=1)) / np.minimum(d[:, 1:], d[:, :-1])
    ok[1:] &= dy < threshold
    ok[:-1] &= dy < threshold
    ok[:, 1:] &= dx < threshold
    ok[:, :-1] &= dx < threshold
    return ok


def view_points(
    depth: np.ndarray,
    confidence: np.ndarray,
    K_pre: np.ndarray,
    w2c: np.ndarray,
    image_rgb: np.ndarray,
    valid: np.ndarray,
    conf_percentile: float,
    edge_threshold: float,
) -> PointCloud:
    """Points of one view. ``image_rgb`` [H,W,3] uint8 and ``valid`` [H,W] (not padding) at depth resolution."""
    keep = valid & (depth > 0) & np.isfinite(depth)
    if conf_percentile > 0 and keep.any():
        keep &= confidence >= np.percentile(confidence[keep], conf_percentile)
    if edge_threshold > 0:
        keep &= edge_mask(depth, edge_threshold)
    xyz = unproject_depth(depth, K_pre, w2c)[keep]
    return PointCloud(xyz, image_rgb[keep], confidence[keep].astype(np.float32))


def voxel_downsample(cloud: PointCloud, voxel: float) -> PointCloud:
    """Keep the most confident point of each voxel."""
    if voxel <= 0 or len(cloud.xyz) == 0:
        return cloud
    keys = np.floor(cloud.xyz / voxel).astype(np.int64)
    order = np.argsort(-cloud.conf, kind="stable")
    _, first = np.unique(keys[order], axis=0, return_index=True)
    return cloud.subset(np.sort(order[first]))


def limit_points(cloud: PointCloud, max_points: int, seed: int) -> PointCloud:
    if len(cloud.xyz) <= max_points:
        return cloud
    index = np.random.default_rng(seed).choice(len(cloud.xyz), size=max_points, replace=False)
    return cloud.subset(np.sort(index))
