"""Pinhole projection / unprojection with OpenCV w2c extrinsics (pixel convention: see ``intrinsics``)."""

from __future__ import annotations

import numpy as np


def project_points(points_world: np.ndarray, w2c_opencv: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project [N, 3] world points; returns (uv [N, 2] continuous pixels, depth [N] = camera z).

    Points with depth ≤ 0 get uv computed anyway (callers mask by depth).
    """
    X = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
    w2c = np.asarray(w2c_opencv, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    X_cam = X @ w2c[:3, :3].T + w2c[:3, 3]
    depth = X_cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uvw = X_cam @ K.T
        uv = uvw[:, :2] / uvw[:, 2:3]
    return uv, depth


def unproject_depth(depth: np.ndarray, K: np.ndarray, w2c_opencv: np.ndarray) -> np.ndarray:
    """World points [H, W, 3] of a z-depth map [H, W] (or [H, W, 1]) at pixel centres (j + 0.5, i + 0.5)."""
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W] (or [H, W, 1]), got shape {depth.shape}")
    K = np.asarray(K, dtype=np.float64)
    w2c = np.asarray(w2c_opencv, dtype=np.float64)
    H, W = depth.shape
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)
    rays = pix @ np.linalg.inv(K).T  # z = 1 (K's last row is 0 0 1)
    X_cam = rays * depth[..., None]
    R, t = w2c[:3, :3], w2c[:3, 3]
    return (X_cam - t) @ R  # Rᵀ (X_cam − t), row-vector form
