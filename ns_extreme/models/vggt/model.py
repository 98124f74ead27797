"""VGGT: images -> camera pose encodings, depth maps and world point maps (Wang et al., CVPR 2025)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn

from ns_extreme.models.heads import batched_images, check_heads_present, drop_heads
from ns_extreme.models.vggt.aggregator import Aggregator
from ns_extreme.models.vggt.camera_head import CameraHead
from ns_extreme.models.vggt.config import VGGTConfig
from ns_extreme.models.vggt.dpt_head import DPTHead

HEADS = ("camera", "depth", "points")
HEAD_MODULES = {"camera": ("camera_head",), "depth": ("depth_head",), "points": ("point_head",)}
FLOAT32_MODULES = tuple(attr for attrs in HEAD_MODULES.values() for attr in attrs)
"""Submodules whose weights stay float32 under every precision (they compute in float32, as the reference)."""


class VGGT(nn.Module):
    float32_modules = FLOAT32_MODULES

    def __init__(self, cfg: VGGTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or VGGTConfig()
        self.aggregator = Aggregator(cfg)
        dim = 2 * cfg.embed_dim
        self.camera_head = CameraHead(dim, cfg.camera_trunk_depth, cfg.camera_num_heads, cfg.mlp_ratio)
        dpt = dict(
            patch_size=cfg.patch_size, features=cfg.dpt_features, out_channels=cfg.dpt_out_channels, taps=cfg.dpt_taps
        )
        self.point_head = DPTHead(dim, output_dim=4, activation="inv_log", **dpt)
        self.depth_head = DPTHead(dim, output_dim=2, activation="exp", **dpt)

    def drop_heads(self, keep: Iterable[str]) -> list[str]:
        """Remove the heads not in ``keep`` (their weights are then neither loaded nor kept in memory: the posing
        pipeline needs only camera + depth, which saves the 32.7 M-parameter point head). Returns the
        state-dict prefixes removed."""
        return drop_heads(self, keep, HEAD_MODULES)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.aggregator.gradient_checkpointing = enabled
        self.aggregator.patch_embed.gradient_checkpointing = enabled

    def forward(
        self,
        images: torch.Tensor,
        heads: Iterable[str] = HEADS,
        dpt_frames_chunk: Optional[int] = None,
        dense_heads_autocast: bool = False,
    ) -> dict[str, torch.Tensor]:
        """images [S, 3, H, W] or [B, S, 3, H, W] in [0, 1], H and W multiples of the patch size.

        ``dpt_frames_chunk`` overrides ``cfg.dpt_frames_chunk`` (frames per DPT pass: smaller = less memory).

        Precision (the reference's recipe, facebookresearch/vggt ``VGGT.forward``): under a caller's autocast only
        the aggregator runs narrow; the heads run in float32 with autocast disabled, on float32 tokens, with
        float32 weights (:data:`FLOAT32_MODULES` are never narrowed by ``store_weights_in``).
        ``dense_heads_autocast`` leaves the depth and point heads under the caller's autocast (measured in
        benchmarks/README.md; not the default). The camera head is always float32.

        Returns (for the requested heads) ``pose_enc [B,S,9]`` (world-to-camera, OpenCV, world = frame 0),
        ``pose_enc_list``, ``depth [B,S,H,W,1]``, ``depth_conf [B,S,H,W]``, ``world_points [B,S,H,W,3]``,
        ``world_points_conf [B,S,H,W]``.
        """
        heads = tuple(heads)
        check_heads_present(self, heads, HEAD_MODULES)
        images = batched_images(images, self.cfg.patch_size)
        H, W = images.shape[-2:]

        last = self.cfg.depth - 1
        keep = set(self.cfg.dpt_taps) if {"depth", "points"} & set(heads) else set()
        if "camera" in heads:
            keep.add(last)
        layers = self.aggregator(images, keep)
        start = self.aggregator.patch_start_idx
        out: dict[str, torch.Tensor] = {}
        device = images.device.type
        if "camera" in heads:
            with torch.autocast(device_type=device, enabled=False):
                encodings = self.camera_head(layers[last][:, :, 0].float(), self.cfg.camera_iterations)
            out["pose_enc"], out["pose_enc_list"] = encodings[-1], encodings
        chunk = self.cfg.dpt_frames_chunk if dpt_frames_chunk is None else dpt_frames_chunk
        dense = contextlib.nullcontext() if dense_heads_autocast else torch.autocast(device_type=device, enabled=False)
        with dense:
            taps = layers if dense_heads_autocast else {k: v.float() for k, v in layers.items()}
            if "depth" in heads:
                out["depth"], out["depth_conf"] = self.depth_head(taps, start, (H, W), chunk)
            if "points" in heads:
                out["world_points"], out["world_points_conf"] = self.point_head(taps, start, (H, W), chunk)
        return out
