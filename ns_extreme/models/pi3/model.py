"""π³: permutation-equivariant visual geometry (Wang et al., 2025) — images → local point maps, confidence
logits and camera-to-world poses, with no reference view.

Layout (names as in the official checkpoint ``yyfz233/Pi3``): ``encoder`` (DINOv2 ViT-L/14 with registers,
no mask token) → 5 ``register_token`` per frame → ``decoder`` (36 blocks alternating per-frame / all-frames
attention, 2D RoPE) → features = cat(output of the last frame block, output of the last global block) →
three per-frame decoders (``point_decoder``, ``conf_decoder``, ``camera_decoder``) → linear heads.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ns_extreme.models.dinov2 import DinoV2
from ns_extreme.models.heads import batched_images, check_heads_present, drop_heads
from ns_extreme.models.layers import RotaryPositionEmbedding2D, patch_positions
from ns_extreme.models.pi3.config import Pi3Config
from ns_extreme.models.pi3.heads import CameraHead, FrameDecoder, PixelShuffleHead, pi3_block, run_block

HEADS = ("points", "conf", "camera")
"""points: ``local_points`` (and the global ``points`` when the camera head runs too); conf: ``conf``;
camera: ``camera_poses``."""

HEAD_MODULES = {
    "points": ("point_decoder", "point_head"),
    "conf": ("conf_decoder", "conf_head"),
    "camera": ("camera_decoder", "camera_head"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return x.to(next(module.parameters()).dtype)


class Pi3(nn.Module):
    float32_modules = ("point_head", "conf_head", "camera_head")
    """Run in float32 with autocast disabled, as the reference's ``Pi3.forward``; their weights are never narrowed."""

    def __init__(self, cfg: Pi3Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or Pi3Config()
        C = cfg.embed_dim
        # Registration order = state-dict order of the official checkpoint.
        self.register_token = nn.Parameter(torch.zeros(1, 1, cfg.num_register_tokens, C))
        # Persistent buffers: they are part of the official state dict.
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.encoder = DinoV2(
            cfg.img_size,
            cfg.patch_size,
            C,
            cfg.encoder_depth,
            cfg.encoder_num_heads,
            cfg.encoder_register_tokens,
            cfg.mlp_ratio,
            with_mask_token=False,
        )
        self.rope = RotaryPositionEmbedding2D(cfg.rope_frequency)
        self.decoder = nn.ModuleList(
            pi3_block(C, cfg.num_heads, cfg.mlp_ratio, self.rope, init_values=cfg.init_values, qk_norm=True)
            for _ in range(cfg.depth)
        )
        head = dict(
            dim=cfg.head_embed_dim,
            depth=cfg.head_depth,
            num_heads=cfg.head_num_heads,
            mlp_ratio=cfg.mlp_ratio,
            rope=self.rope,
        )
        self.point_decoder = FrameDecoder(2 * C, out_dim=cfg.head_embed_dim, **head)
        self.point_head = PixelShuffleHead(cfg.head_embed_dim, 3, cfg.patch_size)
        self.conf_decoder = FrameDecoder(2 * C, out_dim=cfg.head_embed_dim, **head)
        self.conf_head = PixelShuffleHead(cfg.head_embed_dim, 1, cfg.patch_size)
        self.camera_decoder = FrameDecoder(2 * C, out_dim=cfg.camera_dim, **head)
        self.camera_head = CameraHead(cfg.camera_dim)
        self.patch_start_idx = cfg.num_register_tokens
        self.gradient_checkpointing = False

    def drop_heads(self, keep: Iterable[str]) -> list[str]:
        """Remove the decoders and linear heads not in ``keep``; returns the state-dict prefixes removed."""
        return drop_heads(self, keep, HEAD_MODULES)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = enabled
        self.encoder.gradient_checkpointing = enabled
        for decoder in (self.point_decoder, self.conf_decoder, self.camera_decoder):
            if decoder is not None:
                decoder.gradient_checkpointing = enabled

    def decode(
        self, patches: torch.Tensor, batch: int, frames: int, rows: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder tokens [B*S, hw, C] → (features [B*S, P, 2C], RoPE positions [B*S, P, 2]), P = registers + hw."""
        B, S = batch, frames
        registers = self.register_token.expand(B * S, 1, -1, -1).reshape(B * S, -1, patches.shape[-1])
        x = torch.cat((registers.to(patches.dtype), patches), dim=1)
        P, C = x.shape[1], x.shape[2]
        pos = patch_positions(B * S, rows, cols, self.patch_start_idx, patches.device)
        pos_global = pos.reshape(B, S * P, 2)
        last = len(self.decoder) - 1
        frame_out = None
        for i, block in enumerate(self.decoder):
            if i % 2 == 0:  # attention within each frame
                x = run_block(block, x.reshape(B * S, P, C), pos, self.gradient_checkpointing)
            else:  # attention across all frames of a sequence
                x = run_block(block, x.reshape(B, S * P, C), pos_global, self.gradient_checkpointing)
            if i == last - 1:
                frame_out = x.reshape(B * S, P, C)
        assert frame_out is not None
        return torch.cat((frame_out, x.reshape(B * S, P, C)), dim=-1), pos

    def forward(self, images: torch.Tensor, heads: Iterable[str] = HEADS) -> dict[str, torch.Tensor]:
        """images [S, 3, H, W] or [B, S, 3, H, W] in [0, 1], H and W multiples of the patch size.

        Returns (for the requested heads) ``local_points [B,S,H,W,3]`` (camera frame, OpenCV), ``points
        [B,S,H,W,3]`` (world; needs the camera head), ``conf [B,S,H,W,1]`` (logits; sigmoid → probability),
        ``camera_poses [B,S,4,4]`` (camera-to-world, OpenCV). The world and its scale are arbitrary: only
        relative poses are defined. The linear heads, exp and SVD run in fp32 even under autocast.
        """
        heads = tuple(heads)
        check_heads_present(self, heads, HEAD_MODULES)
        images = batched_images(images, self.cfg.patch_size)
        B, S, _, H, W = images.shape
        p = self.cfg.patch_size
        rows, cols = H // p, W // p

        x = (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)
        patches = self.encoder(x.reshape(B * S, 3, H, W))
        features, pos = self.decode(patches, B, S, rows, cols)

        start = self.patch_start_idx
        hidden = {}
        if "points" in heads:
            hidden["points"] = self.point_decoder(features, pos)[:, start:]
        if "conf" in heads:
            hidden["conf"] = self.conf_decoder(features, pos)[:, start:]
        if "camera" in heads:
            hidden["camera"] = self.camera_decoder(features, pos)[:, start:]

        out: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=images.device.type, enabled=False):
            if "points" in hidden:
                raw = self.point_head(_as(hidden["points"], self.point_head), rows, cols).float()
                xy, z = raw.reshape(B, S, H, W, 3).split((2, 1), dim=-1)
                z = torch.exp(z)
                out["local_points"] = torch.cat((xy * z, z), dim=-1)
            if "conf" in hidden:
                out["conf"] = (
                    self.conf_head(_as(hidden["conf"], self.conf_head), rows, cols).float().reshape(B, S, H, W, 1)
                )
            if "camera" in hidden:
                out["camera_poses"] = self.camera_head(_as(hidden["camera"], self.camera_head)).reshape(B, S, 4, 4)
            if "local_points" in out and "camera_poses" in out:
                T = out["camera_poses"]
                out["points"] = (
                    torch.einsum("bsij,bshwj->bshwi", T[..., :3, :3], out["local_points"]) + T[:, :, None, None, :3, 3]
                )
        return out
