"""WorldMirror's posing adapter: VGGT's camera and depth path, plus the network priors, normal maps and, on request,
the 3DGS head's per-pixel Gaussians (``PixelGaussians``) that ``ns_extreme.posing.splats`` places in the final world."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import numpy as np
import torch
from torch import nn

from ns_extreme.geometry.pose_encoding import w2c_intrinsics_from_pose_encoding
from ns_extreme.geometry.rotations_torch import matrix_to_quat_xyzw_torch
from ns_extreme.io.gaussian_ply import SH_C0
from ns_extreme.models.registry import WORLDMIRROR_SPEC
from ns_extreme.posing.backbone import FramePredictions, NonFiniteOutputError, VGGTBackbone, _forward, check_finite
from ns_extreme.posing.priors import FramePriors

GAUSSIAN_CHANNELS = {"quats": 4, "scales": 3, "opacity": 1}
"""Leading channels of WorldMirror's per-pixel Gaussian parameters (``gs_params``), in order; then the SH residual
(3 per coefficient) and the merge weight."""
MAX_SPLAT_SCALE = 0.3
"""The reference clamps Gaussian scales to this (network units)."""


@dataclass
class PixelGaussians:
    """One Gaussian per pixel of the network input, in the camera frame of its view (OpenCV), in the units of the
    view's depth: the centre is the pixel's ray at ``depth``."""

    depth: np.ndarray
    """[S, H, W] float32 z-depth of the centres (the 3DGS head's own depth)."""
    confidence: np.ndarray
    """[S, H, W] float32 (>= 1, larger is better)."""
    quats_wxyz: np.ndarray
    """[S, H, W, 4] float32 unit quaternions (scalar first) of the rotations, camera frame."""
    scales: np.ndarray
    """[S, H, W, 3] float32 standard deviations along the Gaussian's axes."""
    opacity: np.ndarray
    """[S, H, W] float32 in (0, 1): the sigmoid of the merge-weight channel. The reference always voxel-merges its
    Gaussians before rendering (also in training) and renders the merged opacity sum(w²) / sum(w) of these weights
    (w itself for a Gaussian alone in its voxel); its opacity channel is never rendered."""
    f_dc: np.ndarray
    """[S, H, W, 3] float32 degree-0 SH coefficients of the colour."""

    def scaled(self, scale: float) -> "PixelGaussians":
        """The same Gaussians in a world scaled by ``scale`` (a Sim(3) joining chunks or onto known poses)."""
        s = np.float32(scale)
        return replace(self, depth=self.depth * s, scales=self.scales * s)

    @staticmethod
    def concatenate(parts: list["PixelGaussians"]) -> "PixelGaussians":
        return PixelGaussians(
            **{f: np.concatenate([getattr(p, f) for p in parts]) for f in PixelGaussians.__dataclass_fields__}
        )

    def subset(self, views) -> "PixelGaussians":
        return PixelGaussians(**{f: getattr(self, f)[views] for f in PixelGaussians.__dataclass_fields__})


class WorldMirrorBackbone(VGGTBackbone):
    """Runs WorldMirror's camera, depth and normal heads (and the 3DGS head with ``splats``) with the given priors.

    Poses, intrinsics and depth as ``VGGTBackbone`` (the same camera parametrisation: world-to-camera of camera 0).
    Normals: unit vectors in each camera's frame (OpenCV). Priors (``FramePriors``) go into the network as its pose
    token, ray token and depth tokens; views whose matrix is NaN / whose depth is 0 get the empty token.
    """

    patch_size = WORLDMIRROR_SPEC.patch_size
    heads: ClassVar[Optional[tuple[str, ...]]] = WORLDMIRROR_SPEC.posing_heads
    priors: ClassVar[tuple[str, ...]] = WORLDMIRROR_SPEC.priors

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype = torch.float32,
        target_size: int = 518,
        name: str = "worldmirror",
        dpt_frames_chunk: int = 2,
        narrow_weights: bool = True,
        splats: bool = False,
    ) -> None:
        super().__init__(model, dtype, target_size, name, dpt_frames_chunk, narrow_weights)
        self.splats = splats

    def _prior_tensors(self, priors: Optional[FramePriors]) -> dict[str, torch.Tensor]:
        if priors is None:
            return {}
        device = next(self.model.parameters()).device
        given = {"poses_c2w": priors.poses_c2w, "intrinsics": priors.intrinsics, "depth": priors.depth}
        return {
            k: torch.from_numpy(np.asarray(v, np.float32))[None].to(device) for k, v in given.items() if v is not None
        }

    @torch.no_grad()
    def predict(self, images: torch.Tensor, priors: Optional[FramePriors] = None) -> FramePredictions:
        H, W = images.shape[-2:]
        heads = tuple(self.heads or ()) + (("gs",) if self.splats else ())
        out = _forward(
            self.model,
            images,
            self.dtype,
            heads=heads,
            dpt_frames_chunk=self.dpt_frames_chunk,
            **self._prior_tensors(priors),
        )
        w2c, K = w2c_intrinsics_from_pose_encoding(out["camera_params"][0].float(), (H, W))
        pred = FramePredictions(
            w2c_opencv=w2c.double().cpu().numpy(),
            intrinsics=K.double().cpu().numpy(),
            depth=out["depth"][0, ..., 0].float().cpu().numpy(),
            confidence=out["depth_conf"][0].float().cpu().numpy(),
            normals=out["normals"][0].float().cpu().numpy(),
            normals_confidence=out["normals_conf"][0].float().cpu().numpy(),
        )
        check_finite(self.name, pred.w2c_opencv, pred.intrinsics, pred.depth, pred.confidence, pred.normals)
        fov = out["camera_params"][0, :, 7:].float()
        if not bool(((fov > 0) & (fov < torch.pi)).all()):
            raise NonFiniteOutputError(
                f"{self.name} predicted a field of view outside (0, 180) degrees; check the weights"
            )
        if self.splats:
            pred.gaussians = pixel_gaussians(out, images, w2c[:, :3, :3])
        return pred


