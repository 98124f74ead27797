"""``load_model``: build a backbone, load base weights strictly, apply an alignment (bias) checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ns_extreme.models.bias import AlignmentReport, apply_bias_tensors, read_bias_checkpoint
from ns_extreme.models.registry import ModelSpec, get_spec
from ns_extreme.models.weights import check_state_dict, fingerprint, read_state_dict, resolve_weights

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"
"""``weights="random"``: random initialisation (tests, benchmarks); nothing is downloaded."""


@dataclass(frozen=True)
class LoadReport:
    model: str
    weights: str
    weights_file: Optional[str]
    weights_fingerprint: Optional[str]
    licence: str
    alignment: Optional[AlignmentReport]
    device: str
    dtype: str

    def summary(self) -> str:
        aligned = (
            f"alignment {self.alignment.source} ({self.alignment.parameters:,} bias parameters in {self.alignment.tensors} tensors)"
            if self.alignment
            else "no alignment (pretrained biases)"
        )
        return f"{self.model}: weights {self.weights} [licence: {self.licence}], {aligned}, {self.device}/{self.dtype}"


def released_alignment_path(spec: ModelSpec) -> Path:
    """The paper's bias checkpoint for this model, shipped as package data (CC BY-NC-SA 4.0)."""
    return Path(str(resources.files("ns_extreme") / "data" / spec.released_alignment))


def resolve_alignment(spec: ModelSpec, alignment: str | Path | None) -> Optional[Path]:
    if alignment is None or str(alignment) == "pretrained":
        return None
    if str(alignment) == "aligned":
        return released_alignment_path(spec)
    return Path(alignment)


def load_model(
    name: str = "vggt",
    weights: str | Path | None = None,
    alignment: str | Path | None = "aligned",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: Any = None,
    seed: int = 0,
) -> nn.Module:
    """Return an eval-mode backbone with frozen parameters; ``model.load_report`` says what was loaded.

    ``weights``: a Hugging Face id (default: the model's official one), a local .safetensors/.pt/.pth file or
    folder, or ``"random"`` (seeded random initialisation with plausible camera outputs, for tests and benchmarks). ``alignment``: ``"aligned"`` (the paper's released biases), ``"pretrained"`` or a
    path to a bias checkpoint. ``config``: model sizes (default: full size), e.g. ``VGGTConfig.tiny()``.
    """
    spec = get_spec(name)
    weights = str(weights) if weights is not None else spec.default_weights
    weights_file = weights_fp = None
    if weights == RANDOM_WEIGHTS:
        torch.manual_seed(seed)
        model = spec.build(config)
        spec.make_outputs_plausible(model)
    else:
        resolved = resolve_weights(weights)
        weights_file, weights_fp = str(resolved.path), fingerprint(resolved.path)
        with torch.device("meta"):
            model = spec.build(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state = check_state_dict(expected, read_state_dict(resolved.path), spec.ignored_checkpoint_prefixes, str(resolved.path))
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        logger.info("loaded %s weights %s (licence: %s)", name, weights, spec.licence)
    model.to(device=device, dtype=dtype)

    report = None
    alignment_path = resolve_alignment(spec, alignment)
    if alignment_path is not None:
        report = apply_bias_tensors(model, read_bias_checkpoint(alignment_path), str(alignment_path))
        logger.info("applied alignment %s: %d parameters", alignment_path, report.parameters)
    model.eval().requires_grad_(False)
    model.load_report = LoadReport(
        model=name,
        weights=weights,
        weights_file=weights_file,
        weights_fingerprint=weights_fp,
        licence=spec.licence,
        alignment=report,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
    )
    return model
