"""Test and benchmark support: random weights whose outputs the downstream code can use (``weights="random"``).

Never applied to real weights. Tiny configurations of the real architectures are each config class's ``tiny()``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


@torch.no_grad()
def _plausible_vggt(model: nn.Module) -> None:
    """Random weights predict near-identity rotations and a ~55 degree field of view instead of a zero FoV
    (whose infinite focal length the pipeline would rightly reject)."""
    _plausible_pose_encoding(model.camera_head.pose_branch.fc2, model.cfg.camera_iterations)


@torch.no_grad()
def _plausible_worldmirror(model: nn.Module) -> None:
    """WorldMirror's camera head is VGGT's under other names: the same fix as ``_plausible_vggt``."""
    _plausible_pose_encoding(model.cam_head.param_predictor.fc2, model.cfg.camera_iterations)


def _plausible_pose_encoding(last: nn.Linear, iterations: int) -> None:
    last.weight.mul_(0.01)
    # The head adds its output once per refinement iteration.
    per_iteration = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.8, 1.0]) / iterations
    last.bias.copy_(per_iteration)


PI3_WIRING_FOCAL_PATCHES = 4.0
"""Focal length, in patch widths, that ``_plausible_pi3`` builds into random point maps (56 px at patch 14)."""


@torch.no_grad()
def _plausible_pi3(model: nn.Module) -> None:
    """Random weights: near-identity rotations, small translations, depth about 1 and, within each patch, the
    pixel rays of a pinhole camera with a ``PI3_WIRING_FOCAL_PATCHES``-patch focal length (a linear head cannot
    know a patch's position in the image, so only in-patch offsets are pinhole-like). Focal recovery then
    yields a positive focal length. Wiring tests only: these outputs mean nothing."""
    p = model.cfg.patch_size
    focal = PI3_WIRING_FOCAL_PATCHES * p
    offsets = (torch.arange(p, dtype=torch.float32) + 0.5 - p / 2) / focal
    x_ray = offsets[None, :].expand(p, p)  # channel layout of the pixel-shuffle head: c * p² + row * p + col
    y_ray = offsets[:, None].expand(p, p)
    points = model.point_head.proj
    points.weight.mul_(0.01)
    points.bias.copy_(torch.stack((x_ray, y_ray, torch.zeros(p, p))).reshape(-1))
    camera = model.camera_head
    camera.fc_rot.weight.mul_(0.01)
    camera.fc_rot.bias.copy_(torch.eye(3).reshape(-1))
    camera.fc_t.weight.mul_(0.1)


PLAUSIBLE_OUTPUTS: dict[str, Callable[[nn.Module], None]] = {
    "vggt": _plausible_vggt,
    "pi3": _plausible_pi3,
    "worldmirror": _plausible_worldmirror,
}
"""Per registry name: makes a randomly initialised model's outputs usable downstream (absent: left as is)."""


@torch.no_grad()
def perturb_trivial_parameters(model: nn.Module, std: float = 0.3) -> None:
    """Redraw the parameters default init leaves trivial (zero biases and tokens, LayerScale 0.01) from N(0, std),
    with torch's global generator, so that wiring mistakes show in a random model's outputs."""
    for name, p in model.named_parameters():
        if name.endswith(("bias", "gamma", "token")) or p.ndim == 1:
            p.normal_(0, std)


def make_outputs_plausible(name: str, model: nn.Module) -> None:
    """Apply the model's ``PLAUSIBLE_OUTPUTS`` entry, if any, to a randomly initialised ``model``."""
    fix = PLAUSIBLE_OUTPUTS.get(name)
    if fix is not None:
        fix(model)
