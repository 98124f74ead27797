"""The "Extreme poses" scene and panel, shared by nerfstudio's viewer and ``ns-extreme-view``.

``ExtremePanel(server, data, frame)`` draws a dataset (``scene_data.load_scene``) on a ``viser.ViserServer``
under the scene-node prefix ``/extreme3d`` and adds one GUI folder, "Extreme poses":

* camera frusta coloured by per-view confidence (``colors``: a scale that greys out differences within
  noise; legend); clicking one (or choosing it in "View") shows its image and numbers, with its
  bundle-adjustment refinement record when the dataset has one;
* a pose-set dropdown: the final poses ("refined" when refinement ran, else "aligned"), the poses before
  refinement and the pretrained model's (``--compare-pretrained``), each when the dataset has it; the frusta
  move in place (their shape stays that of the final intrinsics);
* the point cloud (``point_layers``): the model's points with a confidence-percentile slider, SfM points as a
  separate layer (both / SfM / 3DFM, optional highlight colour), and a point-size slider;
* a table of per-pair relative-rotation angles, overlap class, the pretrained model's angle and the angle
  between the two models' estimates, with an overlap filter, a sort order and a pair selector.

``frame`` (``frames``) maps the model world to viser's world. GUI callbacks arrive on viser's thread pool;
every state change goes through one lock. Nothing here imports nerfstudio.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import viser

from ns_extreme.viewer.colors import confidence_colors, confidence_scale, legend_markdown
from ns_extreme.viewer.frames import DisplayFrame, SceneLayout
from ns_extreme.viewer.frusta import CameraFrusta
from ns_extreme.viewer.images import image_data_url
from ns_extreme.viewer.panel_text import (
    NO_SELECTION,
    VIEW_PROMPT,
    pair_label,
    pair_markdown,
    pairs_table_markdown,
    points_markdown,
    pose_set_labels,
    summary_markdown,
    view_markdown,
)
from ns_extreme.viewer.point_layers import POINTS_SHOWN, PointLayers, PointsShown
from ns_extreme.viewer.scene_data import SceneData

__all__ = ["ROOT", "FOLDER_LABEL", "ExtremePanel"]

ROOT = "/extreme3d"
"""Prefix of every scene node the panel adds."""
FOLDER_LABEL = "Extreme poses"
OVERLAP_FILTERS = ("all", "large", "small", "none")
SORT_ORDERS = ("largest angle", "largest model disagreement", "view order")
MAX_TABLE_ROWS = 40
MAX_PAIR_OPTIONS = 200
T = TypeVar("T")


class ExtremePanel:
    """Scene nodes under ``root`` and the "Extreme poses" GUI folder on a viser server (see module doc)."""

    def __init__(
        self,
        server: viser.ViserServer,
        data: SceneData,
        frame: DisplayFrame,
        *,
        root: str = ROOT,
        folder_label: str = FOLDER_LABEL,
        set_initial_camera: bool = False,
        expand: bool = True,
    ) -> None:
        self.server = server
        self.data = data
        self.frame = frame
        self.root = root.rstrip("/")
        self._lock = threading.RLock()
        self._thumbnails: dict[int, str] = {}
        self.pose_labels = pose_set_labels(data)
        """Pose set -> dropdown label."""
        self.selected_pair: Optional[int] = None
        self.table_rows: list[int] = []
        self._pair_options: dict[str, int] = {}

        display = {name: frame.cameras(w2c) for name, w2c in data.poses.items()}
        self.layout = SceneLayout.of(display["aligned"], frame.points(data.points_xyz))
        self.confidence_scale = confidence_scale(data.confidence)
        unknown = np.full(data.num_views, np.nan)
        colors = confidence_colors(data.confidence if data.confidence is not None else unknown)
        self.frusta = CameraFrusta(
            server, self.root, data, display, colors, self.layout.frustum_scale, on_click=self.select_view
        )
        self.points = PointLayers(server, self.root, data, frame, self.layout.point_size)
        self._build_gui(folder_label, expand)
        self.refresh_pairs()
        if set_initial_camera:
            server.on_client_connect(self._frame_client)

    # ------------------------------------------------------------------ gui

    def _follow(self, handle: viser.GuiInputHandle[T], apply: Callable[[T], None]) -> None:
        """Apply the input's value on every change. The value is read under the panel lock: viser runs
        callbacks on a thread pool, and a stale callback must not re-apply an old value after a newer one."""

        @handle.on_update
        def _(_event: viser.GuiEvent) -> None:
            with self._lock:
                apply(handle.value)

    def _build_gui(self, label: str, expand: bool) -> None:
        gui = self.server.gui
        d = self.data
        self.folder = gui.add_folder(label, expand_by_default=expand)
        with self.folder:
            self.summary = gui.add_markdown(summary_markdown(d), image_root=d.root)
            self.pose_dropdown: viser.GuiDropdownHandle[str] = gui.add_dropdown(
                "Poses", tuple(self.pose_labels.values()), initial_value=self.pose_labels["aligned"],
                disabled=len(self.pose_labels) == 1,
                hint="Move the frusta between the final poses, the poses before refinement (bundle adjustment) and "
                "the pretrained model's (--compare-pretrained), as far as the dataset has them",
            )  # fmt: skip
            by_label = {v: k for k, v in self.pose_labels.items()}
            self._follow(self.pose_dropdown, lambda value: self.set_pose_set(by_label[value]))
            self.frustum_size: viser.GuiInputHandle[float] = gui.add_slider(
                "Frustum size", min=0.2, max=4.0, step=0.1, initial_value=1.0, hint="Relative to the default size"
            )
            self._follow(self.frustum_size, lambda value: self.set_frustum_scale(value * self.layout.frustum_scale))
            self.view_all_button = gui.add_button(
                "View all cameras", hint="Move the viewport to an overview of the cameras"
            )
            self.view_all_button.on_click(lambda _event: self.view_all())
            self.legend = gui.add_markdown(legend_markdown(self.confidence_scale), image_root=d.root)

            with gui.add_folder("Points"):
                self._build_points_gui()

            with gui.add_folder("Selected view"):
                labels = [d.label(i) for i in range(d.num_views)]
                self.view_dropdown: viser.GuiDropdownHandle[str] = gui.add_dropdown("View", (NO_SELECTION, *labels))
                self._follow(
                    self.view_dropdown, lambda value: self.select_view(labels.index(value) if value in labels else None)
                )
                self.view_info = gui.add_markdown(VIEW_PROMPT, image_root=d.root)

            with gui.add_folder("Pairs", expand_by_default=bool(d.pairs)):
                self.overlap_dropdown: viser.GuiDropdownHandle[str] = gui.add_dropdown(
                    "Overlap", OVERLAP_FILTERS, initial_value="all"
                )
                self.sort_dropdown: viser.GuiDropdownHandle[str] = gui.add_dropdown(
                    "Sort by", SORT_ORDERS, initial_value=SORT_ORDERS[0]
                )
                self.pair_dropdown: viser.GuiDropdownHandle[str] = gui.add_dropdown("Pair", (NO_SELECTION,))
                self.pair_info = gui.add_markdown("")
                self.pairs_table = gui.add_markdown("")
                self._follow(self.overlap_dropdown, lambda _value: self.refresh_pairs())
                self._follow(self.sort_dropdown, lambda _value: self.refresh_pairs())
                self._follow(self.pair_dropdown, lambda value: self.select_pair(self._pair_options.get(value)))

    def _build_points_gui(self) -> None:
        gui = self.server.gui
        self.percentile_slider: viser.GuiInputHandle[float] = gui.add_slider(
            "Conf. percentile", min=0, max=99, step=1, initial_value=0.0, disabled=not self.points.filterable,
            hint="Hide the model's points below this percentile of per-point confidence (SfM points stay)",
        )  # fmt: skip
        self._follow(self.percentile_slider, self.set_percentile)
        self.point_size_slider: viser.GuiInputHandle[float] = gui.add_slider(
            "Point size", min=0.1, max=8.0, step=0.1, initial_value=1.0, hint="Relative to the default size"
        )
        self._follow(self.point_size_slider, lambda value: self.set_point_size(value * self.layout.point_size))
        self.points_dropdown: Optional[viser.GuiDropdownHandle[str]] = None
        self.sfm_highlight_checkbox: Optional[viser.GuiInputHandle[bool]] = None
        if self.points.sfm is not None:
            self.points_dropdown = gui.add_dropdown(
                "Show points", POINTS_SHOWN, initial_value="both",
                hint="SfM: triangulated from feature tracks (diamonds); 3DFM: the 3D foundation model's (circles)",
            )  # fmt: skip
            self._follow(self.points_dropdown, self.show_points)
            self.sfm_highlight_checkbox = gui.add_checkbox(
                "Highlight SfM", initial_value=False,
                hint="Draw SfM points in one colour instead of their image colours",
            )  # fmt: skip
            self._follow(self.sfm_highlight_checkbox, self.highlight_sfm_points)
        self.points_info = gui.add_markdown(points_markdown(self.points))

    # ------------------------------------------------------------------ camera

    def initial_camera(self) -> tuple[np.ndarray, np.ndarray]:
        """(eye, look_at) of the standalone viewer's first view: above the cameras' centre, at 40° elevation,
        from the side the cameras look towards least (so that frusta and points are both in view)."""
        import viser.transforms as vtf

        wxyz = self.frusta.poses["aligned"].wxyz
        fwd = vtf.SO3(wxyz).as_matrix()[:, :, 2].mean(axis=0) if len(wxyz) else np.zeros(3)
        fwd[2] = 0.0
        horiz = -fwd / np.linalg.norm(fwd) if np.linalg.norm(fwd) > 0.2 else np.array([-0.6, -0.8, 0.0])
        elev = math.radians(40.0)
        direction = math.cos(elev) * horiz + np.array([0.0, 0.0, math.sin(elev)])
        eye = self.layout.centre + 2.6 * self.layout.extent * direction
        return eye, self.layout.centre.copy()

    def _frame_client(self, client: viser.ClientHandle) -> None:
        eye, target = self.initial_camera()
        with client.atomic():
            client.camera.position = eye
            client.camera.look_at = target

    def view_all(self) -> None:
        """Move every connected browser's camera to the overview of all cameras."""
        for client in list(self.server.get_clients().values()):
            self._frame_client(client)

    # ------------------------------------------------------------------ state changes (callbacks and tests)

    @property
    def pose_set(self) -> str:
        return self.frusta.pose_set

    @property
    def selected_view(self) -> Optional[int]:
        return self.frusta.selected_view

    def set_pose_set(self, name: str) -> None:
        if name not in self.data.poses:
            raise ValueError(f"pose set {name!r} is not in this dataset (has: {', '.join(self.data.poses)})")
        with self._lock:
            if name == self.pose_set:
                return
            self.frusta.show_pose_set(name)
            _show_value(self.pose_dropdown, self.pose_labels[name])

    def set_frustum_scale(self, scale: float) -> None:
        with self._lock:
            if abs(float(scale) - self.frusta.scale) > 1e-12:
                self.frusta.set_scale(float(scale))
            _show_value(self.frustum_size, float(scale) / self.layout.frustum_scale)

    def set_percentile(self, percentile: float) -> None:
        with self._lock:
            self.points.set_percentile(float(percentile))
            _show_value(self.percentile_slider, float(percentile))
            self.points_info.content = points_markdown(self.points)

    def set_point_size(self, size: float) -> None:
        with self._lock:
            if abs(float(size) - self.points.point_size) > 1e-12:
                self.points.set_point_size(float(size))
            _show_value(self.point_size_slider, float(size) / self.layout.point_size)

    def show_points(self, shown: PointsShown) -> None:
        """Which point layers to show: "both", "SfM" or "3DFM"."""
        with self._lock:
            self.points.show(shown)
            if self.points_dropdown is not None:
                _show_value(self.points_dropdown, shown)
            self.points_info.content = points_markdown(self.points)

    def highlight_sfm_points(self, on: bool) -> None:
        with self._lock:
            if bool(on) != self.points.sfm_highlighted:
                self.points.highlight_sfm(bool(on))
            if self.sfm_highlight_checkbox is not None:
                _show_value(self.sfm_highlight_checkbox, bool(on))

    def select_view(self, i: Optional[int]) -> None:
        """Highlight view ``i`` (None: clear) and show its image and numbers in the panel."""
        with self._lock:
            if i == self.selected_view:
                return
            self.frusta.select(i)
            _show_value(self.view_dropdown, NO_SELECTION if i is None else self.data.label(i))
            self.view_info.content = (
                view_markdown(self.data, i, self._thumbnail(i), self._normals_thumbnail(i))
                if i is not None
                else view_markdown(self.data, None, "")
            )

    def _normals_thumbnail(self, i: int) -> str:
        """Data URL of view ``i``'s normal map, "" when the dataset has none."""
        path = self.data.normal_maps[i] if self.data.normal_maps is not None else None
        if path is None:
            return ""
        try:
            return image_data_url(path)
        except Exception as exc:  # noqa: BLE001 -- a missing file must not break the panel
            warnings.warn(f"cannot read {path}: {exc}", stacklevel=2)
            return ""

    def _thumbnail(self, i: int) -> str:
        if i not in self._thumbnails:
            try:
                self._thumbnails[i] = image_data_url(self.data.image_paths[i])
            except Exception as exc:  # noqa: BLE001 -- a missing image must not break the panel
                self._thumbnails[i] = ""
                warnings.warn(f"cannot read {self.data.image_paths[i]}: {exc}", stacklevel=2)
        return self._thumbnails[i]

    # ------------------------------------------------------------------ pairs

    def sorted_pairs(self) -> list[int]:
        """Indices into ``data.pairs`` that pass the overlap filter, in the chosen order."""
        d = self.data
        overlap, order = self.overlap_dropdown.value, self.sort_dropdown.value

        def key(k: int) -> Any:
            p = d.pairs[k]
            if order == SORT_ORDERS[0]:
                return -_nan_low(p.angle_deg)
            if order == SORT_ORDERS[1]:
                return -_nan_low(p.model_disagreement_deg)
            return (p.i, p.j)

        return sorted((k for k, p in enumerate(d.pairs) if overlap == "all" or p.overlap == overlap), key=key)

    def refresh_pairs(self) -> None:
        """Rebuild the pair table and selector for the current filter and sort order."""
        with self._lock:
            order = self.sorted_pairs()
            self.table_rows = order[:MAX_TABLE_ROWS]
            self.pairs_table.content = pairs_table_markdown(self.data, self.table_rows, len(order), MAX_TABLE_ROWS)
            shown = order[:MAX_PAIR_OPTIONS]
            if self.selected_pair in order[MAX_PAIR_OPTIONS:]:
                shown.append(self.selected_pair)
            self._pair_options = {pair_label(self.data, self.data.pairs[k]): k for k in shown}
            self.pair_dropdown.options = (NO_SELECTION, *self._pair_options)
            if self.selected_pair is not None and self.selected_pair not in shown:
                self.selected_pair = None
                self.frusta.link(None)
                self.pair_info.content = ""
            k = self.selected_pair
            _show_value(self.pair_dropdown, NO_SELECTION if k is None else pair_label(self.data, self.data.pairs[k]))

    def select_pair(self, k: Optional[int]) -> None:
        """Link the two cameras of pair ``k`` (index into ``data.pairs``) and show its numbers."""
        with self._lock:
            if k == self.selected_pair:
                return
            self.selected_pair = k
            if k is not None and k not in self._pair_options.values():  # filtered out: show all again
                self.overlap_dropdown.value = "all"
                self.refresh_pairs()
            _show_value(self.pair_dropdown, NO_SELECTION if k is None else pair_label(self.data, self.data.pairs[k]))
            self.frusta.link(None if k is None else (self.data.pairs[k].i, self.data.pairs[k].j))
            self.pair_info.content = "" if k is None else pair_markdown(self.data, k)

    # ------------------------------------------------------------------ inspection / teardown

    def state(self) -> dict[str, Any]:
        """Counts for tests and logs."""
        return {
            "frusta": len(self.frusta.handles),
            "points_total": self.points.total,
            "points_visible": self.points.visible,
            "points_shown": self.points.shown,
            "pairs": len(self.data.pairs),
            "table_rows": len(self.table_rows),
            "pose_sets": list(self.data.poses),
            "pose_set": self.pose_set,
            "selected_view": self.selected_view,
            "selected_pair": self.selected_pair,
        }

    def positions(self) -> np.ndarray:
        """Where the frusta are drawn now, [N, 3] in viser's world."""
        return self.frusta.positions()

    def remove(self) -> None:
        with self._lock:
            self.frusta.remove()
            self.points.remove()
            self.folder.remove()


def _show_value(handle: viser.GuiInputHandle[T], value: T) -> None:
    """Make a GUI input show a state set from code. Only on a change: setting a value runs the input's callback,
    which then finds the panel in that state already and does nothing."""
    if handle.value != value:
        handle.value = value


def _nan_low(v: Optional[float]) -> float:
    return -math.inf if v is None or not math.isfinite(v) else float(v)
