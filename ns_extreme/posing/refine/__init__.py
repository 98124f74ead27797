"""Refinement with image evidence: pycolmap features, verified matches and bundle adjustment of linked views."""

from ns_extreme.posing.refine.options import RefineOptions
from ns_extreme.posing.refine.stage import PairRefinement, Refinement, ViewRefinement, refine_poses

__all__ = ["PairRefinement", "RefineOptions", "Refinement", "ViewRefinement", "refine_poses"]
