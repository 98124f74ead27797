"""VGGT camera head: iterative adaLN-modulated refinement of the 9-d pose encoding from camera tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ns_extreme.models.layers import Block, Linear, Mlp

POSE_ENCODING_DIM = 9  # [tx, ty, tz, qx, qy, qz, qw, fov_h, fov_w]


def activate_pose_encoding(raw: torch.Tensor) -> torch.Tensor:
    """Translation and quaternion pass through; field-of-view angles go through ReLU."""
    return torch.cat((raw[..., :7], F.relu(raw[..., 7:])), dim=-1)


class CameraHead(nn.Module):
    def __init__(self, dim: int, trunk_depth: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*(Block(dim, num_heads, mlp_ratio, init_values=0.01) for _ in range(trunk_depth)))
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_ENCODING_DIM))
        self.embed_pose = Linear(POSE_ENCODING_DIM, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 3 * dim))
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, POSE_ENCODING_DIM)

    def forward(self, camera_tokens: torch.Tensor, iterations: int = 4) -> list[torch.Tensor]:
        """camera_tokens [B, S, dim] (the camera token of the last aggregator layer) -> list of [B, S, 9]."""
        tokens = self.token_norm(camera_tokens)
        B, S, _ = tokens.shape
        raw = None
        encodings = []
        for _ in range(iterations):
            # Later iterations condition on the detached raw (pre-activation) running estimate.
            condition = self.empty_pose_tokens.expand(B, S, -1) if raw is None else raw.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(condition)).chunk(3, dim=-1)
            y = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(y)))
            raw = delta if raw is None else raw + delta
            encodings.append(activate_pose_encoding(raw))
        return encodings
