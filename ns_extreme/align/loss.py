"""The alignment loss of arXiv 2511.22686: rotation-only geodesic loss on the relative rotation of a pair.

    L = geo(R2 R1ᵀ, R2gt R1gtᵀ) + [reference_frame] · geo(R1, I),   geo(A, B) = arccos((tr(A Bᵀ) − 1) / 2)

in radians, averaged over the batch. ``R1, R2`` are the predicted **world-to-camera** rotations of the two
views, read out of the camera-path outputs by ``ModelSpec.w2c_rotations`` (VGGT: the quaternions of the pose
encodings, one estimate per camera-head iteration; π³: the transposed rotations of the camera-to-world
``camera_poses``, a single estimate), ``R1gt, R2gt`` the COLMAP world-to-camera rotations. The anchor term
``geo(R1, I)`` is used for models whose first frame defines the world (``ModelSpec.reference_frame``: VGGT,
WorldMirror), not for permutation-equivariant ones (π³), whose world is arbitrary. The arccos cosine is clamped
to ±(1 − eps) so gradients stay finite at 0° and 180°.

Not stated in the paper: the clamp epsilon, whether iterations other than the last are
supervised. ``iteration_weighting="all"`` is offered as an option (VGGT's own training weights the 4
camera-head iterations by γ^(n−1−i), γ = 0.6); the default is the last iteration only, like the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ns_extreme.geometry.rotations_torch import geodesic_angle_torch

__all__ = ["LossOutput", "pair_rotation_loss", "rotation_loss"]

IterationWeighting = Literal["last", "all"]


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    """Scalar to minimise (radians)."""
    rel_error: torch.Tensor
    """Per-pair relative-rotation geodesic error [B] in radians (last iteration, detached)."""
    anchor_error: torch.Tensor
    """Per-pair geo(R1, I) [B] in radians (last iteration, detached; computed even when not in the loss)."""


def pair_rotation_loss(
    R_pred: torch.Tensor, R_gt: torch.Tensor, reference_frame: bool, eps: float = 1e-6
) -> LossOutput:
    """Loss of predicted vs GT w2c rotations of the two views, both ``[B, 2, 3, 3]``."""
    if R_pred.shape[-3:] != (2, 3, 3) or R_gt.shape != R_pred.shape:
        raise ValueError(f"expected two [B, 2, 3, 3] tensors, got {tuple(R_pred.shape)} and {tuple(R_gt.shape)}")
    R_pred = R_pred.float()
    R_gt = R_gt.to(R_pred)
    rel_pred = R_pred[:, 1] @ R_pred[:, 0].transpose(-1, -2)
    rel_gt = R_gt[:, 1] @ R_gt[:, 0].transpose(-1, -2)
    rel = geodesic_angle_torch(rel_pred, rel_gt, eps=eps)
    eye = torch.eye(3, dtype=R_pred.dtype, device=R_pred.device).expand_as(R_pred[:, 0])
    anchor = geodesic_angle_torch(R_pred[:, 0], eye, eps=eps)
    per_pair = rel + anchor if reference_frame else rel
    return LossOutput(per_pair.mean(), rel.detach(), anchor.detach())


def iteration_weights(n: int, weighting: IterationWeighting, gamma: float = 0.6) -> list[float]:
    """Weights of the camera-head iterations, first to last (they sum to 1 for "all")."""
    if weighting == "last":
        return [0.0] * (n - 1) + [1.0]
    if weighting == "all":
        w = [gamma ** (n - 1 - i) for i in range(n)]
        s = sum(w)
        return [x / s for x in w]
    raise ValueError(f"unknown iteration weighting {weighting!r}; choose 'last' or 'all'")


def rotation_loss(
    R_w2c_list: Sequence[torch.Tensor],
    R_gt: torch.Tensor,
    reference_frame: bool,
    weighting: IterationWeighting = "last",
    eps: float = 1e-6,
) -> LossOutput:
    """The loss from the predicted w2c rotations ``[B, 2, 3, 3]`` of each camera estimate, first to last (the
    output of ``ModelSpec.w2c_rotations``); the reported errors are those of the last estimate."""
    if not R_w2c_list:
        raise ValueError("no predicted rotations")
    weights = iteration_weights(len(R_w2c_list), weighting)
    total = None
    last = None
    for w, R_w2c in zip(weights, R_w2c_list):
        if w == 0.0:
            continue
        out = pair_rotation_loss(R_w2c, R_gt, reference_frame, eps)
        total = out.loss * w if total is None else total + out.loss * w
        last = out
    assert total is not None and last is not None  # the last weight is never 0
    return LossOutput(total, last.rel_error, last.anchor_error)
