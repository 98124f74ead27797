"""WorldMirror's prior normalisation, ported exactly from the reference (``src/models/utils/priors.py`` and
``WorldMirror.extract_priors`` at cce2f2fc), as pure functions.

Differences, all for inputs the reference mishandles: nothing is modified in place (the reference overwrites the
caller's poses when they hold NaN), and views flagged as without a prior (``valid``) take no part in the pose
statistics (the reference's own validity mask is dead code: it replaces NaN by 0 first).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ns_extreme.geometry.rotations_torch import matrix_to_quat_xyzw_torch

POSE_PADDING = 0.1
"""Normalised camera centres span [POSE_PADDING, 1 - POSE_PADDING] along their largest axis."""
POSE_QUANTILE_MIN_VIEWS = 11
"""From this many views on, the pose bounds are the 5 % / 95 % quantiles per axis, below it the min / max."""
DEPTH_QUANTILE_MIN_PIXELS = 101
"""From this many usable pixels on, the depth bounds are the 1 % / 99 % quantiles, below it the min / max."""


def normalize_c2w_translations(c2w: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Camera-to-world poses [B, S, 3 or 4, 4] -> [B, S, 3, 4] with the camera centres of each batch element
    mapped into the unit cube (rotations untouched).

    Per batch element: bounds = min / max of the centres of the ``valid`` views ([B, S] bool, default all), or their
    5 % / 95 % quantiles from ``POSE_QUANTILE_MIN_VIEWS`` views on; scale = the largest axis range (at least 1e-6);
    ``t' = clamp((t - centre) / (scale / 0.8) + 0.5, 0, 1)``. NaN -> 0 and ±Inf -> ±1e6 first, as the reference does.
    """
    ext = torch.nan_to_num(c2w[..., :3, :4], nan=0.0, posinf=1e6, neginf=-1e6)
    out = ext.clone()
    for b in range(ext.shape[0]):
        positions = ext[b, :, :, 3]
        used = positions if valid is None else positions[valid[b]]
        if used.shape[0] == 0:
            out[b, :, :, 3] = 0.5
            continue
        if used.shape[0] >= POSE_QUANTILE_MIN_VIEWS:
            lo, hi = torch.quantile(used, 0.05, dim=0), torch.quantile(used, 0.95, dim=0)
        else:
            lo, hi = used.min(dim=0).values, used.max(dim=0).values
        eps = torch.maximum(torch.tensor(1e-6, device=ext.device), hi.abs() * 1e-6)
        scale = torch.maximum(hi - lo, eps).max().clamp(min=1e-6, max=1e6)
        centre = (lo + hi) / 2.0
        out[b, :, :, 3] = torch.clamp((positions - centre) / (scale / (1 - 2 * POSE_PADDING)) + 0.5, 0.0, 1.0)
    return out


def pose_prior_vectors(c2w: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, S, 7] = normalised camera centre and camera-to-world rotation as a quaternion (x, y, z, w; w >= 0):
    the input of the pose-token MLP."""
    ext = normalize_c2w_translations(c2w, valid)
    return torch.cat((ext[..., :3, 3], matrix_to_quat_xyzw_torch(ext[..., :3, :3])), dim=-1).float()


def ray_prior_vectors(K: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Intrinsics [B, S, 3, 3] in pixels of the (H, W) network input -> [B, S, 4] = (fx/W, fy/H, cx/W, cy/H):
    the input of the ray-token MLP."""
    H, W = image_hw
    return torch.stack((K[..., 0, 0] / W, K[..., 1, 1] / H, K[..., 0, 2] / W, K[..., 1, 2] / H), dim=-1)


def normalize_depth(depth: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Depth maps [B, S, H, W] -> [B, S, H, W] in [0, 1], each map on its own (the scale is lost).

    NaN and -Inf -> 0, +Inf -> 1e6; pixels <= 0 are invalid and take no part in the bounds (unless all are), and
    end up at 0. Bounds: the 1 % / 99 % quantiles of the valid pixels from ``DEPTH_QUANTILE_MIN_PIXELS`` on, else
    their min / max; equal bounds widen to (min, min + 1).
    """
    B, S, H, W = depth.shape
    flat = torch.nan_to_num(depth, nan=0.0, posinf=1e6, neginf=0.0).reshape(B * S, H, W)
    maps = []
    for image in flat:
        values = image.flatten()
        positive = values[values > 0]
        used = positive if positive.numel() > 0 else values
        if used.numel() >= DEPTH_QUANTILE_MIN_PIXELS:
            lo, hi = torch.quantile(used, 0.01), torch.quantile(used, 0.99)
        else:
            lo, hi = used.min(), used.max()
        if hi == lo:
            hi = lo + 1.0
        margin = max(eps, torch.abs(hi - lo).item() * eps)
        maps.append(torch.clamp((image - lo) / (hi - lo + margin), 0.0, 1.0))
    return torch.stack(maps).reshape(B, S, H, W)


def resize_depth(depth: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """[B, S, h, w] -> [B, S, H, W], bilinear (align_corners=False) as the reference; unchanged at the same size."""
    if tuple(depth.shape[-2:]) == tuple(image_hw):
        return depth
    return F.interpolate(depth, size=tuple(image_hw), mode="bilinear", align_corners=False)
