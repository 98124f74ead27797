"""What ns_extreme knows about each backbone: default weights, licence, released alignment, bias set, and how to
read its predicted camera rotations (the one model-specific step of alignment training and evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ns_extreme.geometry.rotations_torch import quat_xyzw_to_matrix_torch
from ns_extreme.models.bias import BiasSet

CAMERA_HEADS = ("camera",)
"""The heads every backbone runs for rotation-only alignment and evaluation (``model(images, heads=CAMERA_HEADS)``)."""

W2cRotationReader = Callable[[Mapping[str, torch.Tensor]], list[torch.Tensor]]
"""Output of ``model(images, heads=CAMERA_HEADS)`` -> the world-to-camera rotations ``[B, S, 3, 3]`` (float32,
differentiable) of each camera estimate, first to last (the last is the model's final answer)."""


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
    w2c_rotations: W2cRotationReader
    """Reads the predicted world-to-camera rotations per camera estimate out of the camera-path outputs."""
    tiny_config: Callable[[], Any] = lambda: None
    """A few-MB configuration with the real key names (tests, wiring checks)."""
    make_outputs_plausible: Callable[[nn.Module], None] = lambda model: None
    """Applied to randomly initialised models so their outputs are usable downstream (tests, benchmarks)."""


def w2c_rotations_from_pose_encoding(pose_enc: torch.Tensor) -> torch.Tensor:
    """World-to-camera rotations [..., 3, 3] (float32) from VGGT pose encodings [..., 9] (quaternion xyzw at 3:7).

    Same rotation as ``w2c_intrinsics_from_pose_encoding``, with the quaternion normalised under an epsilon
    first so that a near-zero prediction cannot produce Inf.
    """
    q = F.normalize(pose_enc[..., 3:7].float(), dim=-1, eps=1e-8)
    return quat_xyzw_to_matrix_torch(q)


def w2c_rotations_from_c2w(c2w: torch.Tensor) -> torch.Tensor:
    """World-to-camera rotations [..., 3, 3] (float32) of camera-to-world poses [..., 3 or 4, 4]: R_w2c = R_c2wᵀ."""
    return c2w[..., :3, :3].float().transpose(-1, -2)


def _vggt_w2c_rotations(out: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """One estimate per camera-head refinement iteration (``pose_enc_list``)."""
    return [w2c_rotations_from_pose_encoding(enc) for enc in out["pose_enc_list"]]


def _pi3_w2c_rotations(out: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """π³ has a single camera estimate: camera-to-world ``camera_poses`` [B, S, 4, 4]."""
    return [w2c_rotations_from_c2w(out["camera_poses"])]


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
    tiny_config=lambda: __import__("ns_extreme.models.vggt", fromlist=["VGGTConfig"]).VGGTConfig.tiny(),
    reference_frame=True,
    w2c_rotations=_vggt_w2c_rotations,
    make_outputs_plausible=_plausible_vggt,
)


def _build_pi3(config: Any) -> nn.Module:
    from ns_extreme.models.pi3 import Pi3

    return Pi3(config)


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


PI3_SPEC = ModelSpec(
    name="pi3",
    default_weights="yyfz233/Pi3",
    licence="CC BY-NC 4.0 (weights); code BSD-3-Clause",
    released_alignment="PI3_changed_bias.pth",
    paper_bias_set=BiasSet.from_blocks("paper", [f"decoder.{i}" for i in (8, 24, 26, 27, 28, 29, 30, 31, 32)]),
    ignored_checkpoint_prefixes=(),
    build=_build_pi3,
    tiny_config=lambda: __import__("ns_extreme.models.pi3", fromlist=["Pi3Config"]).Pi3Config.tiny(),
    reference_frame=False,
    w2c_rotations=_pi3_w2c_rotations,
    make_outputs_plausible=_plausible_pi3,
)

MODELS: dict[str, ModelSpec] = {VGGT_SPEC.name: VGGT_SPEC, PI3_SPEC.name: PI3_SPEC}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}") from None
