"""Rotation utilities in torch: differentiable geodesic angle and quaternion ⇄ matrix.

Quaternions are ``x, y, z, w`` (scalar last, as in VGGT's pose encoding).
"""

from __future__ import annotations

import torch


def geodesic_angle_torch(R_a: torch.Tensor, R_b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable geodesic angle (radians) of ``R_a R_bᵀ``, batched over [..., 3, 3].

    The cosine is clamped to ±(1 − eps) so that the gradient of arccos stays finite at 0 and 180°.
    """
    trace = (R_a * R_b).sum(dim=(-1, -2))
    cos = ((trace - 1.0) / 2.0).clamp(-1.0 + eps, 1.0 - eps)
    return torch.acos(cos)


def quat_xyzw_to_matrix_torch(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] from quaternions [..., 4] (x, y, z, w); non-unit q is normalised via 2/|q|²."""
    x, y, z, w = torch.unbind(q, dim=-1)
    two_s = 2.0 / (q * q).sum(dim=-1)
    m = torch.stack(
        (
            1 - two_s * (y * y + z * z),
            two_s * (x * y - z * w),
            two_s * (x * z + y * w),
            two_s * (x * y + z * w),
            1 - two_s * (x * x + z * z),
            two_s * (y * z - x * w),
            two_s * (x * z - y * w),
            two_s * (y * z + x * w),
            1 - two_s * (x * x + y * y),
        ),
        dim=-1,
    )
    return m.reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat_xyzw_torch(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [..., 4] (x, y, z, w) with w ≥ 0 from rotation matrices [..., 3, 3]."""
    m = R[..., :3, :3]
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # 4·(w², x², y², z²); each candidate below divides by the largest of them, avoiding cancellation.
    four_sq = torch.stack(
        (
            1.0 + m00 + m11 + m22,
            1.0 + m00 - m11 - m22,
            1.0 - m00 + m11 - m22,
            1.0 - m00 - m11 + m22,
        ),
        dim=-1,
    )
    q_abs = torch.sqrt(four_sq.clamp(min=0.0))  # 2·|w|, 2·|x|, 2·|y|, 2·|z|
    # Rows: candidates (w, x, y, z) · 2·|component| computed from the w, x, y, z pivots respectively.
    cand = torch.stack(
        (
            torch.stack((q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01), dim=-1),
            torch.stack((m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20), dim=-1),
            torch.stack((m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21), dim=-1),
            torch.stack((m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2), dim=-1),
        ),
        dim=-2,
    )
    cand = cand / (2.0 * q_abs[..., :, None].clamp(min=0.1))
    best = q_abs.argmax(dim=-1)
    idx = best[..., None, None].expand(best.shape + (1, 4))
    q_wxyz = torch.gather(cand, -2, idx).squeeze(-2)
    q_wxyz = torch.where(q_wxyz[..., :1] < 0, -q_wxyz, q_wxyz)
    q_wxyz = q_wxyz / q_wxyz.norm(dim=-1, keepdim=True)
    return torch.cat((q_wxyz[..., 1:], q_wxyz[..., :1]), dim=-1)
