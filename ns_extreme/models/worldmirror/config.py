"""Sizes of a WorldMirror model. ``WorldMirrorConfig()`` is HunyuanWorld-Mirror 1.0 as released;
``WorldMirrorConfig.tiny()`` has the same key names."""

from __future__ import annotations

from dataclasses import dataclass

from ns_extreme.models.vggt.config import VGGTConfig


@dataclass(frozen=True)
class WorldMirrorConfig(VGGTConfig):
    """VGGT-1B's sizes (every inherited field means what it means for VGGT) plus WorldMirror's own.

    The released model has 24 + 24 alternating blocks of width 1024; its DPT heads and the bias checkpoint read
    layers ``dpt_taps`` = (4, 11, 17, 23), the only ones the backbone keeps.
    """

    gs_features: int = 256
    """Feature width of the 3DGS DPT head (reference: ``gs_dim``); its splat features have half as many channels."""
    sh_degree: int = 0
    """Spherical-harmonics degree of the splats (the released model predicts degree 0: one colour residual)."""
    splat_voxel_size: float = 0.002
    """Splats whose centres share a voxel of this size (scene units) are merged into one, as the reference does."""

    @classmethod
    def tiny(cls) -> "WorldMirrorConfig":
        """A few-MB model with exactly the key names of the released WorldMirror (tests, wiring checks)."""
        return cls(
            img_size=56,
            embed_dim=32,
            depth=24,
            num_heads=2,
            dino_depth=24,
            dino_num_heads=2,
            camera_trunk_depth=4,
            camera_num_heads=2,
            dpt_features=8,
            dpt_out_channels=(8, 8, 16, 16),
            gs_features=8,
        )
