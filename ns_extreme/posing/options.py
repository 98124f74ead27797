"""Options of the posing pipeline (shared by ``ns-process-data extreme-poses`` and the ``extreme3d`` parser)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import tyro
from typing_extensions import Annotated

from ns_extreme.posing.intrinsics import parse_intrinsics_option
from ns_extreme.posing.refine.options import RefineOptions


@dataclass
class PosingOptions:
    preprocess: Literal["crop", "pad"] = "crop"
    """VGGT preprocessing: crop (518 wide, centre-cropped to 518 tall) or pad (longer side 518, padded square)."""
    intrinsics: str = "auto"
    """auto: predicted focal lengths; exif: 35 mm-equivalent EXIF focal where present, predicted elsewhere;
    shared: one focal length (the median prediction) for all views; 'fx,fy,cx,cy': known, in original pixels."""
    poses_from: Optional[Path] = None
    """COLMAP model folder or transforms.json with known poses for some or all views (matched by file name); its
    world becomes the dataset's world."""
    depth_from: Optional[Path] = None
    """Folder of depth maps fed into the network (models that take a depth prior: worldmirror), one per image matched
    by file stem: <stem>.png (16-bit millimetres, as ns_extreme writes depth/) or <stem>.npy (float32); images
    without a file, and pixels <= 0, get no depth prior."""
    known_poses: Literal["fixed", "prior"] = "fixed"
    """fixed: --poses-from poses are kept exactly and anchor refinement; prior: they are initial estimates that
    refinement may move (phone/ARKit poses, an earlier reconstruction), in the given world frame."""
    conf_percentile: float = 50.0
    """Drop points whose confidence is below this percentile (per view)."""
    max_points: int = 100_000
    """Point budget of the initial point cloud (random subset after voxel downsampling)."""
    voxel_size: float = 0.0
    """Voxel size for point downsampling, in units of the median camera-to-point distance (0 = off)."""
    edge_threshold: float = 0.05
    """Drop points at depth discontinuities: relative depth change to a neighbour above this."""
    max_frames_per_pass: int = 0
    """Run the model on overlapping chunks of at most this many frames and stitch them (0 = all at once)."""
    chunk_overlap: int = 4
    """Frames shared by consecutive chunks (used for the Sim(3) join)."""
    seed: int = 0
    """Random seed (point subsampling, co-visibility sampling)."""
    refinement: Annotated[RefineOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=RefineOptions)
    """Refinement with image evidence (SfM-grade poses where views overlap)."""

    def __post_init__(self) -> None:
        # Fail on a bad option before any image is loaded or the model runs.
        if self.preprocess not in ("crop", "pad"):
            raise ValueError(f"--preprocess must be crop or pad, got {self.preprocess!r}")
        parse_intrinsics_option(self.intrinsics)
        if not 0 <= self.conf_percentile < 100:
            raise ValueError(f"--conf-percentile must be in [0, 100), got {self.conf_percentile}")
        if self.max_points < 1:
            raise ValueError(f"--max-points must be positive, got {self.max_points}")
        if self.max_frames_per_pass and self.max_frames_per_pass <= self.chunk_overlap:
            raise ValueError(
                f"--max-frames-per-pass ({self.max_frames_per_pass}) must exceed --chunk-overlap ({self.chunk_overlap})"
            )
        if self.chunk_overlap < 1:
            raise ValueError("--chunk-overlap must be at least 1")
