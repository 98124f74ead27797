"""Sizes of a π³ model. ``Pi3Config()`` is the released ``yyfz233/Pi3``; ``Pi3Config.tiny()`` has the same key names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pi3Config:
    img_size: int = 518
    """Image size the DINO position embedding was trained for (its grid is img_size / patch_size)."""
    patch_size: int = 14
    embed_dim: int = 1024
    """Width of the DINOv2 encoder and of the main decoder (π³ feeds the encoder tokens to it unprojected)."""
    encoder_depth: int = 24
    encoder_num_heads: int = 16
    encoder_register_tokens: int = 4
    depth: int = 36
    """Main decoder blocks: even indices attend within a frame, odd ones across all frames."""
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 5
    """Learned tokens prepended to every frame (identical for all frames: no reference view)."""
    init_values: float = 0.01
    """LayerScale initialisation of the main decoder blocks."""
    rope_frequency: float = 100.0
    head_embed_dim: int = 1024
    """Width of the three 5-block per-frame decoders (points, confidence, camera)."""
    head_depth: int = 5
    head_num_heads: int = 16
    camera_dim: int = 512
    """Output width of the camera decoder = width of the camera head's MLPs."""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for dim, heads, what in (
            (self.embed_dim, self.num_heads, "embed_dim / num_heads"),
            (self.head_embed_dim, self.head_num_heads, "head_embed_dim / head_num_heads"),
        ):
            if dim % heads or (dim // heads) % 4:
                raise ValueError(f"{what} must be a multiple of 4 (2D RoPE splits each head in four)")
        if self.embed_dim % self.encoder_num_heads:
            raise ValueError("embed_dim must be divisible by encoder_num_heads")
        if self.depth < 2 or self.depth % 2:
            raise ValueError(f"depth must be even and >= 2 (frame/global pairs), got {self.depth}")

    @classmethod
    def tiny(cls) -> "Pi3Config":
        """A ~1 MB model whose state-dict keys are exactly those of the released π³ (all 1210, same order);
        only the widths differ. For tests: a CPU forward on a few 56-px frames takes well under a second."""
        return cls(
            img_size=56,
            embed_dim=32,
            encoder_num_heads=2,
            num_heads=2,
            head_embed_dim=32,
            head_num_heads=2,
            camera_dim=16,
        )
