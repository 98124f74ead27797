"""``load_model``: build a backbone, load base weights strictly, apply an alignment (bias) checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ns_extreme.models.bias import AlignmentReport, apply_bias_tensors, read_bias_checkpoint
from ns_extreme.models.layers import narrowable_linears, store_weights_in
from ns_extreme.models.registry import RELEASED_ALIGNMENT_LICENCE, Backbone3DFM, ModelSpec, get_spec
from ns_extreme.models.testing import make_outputs_plausible
from ns_extreme.models.weights import WeightsReader, check_state_dict, fingerprint, resolve_weights

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
            f"alignment {self.alignment.source} ({self.alignment.parameters:,} bias parameters in "
            f"{self.alignment.tensors} tensors)"
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


def _drop_heads(model: Backbone3DFM, heads: Optional[Iterable[str]]) -> list[str]:
    return [] if heads is None else model.drop_heads(heads)


def _stored_narrow(
    model: nn.Module, dtype: torch.dtype, storage_dtype: Optional[torch.dtype], heads: bool = False
) -> set[str]:
    """State-dict keys that ``store_weights_in`` would narrow: read them in ``storage_dtype`` directly."""
    if storage_dtype is None or storage_dtype == dtype:
        return set()
    return {f"{name}.weight" for name, _ in narrowable_linears(model, heads)}


def load_model(
    name: str = "vggt",
    weights: str | Path | None = None,
    alignment: str | Path | None = "aligned",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: Any = None,
    seed: int = 0,
    storage_dtype: Optional[torch.dtype] = None,
    heads: Optional[Iterable[str]] = None,
    narrow_heads: bool = False,
) -> nn.Module:
    """Return an eval-mode backbone with frozen parameters; ``model.load_report`` says what was loaded.

    ``weights``: a Hugging Face id (default: the model's official one), a local .safetensors/.pt/.pth file or folder, or
    ``"random"`` (seeded random initialisation with plausible camera outputs, for tests and benchmarks). ``alignment``:
    ``"aligned"`` (the paper's released biases), ``"pretrained"`` or a path to a bias checkpoint. ``config``: model
    sizes (default: full size), e.g. ``VGGTConfig.tiny()``. ``dtype``: the dtype of the parameters and of the
    computation. ``storage_dtype`` (e.g. ``torch.bfloat16`` with ``dtype=torch.float32``): keep the matrices of the
    transformer's linear layers (>95 % of the weights) in this narrower dtype and widen them per call: half the weight
    memory with ``dtype`` arithmetic. The heads' matrices stay in ``dtype`` (the reference runs its heads in float32)
    unless ``narrow_heads``.

    ``heads``: build only these heads, e.g. ``("camera", "depth")`` for posing; the others' weights are skipped.

    Weights files are streamed one tensor at a time straight into the target dtype and assigned to a model
    built on the meta device: no second copy of the weights is ever held.
    """
    spec = get_spec(name)
    weights = str(weights) if weights is not None else spec.default_weights
    weights_file = weights_fp = None
    if weights == RANDOM_WEIGHTS:
        torch.manual_seed(seed)
        model = spec.build(config)
        make_outputs_plausible(name, model)
        _drop_heads(model, heads)
        model.to(device=device, dtype=dtype)
    else:
        resolved = resolve_weights(weights)
        weights_file, weights_fp = str(resolved.path), fingerprint(resolved.path)
        with torch.device("meta"):
            model = spec.build(config)
        dropped = _drop_heads(model, heads)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        narrow = _stored_narrow(model, dtype, storage_dtype, narrow_heads)
        with WeightsReader(resolved.path) as reader:
            ignored = spec.ignored_checkpoint_prefixes + tuple(dropped)
            keys = check_state_dict(expected, reader.shapes, ignored, str(resolved.path))
            state = {k: reader.read(k, storage_dtype if k in narrow else dtype).to(device) for k in keys}
        model.load_state_dict(state, strict=True, assign=True)
        del state
        logger.info("loaded %s weights %s (licence: %s)", name, weights, spec.licence)
    if storage_dtype is not None and storage_dtype != dtype:
        store_weights_in(model, storage_dtype, heads=narrow_heads)

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
        licence=spec.licence + (f"; {RELEASED_ALIGNMENT_LICENCE}" if str(alignment) == "aligned" else ""),
        alignment=report,
        device=str(device),
        dtype=str(dtype).replace("torch.", "")
        + (
            f" ({str(storage_dtype).replace('torch.', '')} linear weights)"
            if storage_dtype not in (None, dtype)
            else ""
        ),
    )
    return model
