"""Backbones (VGGT, pi3) written to load the official weights, plus loading and bias-checkpoint tools.

Names are imported on first use, so that the registry (all a command line needs to check ``--model``) loads
without torch.
"""

from __future__ import annotations

from ns_extreme._lazy import lazy_exports

_EXPORTS = {
    "MODELS": "ns_extreme.models.registry",
    "Backbone3DFM": "ns_extreme.models.registry",
    "BiasSet": "ns_extreme.models.bias",
    "LoadReport": "ns_extreme.models.loading",
    "ModelLoadError": "ns_extreme.models.errors",
    "ModelSpec": "ns_extreme.models.registry",
    "WeightsNotFoundError": "ns_extreme.models.errors",
    "get_spec": "ns_extreme.models.registry",
    "load_model": "ns_extreme.models.loading",
    "read_bias_checkpoint": "ns_extreme.models.bias",
    "released_alignment_path": "ns_extreme.models.loading",
    "write_bias_checkpoint": "ns_extreme.models.bias",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
