"""Options of the refinement stage (``--refine`` and friends of ``extreme-poses`` and the ``extreme3d`` parser)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class RefineOptions:
    refine: bool = True
    """Refine poses (and predicted focal lengths) with SIFT features, two-view verification and bundle adjustment
    (pycolmap) wherever views share image evidence; views that share none keep the 3D foundation model's pose."""
    feature_size: int = 1600
    """Long side, in pixels, of the images features are extracted from (never above the original size)."""
    match_partners: int = 12
    """Each view is matched with its this-many most co-visible partners, judged from the model's depth and poses;
    collections of at most this-many + 1 views match all pairs."""
    robust_loss: Literal["cauchy", "huber", "soft_l1", "trivial"] = "cauchy"
    """Robust loss of the bundle adjustment's reprojection residuals (trivial = plain least squares)."""
    refine_focal: Literal["auto", "always", "never"] = "auto"
    """auto: refine focal lengths that were predicted (also --intrinsics shared), keep those given by --intrinsics
    fx,fy,cx,cy / exif or --poses-from; always / never: for every view."""
    max_rotation_change: float = 10.0
    """Trust region: a view whose refined rotation differs from its input by more than this (degrees) keeps its
    input pose."""
    max_centre_change: float = 0.1
    """Trust region: a view whose refined camera centre moved by more than this fraction of the scene extent keeps
    its input pose."""
    min_inliers: int = 30
    """Fewest verified matches for a pair to link two views, and fewest track observations for a view to be
    refined."""
    max_rotation_disagreement: float = 30.0
    """Reject a verified pair whose two-view relative rotation differs from the model's by more than this (degrees):
    repeated structures and symmetric facades produce such false matches."""
    points: Literal["sfm", "3dfm", "both"] = "both"
    """Initial point cloud: SfM points (triangulated tracks, colours from the images), the model's confidence-filtered
    depth points, or both (model points only where no SfM point was observed)."""

    def __post_init__(self) -> None:
        if self.feature_size < 64:
            raise ValueError(f"--feature-size must be at least 64 pixels, got {self.feature_size}")
        if self.match_partners < 1:
            raise ValueError(f"--match-partners must be at least 1, got {self.match_partners}")
        if self.max_rotation_change <= 0 or self.max_centre_change <= 0:
            raise ValueError("--max-rotation-change and --max-centre-change must be positive")
        if self.min_inliers < 8:
            raise ValueError(
                f"--min-inliers must be at least 8 (a two-view geometry needs 8 matches), got {self.min_inliers}"
            )
