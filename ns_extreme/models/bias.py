"""Bias sets (which parameters alignment tunes) and bias checkpoints in the paper's released format.

A checkpoint is ``{"bias_state_dict": {full_parameter_name: float tensor}}`` holding the *full* values of
the tuned biases (not deltas), exactly like the paper's ``*_changed_bias.pth`` files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ns_extreme.models.errors import ModelLoadError

BLOCK_BIASES = ("attn.qkv.bias", "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias")
"""The four linear-layer biases the paper tunes in each selected block (9,216 parameters at width 1024)."""


@dataclass(frozen=True)
class BiasSet:
    """Parameters selected by full-match regular expressions over ``named_parameters`` names."""

    name: str
    patterns: tuple[str, ...]

    def select(self, model: nn.Module) -> list[str]:
        regexes = [re.compile(p) for p in self.patterns]
        names = [n for n, _ in model.named_parameters() if any(r.fullmatch(n) for r in regexes)]
        if not names:
            raise ModelLoadError(f"bias set {self.name!r} selects no parameter of this model ({self.patterns})")
        return names

    @classmethod
    def from_blocks(cls, name: str, block_prefixes: list[str]) -> "BiasSet":
        return cls(name, tuple(re.escape(f"{prefix}.{bias}") for prefix in block_prefixes for bias in BLOCK_BIASES))


@dataclass(frozen=True)
class AlignmentReport:
    source: str
    tensors: int
    parameters: int


def read_bias_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read and validate a bias checkpoint (weights_only=True: pickled code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"bias checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code, RuntimeError/EOFError for damage
        from ns_extreme.models.weights import torch_load_failure

        raise torch_load_failure(path, "bias checkpoint", err) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("bias_state_dict"), dict):
        raise ModelLoadError(
            f'{path}: expected {{"bias_state_dict": {{name: tensor}}}}, got keys '
            f"{list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__}"
        )
    tensors = obj["bias_state_dict"]
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ModelLoadError(f"{path}: entry {name!r} is not a floating-point tensor")
        if not torch.isfinite(value).all():
            raise ModelLoadError(f"{path}: entry {name!r} contains NaN or Inf")
    if not tensors:
        raise ModelLoadError(f"{path}: bias_state_dict is empty")
    return tensors


def bias_state_dict(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", torch.float32).clone().contiguous() for n in names}


def write_bias_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    from ns_extreme.io.atomic import torch_save_atomic

    torch_save_atomic(
        {"bias_state_dict": {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}},
        Path(path),
    )


@torch.no_grad()
def apply_bias_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> AlignmentReport:
    """Overwrite the named parameters after checking every name and shape (all or nothing)."""
    params = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise ModelLoadError(
            f"{source}: {len(unknown)} names are not parameters of this model (wrong model?): {unknown[:4]}"
        )
    wrong = [
        f"{n} {tuple(t.shape)} != {tuple(params[n].shape)}" for n, t in tensors.items() if t.shape != params[n].shape
    ]
    if wrong:
        raise ModelLoadError(f"{source}: wrong shapes: {wrong[:4]}")
    for name, value in tensors.items():
        params[name].copy_(value.to(params[name].dtype))
    return AlignmentReport(source, len(tensors), sum(t.numel() for t in tensors.values()))