def pixel_gaussians(out: dict, images: torch.Tensor, R_w2c: torch.Tensor) -> PixelGaussians:
    """WorldMirror's raw per-pixel Gaussian parameters (batch element 0) as ``PixelGaussians``: activations as the
    reference applies them (normalised quaternion, ``exp`` scales clamped to ``MAX_SPLAT_SCALE``, sigmoid merge
    weight as the opacity, SH DC = the pixel colour's coefficient + the predicted residual), rotations moved from
    the network's world (camera 0) into each view's camera frame."""
    params = out["gs_params"][0].float()  # [S, H, W, 12]: quat 4, scale 3, opacity 1, SH residual 3, merge weight 1
    quats, scales, _, rest, weight = torch.split(params, [4, 3, 1, params.shape[-1] - 9, 1], dim=-1)
    q = quats / (quats.norm(dim=-1, keepdim=True) + 1e-8)  # w, x, y, z (as the reference hands them to gsplat)
    R_world = _quat_wxyz_to_matrix(q)
    R_cam = R_w2c.float().to(params.device)[:, None, None] @ R_world
    xyzw = matrix_to_quat_xyzw_torch(R_cam)
    colour = images.permute(0, 2, 3, 1).float().to(params.device)
    f_dc = (colour - 0.5) / SH_C0 + rest[..., :3]
    return PixelGaussians(
        depth=out["gs_depth"][0, ..., 0].float().cpu().numpy(),
        confidence=out["gs_depth_conf"][0].float().cpu().numpy(),
        quats_wxyz=torch.cat((xyzw[..., 3:], xyzw[..., :3]), dim=-1).cpu().numpy(),
        scales=scales.exp().clamp_max(MAX_SPLAT_SCALE).cpu().numpy(),
        opacity=torch.sigmoid(weight[..., 0]).cpu().numpy(),
        f_dc=f_dc.cpu().numpy(),
    )


def _quat_wxyz_to_matrix(q: torch.Tensor) -> torch.Tensor:
    from ns_extreme.geometry.rotations_torch import quat_xyzw_to_matrix_torch

    return quat_xyzw_to_matrix_torch(torch.cat((q[..., 1:], q[..., :1]), dim=-1))
