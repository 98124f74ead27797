"""The one table that names each backbone: ``MODELS``, a ``ModelSpec`` per model name.

A spec says everything the rest of ns_extreme needs to know about a backbone: how to build it and its configs
(``full`` and the few-MB ``tiny`` of the same architecture), the posing adapter and the heads posing runs, the
network input size, the network priors it accepts, how to read its predicted rotations, its default weights and
licence, and the paper's alignment checkpoint. Every command line builds its ``--model`` choices from it.

This module imports neither torch nor any model: command lines read it to check their arguments before anything
heavy loads. Classes and functions are named as ``"module:attribute"`` and imported on first use, which also keeps
the layering (``ns_extreme.posing`` sits above ``ns_extreme.models`` and is only named here, never imported).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Literal, Optional, Protocol

if TYPE_CHECKING:
    import torch

    from ns_extreme.models.bias import BiasSet
    from ns_extreme.models.rotation_readers import W2cRotationReader

RELEASED_ALIGNMENT_LICENCE = "CC BY-NC-SA 4.0 (the paper's aligned biases, non-commercial)"
"""Licence of every bias checkpoint in ns_extreme/data (added on top of the weights' licence when one is applied)."""

CAMERA_HEADS = ("camera",)
"""The heads every backbone runs for rotation-only alignment and evaluation (``model(images, heads=CAMERA_HEADS)``)."""

MODEL_SIZES = ("full", "tiny")
ModelSizeName = Literal["full", "tiny"]
"""``full``: the released architecture; ``tiny``: a few-MB configuration with the real parameter names (tests)."""
TINY_INPUT_SIZE = 140
"""Network input width used with ``--model-size tiny`` (a multiple of the 14-pixel patch; keeps tests fast)."""

PRIORS = ("intrinsics", "poses", "depth")
"""Priors a backbone may take as network inputs (``ModelSpec.priors``)."""


class Backbone3DFM(Protocol):
    """What ns_extreme calls on every backbone module (each is an ``nn.Module``)."""

    cfg: Any

    def __call__(self, images: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``images`` [S, 3, H, W] or [B, S, 3, H, W] in [0, 1]; ``heads=`` selects the heads to run."""
        ...

    def drop_heads(self, keep: Iterable[str]) -> list[str]:
        """Remove the heads not in ``keep``; returns the state-dict prefixes removed."""
        ...

    def set_gradient_checkpointing(self, enabled: bool) -> None: ...


def resolve(target: str) -> Any:
    """The object named ``"package.module:attribute"`` (imported now)."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """The ``--model`` value."""
    summary: str
    """One line for ``--help``: what the model is and predicts."""
    model_class: str
    """``"module:Class"`` of the module; ``Class(config)`` builds it (a ``Backbone3DFM``)."""
    config_class: str
    """``"module:Class"`` of its config: ``Class()`` is full size, ``Class.tiny()`` the tiny one."""
    posing_adapter: str
    """``"module:Class"`` of the ``ns_extreme.posing`` adapter (a ``PosingBackbone``) that turns outputs into poses."""
    posing_heads: Optional[tuple[str, ...]]
    """The heads posing runs (``load_model(heads=...)`` builds only these); None: all the model has."""
    rotation_reader: str
    """``"module:function"`` (``ns_extreme.models.rotation_readers``) reading the predicted world-to-camera rotations
    per camera estimate out of the ``CAMERA_HEADS`` outputs."""
    reference_frame: bool
    """True when frame 0 defines the world (VGGT): alignment then adds the first-camera anchor loss."""
    default_weights: str
    """Hugging Face id of the official weights."""
    licence: str
    """Licence of the default weights (printed by the loader)."""
    released_alignment: str
    """File name of the paper's bias checkpoint shipped in ns_extreme/data."""
    paper_bias_blocks: tuple[str, ...]
    """Module prefixes of the blocks whose four linear biases the paper tunes."""
    ignored_checkpoint_prefixes: tuple[str, ...] = ()
    """State-dict prefixes of the official checkpoint that the module does not build (e.g. VGGT's track head)."""
    input_size: int = 518
    """Network input width of the full-size model (``preprocess_images`` crops or pads to it)."""
    patch_size: int = 14
    """Image height and width fed to the network are multiples of this."""
    priors: tuple[str, ...] = ()
    """Priors the network takes as inputs (of ``PRIORS``); any other is an error, never silently ignored."""
    splat_head: Optional[str] = None
    """The head that predicts 3D Gaussians (``--write-splats``), None: the model has none."""

    def config(self, size: str = "full") -> Any:
        """The model config of this size (``MODEL_SIZES``)."""
        cls = resolve(self.config_class)
        if size == "full":
            return cls()
        if size == "tiny":
            return cls.tiny()
        raise ValueError(f"unknown model size {size!r}; choose {' or '.join(MODEL_SIZES)}")

    def build(self, config: Any = None) -> Backbone3DFM:
        """The module (random weights) for ``config`` (None: full size)."""
        return resolve(self.model_class)(config)

    def network_input_size(self, size: str = "full") -> int:
        return TINY_INPUT_SIZE if size == "tiny" else self.input_size

    @property
    def paper_bias_set(self) -> BiasSet:
        from ns_extreme.models.bias import BiasSet

        return BiasSet.from_blocks("paper", list(self.paper_bias_blocks))

    @property
    def w2c_rotations(self) -> W2cRotationReader:
        return resolve(self.rotation_reader)


VGGT_SPEC = ModelSpec(
    name="vggt",
    summary="VGGT-1B: predicts cameras (intrinsics included) and depth; frame 0 is the reference",
    model_class="ns_extreme.models.vggt:VGGT",
    config_class="ns_extreme.models.vggt:VGGTConfig",
    posing_adapter="ns_extreme.posing.backbone:VGGTBackbone",
    posing_heads=("camera", "depth"),
    rotation_reader="ns_extreme.models.rotation_readers:vggt_w2c_rotations",
    reference_frame=True,
    default_weights="facebook/VGGT-1B",
    licence="CC BY-NC 4.0 (non-commercial) for facebook/VGGT-1B; facebook/VGGT-1B-Commercial is under the VGGT License",
    released_alignment="VGGT_changed_bias.pth",
    paper_bias_blocks=tuple(f"aggregator.{kind}_blocks.{i}" for kind in ("frame", "global") for i in (4, 11, 17, 23)),
    ignored_checkpoint_prefixes=("track_head.",),
)

PI3_SPEC = ModelSpec(
    name="pi3",
    summary="π³: reference-free (an unordered set of views); focal lengths recovered from its point maps",
    model_class="ns_extreme.models.pi3:Pi3",
    config_class="ns_extreme.models.pi3:Pi3Config",
    posing_adapter="ns_extreme.posing.backbone:Pi3Backbone",
    posing_heads=None,  # the points, confidence and camera heads are all π³ has
    rotation_reader="ns_extreme.models.rotation_readers:pi3_w2c_rotations",
    reference_frame=False,
    default_weights="yyfz233/Pi3",
    licence="CC BY-NC 4.0 (weights); code BSD-3-Clause",
    released_alignment="PI3_changed_bias.pth",
    paper_bias_blocks=tuple(f"decoder.{i}" for i in (8, 24, 26, 27, 28, 29, 30, 31, 32)),
)

WORLDMIRROR_LICENCE = (
    "Tencent HunyuanWorld-Mirror Community License (code and weights): commercial use allowed, but not in the EU, "
    "UK or South Korea, not above 1M monthly active users without a licence from Tencent, and not to improve other "
    "AI models"
)

WORLDMIRROR_SPEC = ModelSpec(
    name="worldmirror",
    summary=(
        "HunyuanWorld-Mirror 1.0: VGGT-1B plus network priors (known intrinsics, poses, depth), normal maps and 3D "
        "Gaussians; frame 0 is the reference"
    ),
    model_class="ns_extreme.models.worldmirror:WorldMirror",
    config_class="ns_extreme.models.worldmirror:WorldMirrorConfig",
    posing_adapter="ns_extreme.posing.worldmirror:WorldMirrorBackbone",
    posing_heads=("camera", "depth", "normals"),
    splat_head="gs",
    rotation_reader="ns_extreme.models.rotation_readers:worldmirror_w2c_rotations",
    reference_frame=True,
    default_weights="tencent/HunyuanWorld-Mirror",
    licence=WORLDMIRROR_LICENCE,
    released_alignment="WM_changed_bias.pth",
    paper_bias_blocks=tuple(
        f"visual_geometry_transformer.{kind}_blocks.{i}" for kind in ("frame", "global") for i in (4, 11, 17, 23)
    ),
    priors=PRIORS,
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (VGGT_SPEC, PI3_SPEC, WORLDMIRROR_SPEC)}

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
ModelName = Literal[MODEL_NAMES]  # type: ignore[valid-type]
"""The ``--model`` choices of every command line."""


def model_choices_help() -> str:
    """``--help`` text listing every backbone and its default weights."""
    return "Backbone: " + "; ".join(f"{s.name}: {s.summary} (weights {s.default_weights})" for s in MODELS.values())


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}") from None
