"""3D Gaussian Splatting PLY files: the layout of the original 3DGS code (per vertex ``x y z``, ``f_dc_0..2``,
``opacity`` as a logit, ``scale_0..2`` as log standard deviations, ``rot_0..3`` a quaternion w, x, y, z), read by
3DGS viewers and tools by property name. ``red green blue`` (uint8, the degree-0 colour) come right after ``x y z``,
so nerfstudio and open3d read the same file as a coloured point cloud (a splatfacto initialisation via
``ply_file_path``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ns_extreme.io.ply import read_ply, write_ply

__all__ = ["SH_C0", "write_gaussian_ply", "read_gaussian_ply"]

SH_C0 = 0.28209479177387814
"""Degree-0 spherical-harmonics constant: colour = 0.5 + SH_C0 · f_dc."""
_EPS = 1e-7


def write_gaussian_ply(
    path: str | os.PathLike[str],
    means: np.ndarray,
    quats_wxyz: np.ndarray,
    scales: np.ndarray,
    opacity: np.ndarray,
    f_dc: np.ndarray,
) -> Path:
    """Write Gaussians (activated values: scales as standard deviations, opacity in (0, 1)) as a binary 3DGS PLY."""
    n = len(means)
    for name, value, width in (("quats_wxyz", quats_wxyz, 4), ("scales", scales, 3), ("f_dc", f_dc, 3)):
        if np.shape(value) != (n, width):
            raise ValueError(f"{name} must be [{n}, {width}], got {np.shape(value)}")
    if np.shape(opacity) != (n,):
        raise ValueError(f"opacity must be [{n}], got {np.shape(opacity)}")
    f_dc = np.asarray(f_dc, dtype=np.float32)
    rgb = np.clip(np.round((0.5 + SH_C0 * f_dc) * 255.0), 0, 255).astype(np.uint8)
    p = np.clip(np.asarray(opacity, dtype=np.float64), _EPS, 1.0 - _EPS)
    extra = {f"f_dc_{k}": f_dc[:, k] for k in range(3)}
    extra["opacity"] = np.log(p / (1.0 - p)).astype(np.float32)
    log_scales = np.log(np.maximum(np.asarray(scales, dtype=np.float64), _EPS)).astype(np.float32)
    extra.update({f"scale_{k}": log_scales[:, k] for k in range(3)})
    extra.update({f"rot_{k}": np.asarray(quats_wxyz, dtype=np.float32)[:, k] for k in range(4)})
    return write_ply(path, means, rgb, extra=extra, binary=True)


def read_gaussian_ply(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``means``, ``quats_wxyz``, ``scales`` (standard deviations), ``opacity`` (0..1), ``f_dc`` of a 3DGS PLY."""
    xyz, _, props = read_ply(path)
    missing = [k for k in ("f_dc_0", "opacity", "scale_0", "rot_0") if k not in props]
    if missing:
        raise ValueError(f"{path}: not a 3DGS PLY (no {', '.join(missing)})")
    return {
        "means": xyz.astype(np.float32),
        "quats_wxyz": np.stack([props[f"rot_{k}"] for k in range(4)], axis=-1),
        "scales": np.exp(np.stack([props[f"scale_{k}"] for k in range(3)], axis=-1)),
        "opacity": 1.0 / (1.0 + np.exp(-props["opacity"].astype(np.float64))),
        "f_dc": np.stack([props[f"f_dc_{k}"] for k in range(3)], axis=-1),
    }
