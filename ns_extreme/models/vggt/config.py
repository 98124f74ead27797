"""Sizes of a VGGT model. ``VGGTConfig()`` is VGGT-1B; ``VGGTConfig.tiny()`` has the same key names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VGGTConfig:
    img_size: int = 518
    """Image size the DINO position embedding was trained for (its grid is img_size / patch_size)."""
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    """Number of frame blocks (and of global blocks)."""
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    rope_frequency: float = 100.0
    dino_depth: int = 24
    dino_num_heads: int = 16
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_iterations: int = 4
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_taps: tuple[int, int, int, int] = (4, 11, 17, 23)
    """Aggregator layers read by the DPT heads (and, in the paper, the layers whose biases are tuned)."""
    dpt_frames_chunk: int = 8
    """DPT heads process this many frames at a time to bound memory."""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError("embed_dim / num_heads must be a multiple of 4 (2D RoPE splits each head in four)")
        if max(self.dpt_taps) >= self.depth:
            raise ValueError(f"dpt_taps {self.dpt_taps} must be < depth {self.depth}")

    @classmethod
    def tiny(cls) -> "VGGTConfig":
        """A few-MB model with the key names of VGGT-1B: for tests (forward well under a second on CPU)."""
        return cls(
            img_size=56,
            embed_dim=32,
            depth=24,
            num_heads=2,
            dino_depth=2,
            dino_num_heads=2,
            camera_trunk_depth=1,
            camera_num_heads=2,
            dpt_features=8,
            dpt_out_channels=(8, 8, 16, 16),
        )
