"""Refinement with image evidence: pycolmap features, verified matches and bundle adjustment of linked views.

Names are imported on first use: the options load without pycolmap.
"""

from __future__ import annotations

from ns_extreme._lazy import lazy_exports

_EXPORTS = {
    "PairRefinement": "ns_extreme.posing.refine.stage",
    "RefineOptions": "ns_extreme.posing.refine.options",
    "Refinement": "ns_extreme.posing.refine.stage",
    "ViewRefinement": "ns_extreme.posing.refine.stage",
    "refine_poses": "ns_extreme.posing.refine.stage",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
