"""The point cloud of the "Extreme poses" scene, as up to two scene nodes:

* ``{root}/points``: the 3D foundation model's points (circles in their image colours), filtered by the
  confidence-percentile slider;
* ``{root}/points_sfm``: the SfM points triangulated from feature tracks (sparse_pc.ply ``source`` = 1), when
  there are any: diamonds, drawn larger, in their image colours or one highlight colour, and never hidden by
  the confidence filter (their confidence is on another scale than the model's).

Which layers are shown is a visibility change in place. viser 0.2.7 (pinned by nerfstudio 1.1.5) has no
in-place setter for point size or colours, so those re-send the layer's current points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import viser

from ns_extreme.viewer.frames import DisplayFrame
from ns_extreme.viewer.scene_data import SceneData

__all__ = ["PointLayers", "PointSet", "POINTS_SHOWN", "SFM_HIGHLIGHT_COLOR", "MAX_DISPLAY_POINTS"]

PointsShown = Literal["both", "SfM", "3DFM"]
POINTS_SHOWN: tuple[PointsShown, ...] = ("both", "SfM", "3DFM")
SFM_HIGHLIGHT_COLOR = (0, 200, 255)
SFM_SIZE = 1.5
"""SfM point size relative to the model's points (a diamond of the same size looks smaller than a circle)."""
MAX_DISPLAY_POINTS = 300_000
"""Per layer, for the browser."""


@dataclass(frozen=True)
class PointSet:
    """Points in viser's world (float32), their colours and per-point confidence (None when unknown)."""

    xyz: np.ndarray
    rgb: np.ndarray
    conf: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.xyz)

    @classmethod
    def of(cls, data: SceneData, frame: DisplayFrame, mask: np.ndarray) -> "PointSet":
        index = np.flatnonzero(mask)
        if len(index) > MAX_DISPLAY_POINTS:
            index = np.sort(np.random.default_rng(0).choice(index, MAX_DISPLAY_POINTS, replace=False))
        conf = None if data.points_conf is None else np.asarray(data.points_conf)[index]
        xyz = frame.points(data.points_xyz[index]).astype(np.float32)
        return cls(xyz=xyz, rgb=np.asarray(data.points_rgb)[index].astype(np.uint8), conf=conf)


class PointLayers:
    def __init__(
        self, server: viser.ViserServer, root: str, data: SceneData, frame: DisplayFrame, point_size: float
    ) -> None:
        self.server = server
        self.root = root
        sfm = data.points_sfm if data.points_sfm is not None else np.zeros(len(data.points_xyz), dtype=bool)
        self.model = PointSet.of(data, frame, ~sfm)
        self.sfm = PointSet.of(data, frame, sfm) if sfm.any() else None
        self.point_size = point_size
        self.percentile = 0.0
        self.shown: PointsShown = "both"
        self.sfm_highlighted = False
        self.model_handle: Optional[viser.PointCloudHandle] = None
        self.sfm_handle: Optional[viser.PointCloudHandle] = None
        with server.atomic():
            self._draw_model()
            self._draw_sfm()

    @property
    def total(self) -> int:
        return len(self.model) + (len(self.sfm) if self.sfm is not None else 0)

    @property
    def filterable(self) -> bool:
        """Whether the model's points have a confidence to filter by."""
        return self.model.conf is not None

    def model_mask(self) -> np.ndarray:
        """The model points at or above the current confidence percentile."""
        conf = self.model.conf
        if conf is None or self.percentile <= 0 or not len(conf):
            return np.ones(len(self.model), dtype=bool)
        finite = np.isfinite(conf)
        threshold = np.percentile(conf[finite], self.percentile) if finite.any() else -np.inf
        return finite & (conf >= threshold)

    @property
    def visible_model_points(self) -> int:
        return int(self.model_mask().sum()) if self.shown != "SfM" else 0

    @property
    def visible_sfm_points(self) -> int:
        return len(self.sfm) if self.sfm is not None and self.shown != "3DFM" else 0

    @property
    def visible(self) -> int:
        return self.visible_model_points + self.visible_sfm_points

    def _draw_model(self) -> None:
        if not len(self.model):
            return
        mask = self.model_mask()
        self.model_handle = self.server.scene.add_point_cloud(
            f"{self.root}/points", points=self.model.xyz[mask], colors=self.model.rgb[mask],
            point_size=self.point_size, point_shape="circle", visible=self.shown != "SfM",
        )  # fmt: skip

    def _draw_sfm(self) -> None:
        if self.sfm is None:
            return
        colors = SFM_HIGHLIGHT_COLOR if self.sfm_highlighted else self.sfm.rgb
        self.sfm_handle = self.server.scene.add_point_cloud(
            f"{self.root}/points_sfm", points=self.sfm.xyz, colors=colors,
            point_size=self.point_size * SFM_SIZE, point_shape="diamond", visible=self.shown != "3DFM",
        )  # fmt: skip

    def set_percentile(self, percentile: float) -> None:
        if self.model.conf is None and percentile > 0:
            raise ValueError("this dataset's sparse_pc.ply has no per-point confidence")
        self.percentile = percentile
        with self.server.atomic():
            self._draw_model()

    def set_point_size(self, size: float) -> None:
        self.point_size = size
        with self.server.atomic():
            self._draw_model()
            self._draw_sfm()

    def show(self, shown: PointsShown) -> None:
        if shown not in POINTS_SHOWN:
            raise ValueError(f"points shown must be one of {POINTS_SHOWN}, got {shown!r}")
        self.shown = shown
        with self.server.atomic():
            if self.model_handle is not None:
                self.model_handle.visible = shown != "SfM"
            if self.sfm_handle is not None:
                self.sfm_handle.visible = shown != "3DFM"

    def highlight_sfm(self, on: bool) -> None:
        self.sfm_highlighted = on
        with self.server.atomic():
            self._draw_sfm()

    def remove(self) -> None:
        with self.server.atomic():
            for handle in (self.model_handle, self.sfm_handle):
                if handle is not None:
                    handle.remove()
        self.model_handle = self.sfm_handle = None
