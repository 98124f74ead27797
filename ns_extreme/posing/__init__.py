"""Images -> Reconstruction (cameras at original resolution, depth, confidence, coloured points, diagnostics).

Names are imported on first use, so that ``ns_extreme.posing.options`` (all a command line needs to check
its arguments) loads without torch.
"""

from __future__ import annotations

from ns_extreme._lazy import lazy_exports

_EXPORTS = {
    "FramePredictions": "ns_extreme.posing.backbone",
    "load_backbone": "ns_extreme.posing.loading",
    "NonFiniteOutputError": "ns_extreme.posing.backbone",
    "Pi3Backbone": "ns_extreme.posing.backbone",
    "PoseModelOptions": "ns_extreme.posing.model_options",
    "pose_images": "ns_extreme.posing.pipeline",
    "PosingBackbone": "ns_extreme.posing.backbone",
    "PosingOptions": "ns_extreme.posing.options",
    "Reconstruction": "ns_extreme.posing.reconstruction",
    "VGGTBackbone": "ns_extreme.posing.backbone",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
