"""The camera frusta of the "Extreme poses" scene: one per view, a highlight for the selected view and a line
linking the two views of the selected pair.

Switching pose sets moves the frusta in place (``position`` / ``wxyz`` under ``server.atomic()``). viser 0.2.7,
which nerfstudio 1.1.5 pins, has no in-place setter for a frustum's scale, colour or field of view: a new
size re-adds the frusta under the same names (clients replace the nodes in one atomic update).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import viser

from ns_extreme.viewer.frames import DisplayPoses
from ns_extreme.viewer.scene_data import SceneData

__all__ = ["CameraFrusta", "SELECTED_COLOR", "PAIR_COLOR"]

SELECTED_COLOR = (20, 110, 255)
PAIR_COLOR = (255, 0, 200)
SELECTED_SCALE = 1.25
"""Size of the highlight frustum relative to the others (drawn around the selected one)."""


class CameraFrusta:
    def __init__(
        self,
        server: viser.ViserServer,
        root: str,
        data: SceneData,
        poses: dict[str, DisplayPoses],
        colors: np.ndarray,
        scale: float,
        on_click: Callable[[int], None],
    ) -> None:
        self.server = server
        self.root = root
        self.data = data
        self.poses = poses
        """Pose set -> where its frusta are drawn."""
        self.colors = colors
        self.scale = scale
        self.on_click = on_click
        self.pose_set = "aligned"
        self.selected_view: Optional[int] = None
        self.linked_pair: Optional[tuple[int, int]] = None
        self.handles: list[viser.CameraFrustumHandle] = []
        self._highlight: Optional[viser.CameraFrustumHandle] = None
        self._link: Optional[viser.SceneNodeHandle] = None
        self._draw_all()

    @property
    def current(self) -> DisplayPoses:
        return self.poses[self.pose_set]

    def positions(self) -> np.ndarray:
        return np.array([h.position for h in self.handles]).reshape(-1, 3)

    def fov_aspect(self, i: int) -> tuple[float, float]:
        w, h = (float(v) for v in self.data.sizes_wh[i])
        return 2.0 * math.atan2(h / 2.0, float(self.data.K[i, 1, 1])), w / h

    def color(self, i: int) -> tuple[int, int, int]:
        r, g, b = (int(c) for c in self.colors[i])
        return r, g, b

    def _add_frustum(self, i: int, name: str, scale: float, color: tuple[int, int, int]) -> viser.CameraFrustumHandle:
        fov, aspect = self.fov_aspect(i)
        return self.server.scene.add_camera_frustum(
            name, fov=fov, aspect=aspect, scale=scale, color=color,
            wxyz=self.current.wxyz[i], position=self.current.positions[i],
        )  # fmt: skip

    def _draw_all(self) -> None:
        with self.server.atomic():
            self.handles = []
            for i in range(self.data.num_views):
                handle = self._add_frustum(i, f"{self.root}/cameras/{i:04d}", self.scale, self.color(i))
                handle.on_click(lambda _event, i=i: self.on_click(i))
                self.handles.append(handle)
            self._draw_highlight()

    def _draw_highlight(self) -> None:
        if self._highlight is not None:
            self._highlight.remove()
            self._highlight = None
        i = self.selected_view
        if i is not None:
            self._highlight = self._add_frustum(i, f"{self.root}/selected", self.scale * SELECTED_SCALE, SELECTED_COLOR)

    def _draw_link(self) -> None:
        if self._link is not None:
            self._link.remove()
            self._link = None
        if self.linked_pair is not None:
            ends = self.current.positions[list(self.linked_pair)]
            self._link = self.server.scene.add_spline_catmull_rom(
                f"{self.root}/pair", positions=ends, color=PAIR_COLOR, line_width=4.0
            )

    def show_pose_set(self, name: str) -> None:
        self.pose_set = name
        target = self.current
        with self.server.atomic():
            for i, handle in enumerate(self.handles):
                handle.wxyz = target.wxyz[i]
                handle.position = target.positions[i]
            if self._highlight is not None and self.selected_view is not None:
                self._highlight.wxyz = target.wxyz[self.selected_view]
                self._highlight.position = target.positions[self.selected_view]
            self._draw_link()  # a spline's control points cannot be moved in place

    def set_scale(self, scale: float) -> None:
        self.scale = scale
        self._draw_all()

    def select(self, i: Optional[int]) -> None:
        self.selected_view = i
        with self.server.atomic():
            self._draw_highlight()

    def link(self, pair: Optional[tuple[int, int]]) -> None:
        self.linked_pair = pair
        with self.server.atomic():
            self._draw_link()

    def remove(self) -> None:
        with self.server.atomic():
            for handle in [*self.handles, self._highlight, self._link]:
                if handle is not None:
                    handle.remove()
        self.handles, self._highlight, self._link = [], None, None
