"""Backbones (VGGT, pi3) written to load the official weights, plus loading and bias-checkpoint tools."""

from ns_extreme.models.bias import BiasSet, read_bias_checkpoint, write_bias_checkpoint
from ns_extreme.models.errors import ModelLoadError, WeightsNotFoundError
from ns_extreme.models.loading import LoadReport, load_model, released_alignment_path
from ns_extreme.models.registry import MODELS, ModelSpec, get_spec

__all__ = [
    "MODELS",
    "BiasSet",
    "LoadReport",
    "ModelLoadError",
    "ModelSpec",
    "WeightsNotFoundError",
    "get_spec",
    "load_model",
    "read_bias_checkpoint",
    "released_alignment_path",
    "write_bias_checkpoint",
]
