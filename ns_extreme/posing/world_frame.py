"""The model's world made useful: levelled (``--orient up``) and in metres (``--scale-from``), as one Sim(3).

Only for the model's own world (frame 0 of the network); a ``--poses-from`` world is kept as given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ns_extreme.geometry.conventions import camera_centres_from_w2c
from ns_extreme.geometry.sim3 import Sim3
from ns_extreme.posing.metric_scale import metric_scale
from ns_extreme.posing.orientation import level_world


def frame_world(
    w2c_opencv: np.ndarray,
    points_xyz: np.ndarray,
    image_paths: Sequence[Path],
    orient: str,
    scale_from: Optional[str],
    seed: int = 0,
) -> tuple[Optional[Sim3], dict[str, Any]]:
    """The Sim(3) (rotation about the origin, then scale) to apply to the world, or None; and what was done."""
    info: dict[str, Any] = {"orientation": {"method": "none"}, "scale": {"method": "none", "scale": 1.0}}
    R, s = np.eye(3), 1.0
    if orient == "up":
        level = level_world(w2c_opencv, points_xyz, seed=seed)
        R = level.rotation
        info["orientation"] = level.summary()
    if scale_from:
        metric = metric_scale(list(map(Path, image_paths)), camera_centres_from_w2c(w2c_opencv) @ R.T, scale_from)
        s = metric.scale
        info["scale"] = metric.summary()
    if orient != "up" and not scale_from:
        return None, info
    return Sim3(s, R, np.zeros(3)), info
