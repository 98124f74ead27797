"""What ns_extreme knows about each backbone: default weights, licence, released alignment, bias set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ns_extreme.models.bias import BiasSet


@dataclass(frozen=True)
class ModelSpec:
    name: str
    default_weights: str
    licence: str
    released_alignment: str
    """File name of the paper's bias checkpoint shipped in ns_extreme/data."""
    paper_bias_set: BiasSet
    ignored_checkpoint_prefixes: tuple[str, ...]
    build: Callable[[Any], nn.Module]
    """Builds the module from a config (None = the full-size default)."""
    reference_frame: bool
    """True when frame 0 defines the world (VGGT): alignment then adds the first-camera anchor loss."""


def _build_vggt(config: Any) -> nn.Module:
    from ns_extreme.models.vggt import VGGT

    return VGGT(config)


VGGT_SPEC = ModelSpec(
    name="vggt",
    default_weights="facebook/VGGT-1B",
    licence="CC BY-NC 4.0 (non-commercial) for facebook/VGGT-1B; facebook/VGGT-1B-Commercial is under the VGGT License",
    released_alignment="VGGT_changed_bias.pth",
    paper_bias_set=BiasSet.from_blocks(
        "paper", [f"aggregator.{kind}_blocks.{i}" for kind in ("frame", "global") for i in (4, 11, 17, 23)]
    ),
    ignored_checkpoint_prefixes=("track_head.",),
    build=_build_vggt,
    reference_frame=True,
)

MODELS: dict[str, ModelSpec] = {VGGT_SPEC.name: VGGT_SPEC}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}") from None
