"""How to read each backbone's predicted camera rotations: the one model-specific step of alignment training and
evaluation. ``ModelSpec.rotation_reader`` names one of the readers below."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ns_extreme.geometry.rotations_torch import quat_xyzw_to_matrix_torch

W2cRotationReader = Callable[[Mapping[str, torch.Tensor]], list[torch.Tensor]]
"""Output of ``model(images, heads=CAMERA_HEADS)`` -> the world-to-camera rotations ``[B, S, 3, 3]`` (float32,
differentiable) of each camera estimate, first to last (the last is the model's final answer)."""


def w2c_rotations_from_pose_encoding(pose_enc: torch.Tensor) -> torch.Tensor:
    """World-to-camera rotations [..., 3, 3] (float32) from VGGT pose encodings [..., 9] (quaternion xyzw at 3:7).

    Same rotation as ``w2c_intrinsics_from_pose_encoding``, with the quaternion normalised under an epsilon
    first so that a near-zero prediction cannot produce Inf.
    """
    q = F.normalize(pose_enc[..., 3:7].float(), dim=-1, eps=1e-8)
    return quat_xyzw_to_matrix_torch(q)


def w2c_rotations_from_c2w(c2w: torch.Tensor) -> torch.Tensor:
    """World-to-camera rotations [..., 3, 3] (float32) of camera-to-world poses [..., 3 or 4, 4]: R_w2c = R_c2wᵀ."""
    return c2w[..., :3, :3].float().transpose(-1, -2)


def vggt_w2c_rotations(out: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """One estimate per camera-head refinement iteration (``pose_enc_list``)."""
    return [w2c_rotations_from_pose_encoding(enc) for enc in out["pose_enc_list"]]


def pi3_w2c_rotations(out: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """π³ has a single camera estimate: camera-to-world ``camera_poses`` [B, S, 4, 4]."""
    return [w2c_rotations_from_c2w(out["camera_poses"])]


def worldmirror_w2c_rotations(out: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """WorldMirror's camera head is VGGT's: one world-to-camera pose encoding per refinement iteration
    (``camera_params_list``). Its ``camera_poses`` are the inverses (camera-to-world) and must not be read as w2c."""
    return [w2c_rotations_from_pose_encoding(enc) for enc in out["camera_params_list"]]
