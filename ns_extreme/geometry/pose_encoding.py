"""VGGT's 9-d ``absT_quaR_FoV`` pose encoding (torch).

``[tx, ty, tz, qx, qy, qz, qw, fov_h, fov_w]``: translation and XYZW quaternion of the **world-to-camera**
OpenCV extrinsic, then the vertical and horizontal field of view in radians of the *network input*
image (H, W). Decoding forces the principal point to the image centre (W/2, H/2).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ns_extreme.geometry.rotations_torch import matrix_to_quat_xyzw_torch, quat_xyzw_to_matrix_torch


def _as_tensor(x: torch.Tensor | object, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    t = torch.as_tensor(x)
    if like is not None:
        return t.to(dtype=like.dtype, device=like.device)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def pose_encoding_from_w2c_intrinsics(w2c: torch.Tensor, K: torch.Tensor, image_hw: Sequence[int]) -> torch.Tensor:
    """Encode w2c [..., 3, 4] (or [..., 4, 4]) and K [..., 3, 3] of an (H, W) image → [..., 9]."""
    w2c = _as_tensor(w2c)
    K = _as_tensor(K, like=w2c)
    H, W = float(image_hw[0]), float(image_hw[1])
    T = w2c[..., :3, 3]
    quat = matrix_to_quat_xyzw_torch(w2c[..., :3, :3])
    fov_h = 2.0 * torch.atan((H / 2.0) / K[..., 1, 1])
    fov_w = 2.0 * torch.atan((W / 2.0) / K[..., 0, 0])
    return torch.cat([T, quat, fov_h[..., None], fov_w[..., None]], dim=-1)


def w2c_intrinsics_from_pose_encoding(
    pose_enc: torch.Tensor, image_hw: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode [..., 9] → (w2c [..., 3, 4], K [..., 3, 3]) for an (H, W) image; cx = W/2, cy = H/2."""
    pose_enc = _as_tensor(pose_enc)
    H, W = float(image_hw[0]), float(image_hw[1])
    T = pose_enc[..., :3]
    R = quat_xyzw_to_matrix_torch(pose_enc[..., 3:7])
    w2c = torch.cat([R, T[..., None]], dim=-1)
    fy = (H / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (W / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    K = torch.zeros(pose_enc.shape[:-1] + (3, 3), dtype=pose_enc.dtype, device=pose_enc.device)
    K[..., 0, 0] = fx
    K[..., 1, 1] = fy
    K[..., 0, 2] = W / 2.0
    K[..., 1, 2] = H / 2.0
    K[..., 2, 2] = 1.0
    return w2c, K
