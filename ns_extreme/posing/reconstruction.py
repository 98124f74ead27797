"""The result of posing: everything the exporters and viewers need, at the original image resolution."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ns_extreme.io.images import PreprocessRecord


@dataclass
class PairDiagnostic:
    i: int
    j: int
    angle_deg: float
    """Predicted relative rotation angle between views i and j."""
    overlap: str
    """Estimated overlap class (large / small / none) from the predicted rotation and fields of view."""
    pretrained_angle_deg: Optional[float] = None
    """The same angle from the pretrained model (with --compare-pretrained)."""
    model_disagreement_deg: Optional[float] = None
    """Geodesic angle between the aligned and pretrained relative rotations."""


@dataclass
class Reconstruction:
    image_paths: list[Path]
    sizes_wh: np.ndarray
    """[N, 2] original (EXIF-upright) image sizes."""
    w2c_opencv: np.ndarray
    """[N, 3, 4] float64 world-to-camera, OpenCV axes."""
    intrinsics: np.ndarray
    """[N, 3, 3] float64 at the original resolution."""
    records: list[PreprocessRecord]
    depth: np.ndarray
    """[N, h, w] float32 z-depth at the preprocessed resolution, in world units (0 = padding)."""
    confidence: np.ndarray
    """[N, h, w] float32 depth confidence at the preprocessed resolution."""
    points_xyz: np.ndarray
    """[P, 3] point cloud in the model world (written to sparse_pc.ply and colmap/points3D.bin)."""
    points_rgb: np.ndarray
    """[P, 3] uint8 point colours."""
    points_conf: np.ndarray
    """[P] float32 depth confidence of the pixel each point came from (sparse_pc.ply ``confidence``)."""
    points_source: np.ndarray
    """[P] uint8 0 = the model's depth, 1 = an SfM point (triangulated track; sparse_pc.ply ``source``)."""
    view_confidence: np.ndarray
    """[N] mean depth confidence over the real (unpadded) pixels of each view."""
    intrinsics_source: list[str]
    """Per view: predicted / exif / shared / given / known-pose."""
    pairs: list[PairDiagnostic] = field(default_factory=list)
    pretrained_w2c_opencv: Optional[np.ndarray] = None
    """[N, 3, 4] poses from the pretrained model, aligned into this world (with --compare-pretrained)."""
    chunk_residuals: list[dict[str, float]] = field(default_factory=list)
    """Per chunk join: median and 90th-percentile point residual relative to the scene scale."""
    provenance: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """Things the user should know about the result (also written to extreme_poses.json)."""
    world_source: str = "model"
    """model: frame 0 of the model (OpenCV axes) is the world; colmap / transforms: the world of --poses-from."""
    input_w2c_opencv: Optional[np.ndarray] = None
    """[N, 3, 4] poses before refinement (None when the refinement stage did not run)."""
    input_intrinsics: Optional[np.ndarray] = None
    """[N, 3, 3] intrinsics before refinement."""
    refinement: Optional[Any] = None
    """The refinement stage's report (``ns_extreme.posing.refine.Refinement``), None when it did not run."""
    sfm_points: Optional[Any] = None
    """Triangulated points with tracks (``ns_extreme.io.colmap_model.SfmPoints``) kept in the point cloud; written
    to colmap/sparse/0 with their 2-D observations."""
    masks: Optional[list[np.ndarray]] = None
    """Per view bool [H, W] at the original size, False = ignored pixels (--masks, alpha channels); None = none."""
    normals: Optional[np.ndarray] = None
    """[N, h, w, 3] float32 unit normals in each camera's frame (OpenCV) at the preprocessed resolution, for models
    with a normal head (written to normals/)."""
    gaussians: Optional[Any] = None
    """Per-pixel 3D Gaussians in camera frames and world units (``ns_extreme.posing.worldmirror.PixelGaussians``),
    when the backbone was asked for them (``--write-splats``)."""

    @property
    def num_views(self) -> int:
        return len(self.image_paths)
