"""π³'s output side: small per-frame transformer decoders, pixel-shuffle linear heads and the camera head."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ns_extreme.models.layers import Block, RotaryPositionEmbedding2D


def reference_key_order(block: Block) -> Block:
    """Register ``attn.q_norm``/``attn.k_norm`` after ``attn.proj``, the order of π³'s checkpoint
    (VGGT stores them before ``proj``). Only the state-dict order changes, not the computation."""
    modules = block.attn._modules
    for name in ("q_norm", "k_norm"):
        modules[name] = modules.pop(name)
    return block


def pi3_block(
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    rope: RotaryPositionEmbedding2D,
    init_values: Optional[float] = None,
    qk_norm: bool = False,
) -> Block:
    """A π³ transformer block: LayerNorm eps 1e-6, qk-norm (if any) LayerNorm eps 1e-5, 2D RoPE."""
    return reference_key_order(
        Block(dim, num_heads, mlp_ratio, init_values=init_values, norm_eps=1e-6, qk_norm=qk_norm, rope=rope)
    )


def run_block(block: nn.Module, x: torch.Tensor, pos: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, pos, use_reentrant=False)
    return block(x, pos=pos)


class FrameDecoder(nn.Module):
    """Linear projection, ``depth`` per-frame RoPE blocks (no LayerScale, no qk-norm), linear output."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        rope: RotaryPositionEmbedding2D,
    ) -> None:
        super().__init__()
        self.projects = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(pi3_block(dim, num_heads, mlp_ratio, rope) for _ in range(depth))
        self.linear_out = nn.Linear(dim, out_dim)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.projects(x)
        for block in self.blocks:
            x = run_block(block, x, pos, self.gradient_checkpointing)
        return self.linear_out(x)


class PixelShuffleHead(nn.Module):
    """Each patch token → ``channels × patch²`` values laid out as that patch's pixels (pixel shuffle)."""

    def __init__(self, dim: int, channels: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, channels * patch_size**2)

    def forward(self, tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """tokens [N, rows*cols, dim] → [N, rows*p, cols*p, channels]."""
        x = self.proj(tokens)
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], rows, cols)
        return F.pixel_shuffle(x, self.patch_size).permute(0, 2, 3, 1)


class ResidualMlp(nn.Module):
    """x + relu(l3(relu(l2(relu(l1(x)))))): the camera head's 'res_conv' block (1x1 convolutions as linears)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.res_conv1 = nn.Linear(dim, dim)
        self.res_conv2 = nn.Linear(dim, dim)
        self.res_conv3 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.res_conv1(x))
        y = F.relu(self.res_conv2(y))
        return x + F.relu(self.res_conv3(y))


class _SpecialProcrustes(torch.autograd.Function):
    """R = U·diag(1, 1, det(UVᵀ))·Vᵀ of M = U S Vᵀ, with the gradient of the polar factor.

    torch's generic SVD backward divides by s_i² − s_j², so it returns NaN/Inf when singular values repeat,
    e.g. for a head output that is already (close to) a rotation. The rotation depends only on the sums
    s_i + s_j: with S' = S·diag(1, 1, d), dR = U' [(X − Xᵀ) ∘ F] Vᵀ, X = U'ᵀ dM V, F_ij = 1 / (s'_i + s'_j)
    (Levinson et al. 2020, "An Analysis of SVD for Deep Rotation Estimation"). The forward is unchanged.
    """

    @staticmethod
    def forward(ctx, m: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        U, S, Vh = torch.linalg.svd(m)
        d = torch.det(U @ Vh)
        D = torch.cat((torch.ones_like(S[:, :2]), d[:, None]), dim=1)
        U_special = U * D[:, None, :]
        ctx.save_for_backward(U_special, S * D, Vh)
        return U_special @ Vh

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        U, S, Vh = ctx.saved_tensors
        Y = U.transpose(-1, -2) @ grad @ Vh.transpose(-1, -2)
        sums = S[:, :, None] + S[:, None, :]
        tiny = torch.finfo(sums.dtype).eps
        F_ = 1.0 / torch.where(sums.abs() < tiny, torch.full_like(sums, tiny), sums)  # only near a reflection
        return U @ ((Y - Y.transpose(-1, -2)) * F_) @ Vh


def orthogonalise(m: torch.Tensor) -> torch.Tensor:
    """[N, 9] → nearest rotations [N, 3, 3] to the row-normalised 3×3 matrices (SVD, determinant +1)."""
    return _SpecialProcrustes.apply(F.normalize(m.reshape(-1, 3, 3), p=2, dim=-1))


class CameraHead(nn.Module):
    """Patch features [N, hw, dim] → camera-to-world [N, 4, 4] (OpenCV axes): 2 residual MLPs per patch,
    average over patches, 2-layer MLP, then a 3-d translation and a 9-d rotation made orthonormal by SVD."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.res_conv = nn.ModuleList(ResidualMlp(dim) for _ in range(2))
        self.more_mlps = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_rot = nn.Linear(dim, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res_conv:
            x = block(x)
        x = self.more_mlps(x.mean(dim=1))
        translation = self.fc_t(x).float()
        rotation = orthogonalise(self.fc_rot(x).float())
        pose = torch.zeros(x.shape[0], 4, 4, dtype=torch.float32, device=x.device)
        pose[:, :3, :3] = rotation
        pose[:, :3, 3] = translation
        pose[:, 3, 3] = 1.0
        return pose
