"""Point cloud from depth maps: confidence and edge filtering, voxel downsampling, a point budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ns_extreme.geometry.projection import unproject_depth
from ns_extreme.io.sfm_points import POINT_SOURCE_MODEL, POINT_SOURCE_SFM

_FIELDS = ("xyz", "rgb", "conf", "view", "pixel", "source")


@dataclass
class PointCloud:
    xyz: np.ndarray
    rgb: np.ndarray
    conf: np.ndarray
    view: np.ndarray
    """[P] index of the view the point came from (the first observation for SfM points)."""
    pixel: np.ndarray
    """[P, 2] its source pixel in that view, preprocessed (network input) resolution, pixel centres at +0.5."""
    source: np.ndarray
    """[P] uint8 POINT_SOURCE_MODEL or POINT_SOURCE_SFM."""

    @classmethod
    def empty(cls) -> "PointCloud":
        return cls(
            np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0, np.float32),
            np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.uint8),
        )  # fmt: skip

    @classmethod
    def concatenate(cls, clouds: list["PointCloud"]) -> "PointCloud":
        if not clouds:
            return cls.empty()
        return cls(*(np.concatenate([getattr(c, k) for c in clouds]) for k in _FIELDS))

    def subset(self, index: np.ndarray) -> "PointCloud":
        return PointCloud(*(getattr(self, k)[index] for k in _FIELDS))


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
    view_index: int = 0,
) -> PointCloud:
    """Points of one view. ``image_rgb`` [H,W,3] uint8 and ``valid`` [H,W] (not padding) at depth resolution."""
    keep = valid & (depth > 0) & np.isfinite(depth)
    if conf_percentile > 0 and keep.any():
        keep &= confidence >= np.percentile(confidence[keep], conf_percentile)
    if edge_threshold > 0:
        keep &= edge_mask(depth, edge_threshold)
    xyz = unproject_depth(depth, K_pre, w2c)[keep]
    rows, cols = np.nonzero(keep)
    pixel = np.stack([cols + 0.5, rows + 0.5], axis=-1).astype(np.float32)
    view = np.full(len(xyz), view_index, dtype=np.int64)
    source = np.full(len(xyz), POINT_SOURCE_MODEL, dtype=np.uint8)
    return PointCloud(xyz, image_rgb[keep], confidence[keep].astype(np.float32), view, pixel, source)


def voxel_downsample(cloud: PointCloud, voxel: float) -> PointCloud:
    """Keep the most confident point of each voxel."""
    if voxel <= 0 or len(cloud.xyz) == 0:
        return cloud
    keys = np.floor(cloud.xyz / voxel).astype(np.int64)
    order = np.argsort(-cloud.conf, kind="stable")
    _, first = np.unique(keys[order], axis=0, return_index=True)
    return cloud.subset(np.sort(order[first]))


def sfm_cloud(sfm, records, confidence: np.ndarray) -> PointCloud:
    """SfM points (``io.colmap_model.SfmPoints``) as a PointCloud: each point's view and pixel are its first
    observation's, and its confidence is the model's depth confidence there."""
    first = np.full(len(sfm), -1, dtype=np.int64)
    order = np.arange(len(sfm.obs_point))[::-1]
    first[sfm.obs_point[order]] = order  # the last write per point wins: its first observation
    view = sfm.obs_view[first] if len(sfm) else np.zeros(0, np.int64)
    pixel = np.zeros((len(sfm), 2), dtype=np.float32)
    conf = np.zeros(len(sfm), dtype=np.float32)
    h, w = confidence.shape[1:]
    for v in np.unique(view):
        mine = np.flatnonzero(view == v)
        uv = records[v].points_to_preprocessed(sfm.obs_xy[first[mine]])
        pixel[mine] = uv
        cols = np.clip(np.floor(uv[:, 0]).astype(int), 0, w - 1)
        rows = np.clip(np.floor(uv[:, 1]).astype(int), 0, h - 1)
        conf[mine] = confidence[v][rows, cols]
    source = np.full(len(sfm), POINT_SOURCE_SFM, dtype=np.uint8)
    return PointCloud(sfm.xyz.copy(), sfm.rgb.copy(), conf, view, pixel, source)


def uncovered(cloud: PointCloud, sfm, records, cell: float = 4.0) -> np.ndarray:
    """[P] True where a (model) point's source pixel lies in no ``cell``-pixel cell (preprocessed resolution) that
    holds an SfM observation of the same view: where SfM has no point, the model's point fills in."""
    keep = np.ones(len(cloud.xyz), dtype=bool)
    for v in np.unique(cloud.view):
        seen = sfm.obs_view == v
        if not seen.any():
            continue
        h, w = records[v].final_hw
        occupied = np.zeros((int(np.ceil(h / cell)) + 1, int(np.ceil(w / cell)) + 1), dtype=bool)
        uv = np.floor(records[v].points_to_preprocessed(sfm.obs_xy[seen]) / cell).astype(np.int64)
        inside = (uv[:, 0] >= 0) & (uv[:, 1] >= 0) & (uv[:, 0] < occupied.shape[1]) & (uv[:, 1] < occupied.shape[0])
        occupied[uv[inside, 1], uv[inside, 0]] = True
        mine = np.flatnonzero(cloud.view == v)
        cells = np.floor(cloud.pixel[mine] / cell).astype(np.int64)
        keep[mine] = ~occupied[cells[:, 1], cells[:, 0]]
    return keep


def limit_points(cloud: PointCloud, max_points: int, seed: int) -> PointCloud:
    if len(cloud.xyz) <= max_points:
        return cloud
    index = np.random.default_rng(seed).choice(len(cloud.xyz), size=max_points, replace=False)
    return cloud.subset(np.sort(index))
