"""Options of the posing pipeline (shared by ``ns-process-data extreme-poses`` and the ``extreme3d`` parser)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import tyro
from typing_extensions import Annotated

from ns_extreme.posing.intrinsics import parse_intrinsics_option
from ns_extreme.posing.metric_scale import parse_scale_from
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
    masks: Optional[Path] = None
    """Folder of masks, one per photo matched by file stem (IMG_01.jpg <-> IMG_01.png), any size: 0 = ignore
    (people, sky, background), 255 = keep. Masked pixels give no points, depth 0 and no features, and are written
    to masks/ with a mask_path per frame. Without it, the alpha channel of RGBA photos is the mask."""
    orient: Literal["up", "none"] = "up"
    """up: level the model's world (gravity along +y in colmap/, up +z in transforms.json), from the cameras' up
    vectors or a ground plane; none: keep the first camera's frame. A --poses-from world is never rotated."""
    scale_from: Optional[str] = None
    """Put the dataset in metres: exif-gps (fit to the photos' EXIF GPS positions, at least 3) or A.jpg,B.jpg,METRES
    (the distance between the two photos' cameras). Not with --poses-from (a given world keeps its units)."""
    refinement: Annotated[RefineOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=RefineOptions)
    """Refinement with image evidence (SfM-grade poses where views overlap)."""

    def check_world_options(self) -> None:
        """--scale-from is well-formed and not combined with --poses-from (checked before images are loaded; not
        in ``__post_init__``, where tyro would turn the error into a usage box)."""
        parse_scale_from(self.scale_from)
        if self.scale_from and self.poses_from is not None:
            raise ValueError("--scale-from cannot be used with --poses-from: a given world keeps its own units")

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
        if self.orient not in ("up", "none"):
            raise ValueError(f"--orient must be up or none, got {self.orient!r}")
        if self.chunk_overlap < 1:
            raise ValueError("--chunk-overlap must be at least 1")
