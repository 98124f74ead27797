"""Rotation utilities in numpy (no torch import): geodesic angles, relative rotations, projection onto SO(3).

The differentiable torch counterparts live in ``ns_extreme.geometry.rotations_torch``.
"""

from __future__ import annotations

import numpy as np


def geodesic_angle_deg(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray | float:
    """Angle of ``R_a R_bᵀ`` in degrees: ``arccos(clamp((tr(R_a R_bᵀ) − 1) / 2, −1, 1))``; batched over [..., 3, 3]."""
    R_a = np.asarray(R_a, dtype=np.float64)[..., :3, :3]
    R_b = np.asarray(R_b, dtype=np.float64)[..., :3, :3]
    trace = np.einsum("...ij,...ij->...", R_a, R_b)  # tr(A Bᵀ) = Σ A∘B
    angle = np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))
    return float(angle) if np.ndim(angle) == 0 else angle


def relative_rotation(R1_w2c: np.ndarray, R2_w2c: np.ndarray) -> np.ndarray:
    """Relative rotation ``R2 · R1ᵀ`` (camera 1 → camera 2 frame) of two w2c rotations; [..., 3, 3] (or [..., 3, 4])."""
    R1 = np.asarray(R1_w2c, dtype=np.float64)[..., :3, :3]
    R2 = np.asarray(R2_w2c, dtype=np.float64)[..., :3, :3]
    return R2 @ np.swapaxes(R1, -1, -2)


def nearest_rotation(R: np.ndarray) -> np.ndarray:
    """Project [..., 3, 3] onto SO(3) in float64 (closest rotation in the Frobenius norm, via SVD)."""
    U, _, Vt = np.linalg.svd(np.asarray(R, dtype=np.float64)[..., :3, :3])
    D = np.ones(U.shape[:-1])
    D[..., -1] = np.sign(np.linalg.det(U @ Vt))
    return (U * D[..., None, :]) @ Vt
