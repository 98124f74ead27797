"""WorldMirror's backbone and heads: VGGT's modules under WorldMirror's state-dict names, plus what WorldMirror adds
(prior encoders, the 3DGS head and its splat-parameter convolutions)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ns_extreme.models.layers import Linear, Mlp
from ns_extreme.models.vggt.aggregator import Aggregator
from ns_extreme.models.vggt.camera_head import CameraHead
from ns_extreme.models.vggt.dpt_head import DPTHead
from ns_extreme.models.worldmirror.config import WorldMirrorConfig


class _RenamedChildren:
    """Re-registers a VGGT module's parameters and submodules under WorldMirror's names (``RENAMES``: VGGT name ->
    WorldMirror name), so that ``state_dict()`` has the official WorldMirror keys, while VGGT's forward code, which
    reads the VGGT names, keeps running unchanged through ``__getattr__``. Nothing is registered twice."""

    RENAMES: dict[str, str] = {}
    ORDER: tuple[str, ...] = ()
    """Submodule registration order of the reference (the order of the keys in ``state_dict()``)."""

    def _rename_children(self) -> None:
        for old, new in self.RENAMES.items():
            for store in (self._parameters, self._modules):
                if old in store:
                    store[new] = store.pop(old)
        for name in self.ORDER:
            if name in self._modules:
                self._modules[name] = self._modules.pop(name)

    def __getattr__(self, name: str):
        return super().__getattr__(self.RENAMES.get(name, name))


class DepthPatchEmbed(nn.Module):
    """Depth map [N, 1, H, W] -> one token per patch [N, (H/p)(W/p), C]: pixel-unshuffle, then an MLP.

    The reference's ``PatchEmbed_Mlp(in_chans=1)``: the MLP sits at index 2 of ``proj`` (after the unshuffle and a
    permute), hence its keys ``depth_embed.proj.2.fc1/fc2``.
    """

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Identity(),  # the reference's channels-last permute, done in forward
            Mlp(patch_size * patch_size, 4 * embed_dim, embed_dim),
        )

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        x = self.proj[0](depth).permute(0, 2, 3, 1)  # [N, h, w, p*p]
        return self.proj[2](x).flatten(1, 2)


def token_mlp(in_features: int, dim: int) -> nn.Sequential:
    """Prior vector -> token: Linear - SiLU - Linear (keys ``.0`` and ``.2``)."""
    return nn.Sequential(Linear(in_features, dim), nn.SiLU(), Linear(dim, dim))


class VisualGeometryTransformer(_RenamedChildren, Aggregator):
    """VGGT's aggregator with WorldMirror's prior tokens.

    Token order per frame: camera, 4 registers, pose, ray, patches (``patch_start_idx`` = 7). The pose and ray
    tokens are zeros when their prior is absent, and they are *always* in the sequence: zeros still produce keys and
    values through the blocks' LayerNorm biases, so dropping them would change every output. Depth tokens are added to
    the DINOv2 patch tokens. Only the layers asked for (WorldMirror: ``dpt_taps``) are kept.
    """

    RENAMES = {"camera_token": "cam_token", "register_token": "reg_token"}
    ORDER = ("patch_embed", "pose_embed", "depth_embed", "ray_embed", "rope", "frame_blocks", "global_blocks")

    def __init__(self, cfg: WorldMirrorConfig) -> None:
        super().__init__(cfg)
        C = cfg.embed_dim
        self.pose_embed = token_mlp(7, C)
        self.depth_embed = DepthPatchEmbed(cfg.patch_size, C)
        self.ray_embed = token_mlp(4, C)
        self._rename_children()
        self.patch_start_idx = 1 + cfg.num_register_tokens + 2

    def forward(
        self,
        images: torch.Tensor,
        keep_layers,
        pose_vectors: Optional[torch.Tensor] = None,
        ray_vectors: Optional[torch.Tensor] = None,
        depth_maps: Optional[torch.Tensor] = None,
        pose_valid: Optional[torch.Tensor] = None,
        ray_valid: Optional[torch.Tensor] = None,
        depth_valid: Optional[torch.Tensor] = None,
    ) -> dict[int, torch.Tensor]:
        """images [B, S, 3, H, W]; normalised priors: pose vectors [B, S, 7], ray vectors [B, S, 4], depth maps
        [B, S, H, W]; ``*_valid`` [B, S] bool marks the views that have that prior (others get the zero token).
        Returns {layer: [B, S, P, 2C]} for ``keep_layers``."""
        B, S, _, H, W = images.shape
        C = self.cam_token.shape[-1]
        p = self.patch_size
        zeros = images.new_zeros(B * S, 1, C)
        pose = self._token(self.pose_embed, pose_vectors, pose_valid, zeros)
        ray = self._token(self.ray_embed, ray_vectors, ray_valid, zeros)
        offset = None
        if depth_maps is not None:
            offset = self.depth_embed(depth_maps.reshape(B * S, 1, H, W).to(images.dtype))
            if depth_valid is not None:
                offset = offset * depth_valid.reshape(B * S, 1, 1).to(offset.dtype)
            assert offset.shape[1] == (H // p) * (W // p)
        return super().forward(images, keep_layers, extra_tokens=torch.cat((pose, ray), dim=1), patch_offset=offset)

    @staticmethod
    def _token(
        mlp: nn.Module, vectors: Optional[torch.Tensor], valid: Optional[torch.Tensor], zeros: torch.Tensor
    ) -> torch.Tensor:
        if vectors is None:
            return zeros
        token = mlp(vectors.reshape(zeros.shape[0], -1).to(zeros.dtype)).unsqueeze(1)
        if valid is not None:
            token = torch.where(valid.reshape(-1, 1, 1), token, zeros)
        return token


class WorldMirrorCameraHead(_RenamedChildren, CameraHead):
    """VGGT's camera head (same math: 4 adaLN-modulated refinement steps of the 9-d pose encoding of the
    world-to-camera matrix) under WorldMirror's names."""

    RENAMES = {
        "trunk": "refine_net",
        "trunk_norm": "out_norm",
        "empty_pose_tokens": "init_token",
        "embed_pose": "param_embed",
        "poseLN_modulation": "adapt_norm_gen",
        "adaln_norm": "adapt_norm",
        "pose_branch": "param_predictor",
    }
    ORDER = ("refine_net", "token_norm", "out_norm", "param_embed", "adapt_norm_gen", "adapt_norm", "param_predictor")

    def __init__(self, dim: int, trunk_depth: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__(dim, trunk_depth, num_heads, mlp_ratio)
        self._rename_children()


class GaussianDPTHead(DPTHead):
    """The 3DGS DPT head: depth for the splat centres (``exp``) with its confidence, plus per-pixel splat features
    = the fused DPT map + ``input_merger`` (7x7 conv + ReLU) of the raw image in [0, 1]."""

    def __init__(self, dim_in: int, patch_size: int, features: int, out_channels, taps) -> None:
        super().__init__(dim_in, patch_size, 2, "exp", features, out_channels, taps)
        self.input_merger = nn.Sequential(nn.Conv2d(3, features // 2, 7, padding=3), nn.ReLU())

    def forward(
        self,
        layers: dict[int, torch.Tensor],
        patch_start: int,
        images: torch.Tensor,
        frames_chunk: int = 8,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (features [B, S, features/2, H, W], depth [B, S, H, W, 1], confidence [B, S, H, W])."""
        B, S, _, H, W = images.shape
        chunk = frames_chunk if frames_chunk and frames_chunk > 0 else S
        cache: dict = {}
        feats, outs = [], []
        for s in range(0, S, chunk):
            fused = self._fused({t: layers[t][:, s : s + chunk] for t in self.taps}, patch_start, (H, W), cache)
            outs.append(self.scratch.output_conv2(fused).view(B, -1, 2, H, W))
            merged = fused + self.input_merger(images[:, s : s + chunk].reshape(-1, 3, H, W))
            feats.append(merged.view(B, -1, *merged.shape[1:]))
        out = torch.cat(outs, dim=1).permute(0, 1, 3, 4, 2)
        return torch.cat(feats, dim=1), torch.exp(out[..., :-1]), 1 + torch.exp(out[..., -1])


class SplatParamHead(nn.Module):
    """``gs_renderer``: splat features [N, F/2, H, W] -> 12 raw Gaussian parameters per pixel (quaternion 4,
    log-scale 3, opacity logit 1, colour SH residual 3 * (sh_degree+1)², merge-weight logit 1)."""

    def __init__(self, features: int, sh_degree: int) -> None:
        super().__init__()
        self.num_sh = (sh_degree + 1) ** 2
        channels = 4 + 3 + 1 + 3 * self.num_sh + 1
        self.gs_head = nn.Sequential(
            nn.Conv2d(features // 2, features, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(features, channels, 1)
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.gs_head(feats)


SH_C0 = 0.28209479177387814
"""Degree-0 spherical-harmonics constant: colour = SH * SH_C0 + 0.5."""


def splats_from_gaussian_params(
    params: torch.Tensor,
    images: torch.Tensor,
    gs_depth: torch.Tensor,
    c2w: torch.Tensor,
    K: torch.Tensor,
    num_sh: int,
    voxel_size: float,
) -> dict[str, list[torch.Tensor]]:
    """The reference's inference-time splats: per pixel one Gaussian centred at ``gs_depth`` back-projected with the
    predicted camera, then merged per voxel of ``voxel_size`` (weighted by the predicted merge weights).

    params [B*S, 12, H, W]; images [B, S, 3, H, W]; gs_depth [B, S, H, W, 1]; c2w [B, S, 4, 4]; K [B, S, 3, 3].
    Returns lists (one entry per batch element) of ``means [K, 3]``, ``sh [K, num_sh, 3]``, ``opacities [K]``,
    ``scales [K, 3]``, ``quats [K, 4]`` (unit; handed to gsplat as they are, i.e. in its w, x, y, z order).
    """
    B, S, _, H, W = images.shape
    N = S * H * W
    # Channels-last, then split: the layout the reference's reductions see (bit-identical results).
    p = params.permute(0, 2, 3, 1).contiguous().reshape(B, S, H, W, -1)
    quats, scales, opacities, residual_sh, weights = torch.split(p, [4, 3, 1, 3 * num_sh, 1], dim=-1)
    quats = quats.reshape(B, N, 4)
    quats = quats / (quats.norm(dim=-1, keepdim=True) + 1e-8)
    scales = scales.reshape(B, N, 3).exp().clamp_max(0.3)
    opacities = opacities.reshape(B, N).sigmoid()
    sh = residual_sh.reshape(B, N, num_sh, 3).clone()
    sh[..., 0, :] = sh[..., 0, :] + (images.permute(0, 1, 3, 4, 2).reshape(B, N, 3) - 0.5) / SH_C0
    weights = weights.reshape(B, N).sigmoid()
    means = _backproject(gs_depth.reshape(B * S, H, W), c2w.reshape(B * S, 4, 4), K.reshape(B * S, 3, 3))
    means = means.reshape(B, N, 3)
    out: dict[str, list[torch.Tensor]] = {"means": [], "sh": [], "opacities": [], "scales": [], "quats": []}
    for b in range(B):
        merged = _voxel_merge(means[b], quats[b], scales[b], opacities[b], sh[b], weights[b], voxel_size)
        for key in out:
            out[key].append(merged[key])
    return out


def _backproject(depth: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """depth [N, H, W], c2w [N, 4, 4], K [N, 3, 3] -> world points [N, H, W, 3] (OpenCV pinhole)."""
    N, H, W = depth.shape
    v, u = torch.meshgrid(
        torch.arange(H, dtype=depth.dtype, device=depth.device),
        torch.arange(W, dtype=depth.dtype, device=depth.device),
        indexing="ij",
    )
    K = K.float()
    fx, fy, cx, cy = (K[:, i, j].view(N, 1, 1) for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    cam = torch.stack(((u[None] - cx) * depth / fx, (v[None] - cy) * depth / fy, depth), dim=-1)
    return torch.einsum("nhwi,nji->nhwj", cam, c2w[:, :3, :3]) + c2w[:, None, None, :3, 3]


def _voxel_merge(means, quats, scales, opacities, sh, weights, voxel_size: float) -> dict[str, torch.Tensor]:
    """Gaussians sharing a voxel become one: weight-averaged centre, colour, scale and quaternion (renormalised);
    opacity = sum(w²) / sum(w)."""
    voxels = (means / voxel_size).floor().long()
    voxels = voxels - voxels.min(dim=0).values
    dims = voxels.max(dim=0).values + 1
    flat = voxels[:, 0] * dims[1] * dims[2] + voxels[:, 1] * dims[2] + voxels[:, 2]
    _, inverse = torch.unique(flat, return_inverse=True)
    K = int(inverse.max()) + 1 if inverse.numel() else 0

    def weighted_sum(x: torch.Tensor) -> torch.Tensor:
        # Column by column with scatter_add_, as the reference: the same summation order, the same float32 result.
        columns = x.reshape(x.shape[0], -1)
        total = columns.new_zeros(K, columns.shape[1])
        for c in range(columns.shape[1]):
            total[:, c].scatter_add_(0, inverse, columns[:, c] * weights)
        return total.reshape(K, *x.shape[1:])

    weight_sums = weights.new_zeros(K).scatter_add_(0, inverse, weights).clamp(min=1e-8)
    merged_quats = weighted_sum(quats)
    return {
        "means": weighted_sum(means) / weight_sums[:, None],
        "sh": weighted_sum(sh) / weight_sums[:, None, None],
        "opacities": weights.new_zeros(K).scatter_add_(0, inverse, weights * weights) / weight_sums,
        "scales": weighted_sum(scales) / weight_sums[:, None],
        "quats": merged_quats / merged_quats.norm(dim=1, keepdim=True).clamp(min=1e-8),
    }
