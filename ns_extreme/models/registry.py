"""What ns_extreme knows about each backbone: default weights, licence, released alignment, bias set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
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
    make_outputs_plausible: Callable[[nn.Module], None] = lambda model: None
    """Applied to randomly initialised models so their outputs are usable downstream (tests, benchmarks)."""


def _build_vggt(config: Any) -> nn.Module:
    from ns_extreme.models.vggt import VGGT

    return VGGT(config)


@torch.no_grad()
def _plausible_vggt(model: nn.Module) -> None:
    """Random weights predict near-identity rotations and a ~55 degree field of view instead of a zero FoV
    (whose infinite focal length the pipeline would rightly reject)."""
    last = model.camera_head.pose_branch.fc2
    last.weight.mul_(0.01)
    # The head adds its output once per refinement iteration.
    per_iteration = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.8, 1.0]) / model.cfg.camera_iterations
    last.bias.copy_(per_iteration)


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
    make_outputs_plausible=_plausible_vggt,
)

MODELS: dict[str, ModelSpec] = {VGGT_SPEC.name: VGGT_SPEC}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}") from None
