"""VGGT's alternating-attention aggregator: DINOv2 patch tokens, then frame / global blocks."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from ns_extreme.models.dinov2 import DinoV2
from ns_extreme.models.layers import Block, RopeTables, RotaryPositionEmbedding2D, patch_positions
from ns_extreme.models.vggt.config import VGGTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def first_and_others(token: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """[1, 2, n, C] learned token -> [batch*frames, n, C]: slot 0 for frame 0, slot 1 for the others."""
    first = token[:, :1].expand(batch, 1, *token.shape[2:])
    others = token[:, 1:].expand(batch, frames - 1, *token.shape[2:])
    return torch.cat((first, others), dim=1).reshape(batch * frames, *token.shape[2:])


class Aggregator(nn.Module):
    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.patch_embed = DinoV2(
            cfg.img_size, cfg.patch_size, C, cfg.dino_depth, cfg.dino_num_heads, cfg.num_register_tokens, cfg.mlp_ratio
        )
        self.rope = RotaryPositionEmbedding2D(cfg.rope_frequency)
        block = lambda: Block(C, cfg.num_heads, cfg.mlp_ratio, init_values=0.01, qk_norm=True, rope=self.rope)  # noqa: E731
        self.frame_blocks = nn.ModuleList(block() for _ in range(cfg.depth))
        self.global_blocks = nn.ModuleList(block() for _ in range(cfg.depth))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, C))
        self.register_token = nn.Parameter(torch.zeros(1, 2, cfg.num_register_tokens, C))
        self.patch_start_idx = 1 + cfg.num_register_tokens
        self.gradient_checkpointing = False

    def _run(self, block: Block, x: torch.Tensor, pos: Union[torch.Tensor, RopeTables]) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, pos, use_reentrant=False)
        return block(x, pos=pos)

    def forward(
        self,
        images: torch.Tensor,
        keep_layers: Iterable[int],
        extra_tokens: Optional[torch.Tensor] = None,
        patch_offset: Optional[torch.Tensor] = None,
    ) -> dict[int, torch.Tensor]:
        """images [B, S, 3, H, W] in [0, 1] -> {layer: [B, S, P, 2C]} for the requested layers only.

        Each kept tensor is the frame-block output concatenated with the global-block output of that layer;
        P = 1 camera + registers (+ extra tokens) + patches. Not keeping the other layers is what bounds memory.
        ``extra_tokens`` [B*S, n, C] go after the registers and ``patch_offset`` [B*S, patches, C] is added to the
        DINOv2 patch tokens (WorldMirror's prior tokens; VGGT passes neither). ``patch_start_idx`` must count them.
        """
        B, S, _, H, W = images.shape
        keep = set(keep_layers)
        # Constants rather than buffers so that a model built on the meta device needs nothing but its weights.
        mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 1, 3, 1, 1)
        x = (images - mean) / std
        patches = self.patch_embed(x.reshape(B * S, 3, H, W))
        if patch_offset is not None:
            patches = patches + patch_offset.to(patches.dtype)
        special = [first_and_others(self.camera_token, B, S), first_and_others(self.register_token, B, S)]
        if extra_tokens is not None:
            special.append(extra_tokens)
        tokens = torch.cat([t.to(patches.dtype) for t in special] + [patches], dim=1)
        P, C = tokens.shape[1], tokens.shape[2]
        pos = patch_positions(B * S, H // self.patch_size, W // self.patch_size, self.patch_start_idx, images.device)
        # cos/sin rows gathered once and shared by all 48 blocks (and by q and k).
        pos_global = self.rope.tables(pos.reshape(B, S * P, 2))
        pos = self.rope.tables(pos)
        kept: dict[int, torch.Tensor] = {}
        for i, (frame_block, global_block) in enumerate(zip(self.frame_blocks, self.global_blocks)):
            tokens = self._run(frame_block, tokens.reshape(B * S, P, C), pos)
            frame_out = tokens.reshape(B, S, P, C)
            tokens = self._run(global_block, tokens.reshape(B, S * P, C), pos_global)
            if i in keep:
                kept[i] = torch.cat((frame_out, tokens.reshape(B, S, P, C)), dim=-1)
        return kept
