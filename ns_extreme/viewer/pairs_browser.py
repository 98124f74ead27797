"""Browse an ``ns-extreme-align eval`` report (report.json) pair by pair in viser.

For the selected pair the scene shows camera 1 at the origin (grey frustum with image 1), camera 2 at its
ground-truth relative pose (green, with image 2) and, when the report stores them, each model's predicted
relative rotation for camera 2 (one colour per model, same position as the GT camera: the evaluation is
rotation-only). The panel ("Evaluated pairs") shows the metric table of the run, a filter by overlap
class, a sort order, the pair selector with previous/next buttons, both images and the numbers: overlap
class, GT relative-rotation angle, and per model the predicted angle and the geodesic error.

Where the numbers come from (``ns_extreme.align.evaluate`` report format ``ns_extreme.align_eval`` v1):
``pairs[k]`` = {index, scene, image1, image2, overlap, gt_angle_deg, errors_deg{label}, pred_angle_deg{label}}
plus, when present, ``gt_rel_rotation`` (3x3) and ``pred_rel_rotation{label}`` (3x3, ``R2 · R1ᵀ``). Without
``gt_rel_rotation`` the GT pose is rebuilt from the evaluated pair list (``pairs_file``: views with
``qvec_wxyz`` / ``tvec`` / intrinsics); without ``pred_rel_rotation`` only the predicted angles and errors
are shown (no predicted frustum). Images are read from ``images_root``.

Camera frame: camera 1's OpenCV axes mapped to viser's z-up world, (x, y, z) -> (x, z, -y).
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ns_extreme.geometry.rotations import geodesic_angle_deg
from ns_extreme.viewer.images import image_data_url, thumbnail_array

__all__ = ["REPORT_FORMAT", "PairsBrowser", "load_report", "serve_pairs_browser", "start_pairs_browser"]

REPORT_FORMAT = "ns_extreme.align_eval"
ROOT = "/pairs"
FOLDER_LABEL = "Evaluated pairs"
OVERLAP_FILTERS = ("all", "large", "small", "none")
SORTS = ("pair order", "largest error", "smallest error", "largest GT angle")
MAX_OPTIONS = 500
CAM_TO_VIEW = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
"""Camera 1 (OpenCV: x right, y down, z forward) -> viser world (z up)."""
GT_COLOR = (30, 170, 60)
CAM1_COLOR = (90, 90, 90)
MODEL_COLORS = ((235, 110, 20), (40, 110, 230), (200, 40, 160), (160, 120, 20), (20, 170, 190), (120, 60, 200))


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and check an eval report (a report.json or the folder holding one)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "report.json"
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p} does not exist (write one with ns-extreme-align eval)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: not a readable eval report ({exc})") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ValueError(
            f"{p}: not an ns-extreme-align eval report (format "
            f"{report.get('format') if isinstance(report, dict) else None!r})"
        )
    if not isinstance(report.get("pairs"), list) or not report["pairs"]:
        raise ValueError(f"{p}: the report has no evaluated pairs")
    report["_path"] = str(p)
    return report


def is_report(path: str | Path) -> bool:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file() or p.suffix != ".json":
        return False
    try:
        with open(p, encoding="utf-8") as f:
            head = f.read(4096)
    except OSError:
        return False
    return f'"{REPORT_FORMAT}"' in head


@dataclass
class _View:
    width: int
    height: int
    fx: float
    fy: float
    R: Optional[np.ndarray]
    t: Optional[np.ndarray]


def _quat_wxyz_to_matrix(q: Any) -> np.ndarray:
    w, x, y, z = (float(v) for v in q)
    n = math.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _view(d: Any) -> Optional[_View]:
    try:
        R = _quat_wxyz_to_matrix(d["qvec_wxyz"]) if d.get("qvec_wxyz") is not None else None
        t = np.asarray(d["tvec"], dtype=np.float64) if d.get("tvec") is not None else None
        return _View(int(d["width"]), int(d["height"]), float(d["fx"]), float(d["fy"]), R, t)
    except (KeyError, TypeError, ValueError):
        return None


def _load_pair_views(report: dict[str, Any]) -> list[Optional[tuple[_View, _View]]]:
    """Views of each evaluated pair from the pair list (None where unavailable)."""
    out: list[Optional[tuple[_View, _View]]] = [None] * len(report["pairs"])
    src = report.get("pairs_file")
    if not src:
        return out
    candidates = [Path(src), Path(report["_path"]).parent / src]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        warnings.warn(f"pair list {src} not found: GT poses only from the report", stacklevel=3)
        return out
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["pairs"]
    except (OSError, ValueError, KeyError, TypeError):
        warnings.warn(f"pair list {path} unreadable: GT poses only from the report", stacklevel=3)
        return out
    for k, p in enumerate(report["pairs"]):
        idx = p.get("index", k)
        if not isinstance(idx, int) or not 0 <= idx < len(records):
            continue
        rec = records[idx]
        if (rec.get("view1") or {}).get("path") != p.get("image1") or (rec.get("view2") or {}).get("path") != p.get(
            "image2"
        ):
            continue  # not the same pair: do not guess
        v1, v2 = _view(rec["view1"]), _view(rec["view2"])
        if v1 is not None and v2 is not None:
            out[k] = (v1, v2)
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    return f"{f:.{digits}f}" if math.isfinite(f) else "–"


class PairsBrowser:
    """The "Evaluated pairs" panel and scene on a viser server."""

    def __init__(self, server: Any, report: dict[str, Any]) -> None:
        self.server = server
        self.report = report
        self.pairs: list[dict[str, Any]] = report["pairs"]
        self.labels: list[str] = list(report.get("models") or {}) or sorted(
            {k for p in self.pairs for k in (p.get("errors_deg") or {})}
        )
        self.images_root = Path(report.get("images_root") or ".")
        self.views = _load_pair_views(report)
        self._lock = threading.RLock()
        self.selected: Optional[int] = None
        self.handles: dict[str, Any] = {}
        self.gui: dict[str, Any] = {}
        self.order: list[int] = list(range(len(self.pairs)))
        self._build_gui()
        self.refresh()
        if self.order:
            self.select(self.order[0])
        server.on_client_connect(self._frame_client)

    # ------------------------------------------------------------------ geometry

    def gt_rel_rotation(self, k: int) -> Optional[np.ndarray]:
        p = self.pairs[k]
        if p.get("gt_rel_rotation") is not None:
            return np.asarray(p["gt_rel_rotation"], dtype=np.float64)
        v = self.views[k]
        if v is None or v[0].R is None or v[1].R is None:
            return None
        return v[1].R @ v[0].R.T

    def pred_rel_rotations(self, k: int) -> dict[str, np.ndarray]:
        raw = self.pairs[k].get("pred_rel_rotation") or {}
        out = {}
        for label, R in raw.items():
            try:
                M = np.asarray(R, dtype=np.float64)
            except (TypeError, ValueError):
                continue
            if M.shape == (3, 3) and np.all(np.isfinite(M)):
                out[label] = M
        return out

    def camera2_position(self, k: int) -> np.ndarray:
        """Camera 2's centre in camera 1's frame (unit length): GT baseline if known, else 1 m to the right."""
        v = self.views[k]
        if v is not None and v[0].R is not None and v[1].R is not None and v[0].t is not None and v[1].t is not None:
            c1 = -v[0].R.T @ v[0].t
            c2 = -v[1].R.T @ v[1].t
            rel = v[0].R @ (c2 - c1)
            n = float(np.linalg.norm(rel))
            if n > 1e-9:
                return rel / n
        return np.array([1.0, 0.0, 0.0])

    def _fov_aspect(self, k: int, which: int) -> tuple[float, float]:
        v = self.views[k]
        if v is not None:
            view = v[which]
            return 2 * math.atan2(view.height / 2, view.fy), view.width / view.height
        return math.radians(50.0), 4 / 3

    def _frustum(
        self, name: str, R_cam_to_cam1: np.ndarray, position: np.ndarray, color: tuple, fov_aspect: tuple, image: Any
    ) -> Any:
        import viser.transforms as vtf

        R = CAM_TO_VIEW @ R_cam_to_cam1
        return self.server.scene.add_camera_frustum(
            name, fov=fov_aspect[0], aspect=fov_aspect[1], scale=0.4, color=color, image=image,
            wxyz=vtf.SO3.from_matrix(R).wxyz, position=CAM_TO_VIEW @ position,
        )  # fmt: skip

    def _thumb(self, rel: str) -> Any:
        try:
            return thumbnail_array(self.images_root / rel, 256)
        except Exception:  # noqa: BLE001 -- a missing image must not break browsing
            return None

    def _draw(self, k: int) -> None:
        for h in self.handles.values():
            h.remove()
        self.handles = {}
        p = self.pairs[k]
        self.handles["cam1"] = self._frustum(
            f"{ROOT}/camera1", np.eye(3), np.zeros(3), CAM1_COLOR, self._fov_aspect(k, 0), self._thumb(p["image1"])
        )
        pos2 = self.camera2_position(k)
        R_gt = self.gt_rel_rotation(k)
        img2 = self._thumb(p["image2"])
        if R_gt is not None:
            self.handles["gt2"] = self._frustum(
                f"{ROOT}/camera2_gt", R_gt.T, pos2, GT_COLOR, self._fov_aspect(k, 1), img2
            )
        for n, (label, R) in enumerate(self.pred_rel_rotations(k).items()):
            self.handles[f"pred2/{label}"] = self._frustum(
                f"{ROOT}/camera2_pred/{n}", R.T, pos2, MODEL_COLORS[n % len(MODEL_COLORS)], self._fov_aspect(k, 1), None
            )

    def _frame_client(self, client: Any) -> None:
        """First view: from behind and above camera 1, looking at the middle of the selected pair."""
        mid = 0.5 * CAM_TO_VIEW @ self.camera2_position(self.selected) if self.selected is not None else np.zeros(3)
        with client.atomic():
            client.camera.position = mid + np.array([-0.9, -2.4, 1.5])
            client.camera.look_at = mid

    # ------------------------------------------------------------------ gui

    def _model_color_md(self) -> str:
        preds = any(p.get("pred_rel_rotation") for p in self.pairs)
        parts = ["grey: camera 1 · green: camera 2, ground truth"]
        if preds:
            parts += [
                f"{_color_name(MODEL_COLORS[n % len(MODEL_COLORS)])}: camera 2, {label}"
                for n, label in enumerate(self.labels)
            ]
        else:
            parts.append("(this report stores no predicted rotations: predicted angles and errors are listed below)")
        return " · ".join(parts)

    def _metrics_md(self) -> str:
        """MRE° / RA15% / RA30% per overlap class and model (narrow enough for the panel)."""
        models = self.report.get("models") or {}
        rows = []
        for label in self.labels:
            summary = (models.get(label) or {}).get("summary") or {}
            for cls in ("large", "small", "none", "all"):
                m = summary.get(cls) or {}
                if m.get("count"):
                    rows.append(
                        f"| {label} | {cls} | {m['count']} | {_fmt(m.get('mre'))} | "
                        f"{_fmt(m.get('ra15'), 0)} | {_fmt(m.get('ra30'), 0)} |"
                    )
        if not rows:
            return ""
        return "| model | class | pairs | MRE° | RA15% | RA30% |\n|---|---|---|---|---|---|\n" + "\n".join(rows)

    def _build_gui(self) -> None:
        gui = self.server.gui
        r = self.report
        with gui.add_folder(FOLDER_LABEL):
            counts = r.get("counts") or {}
            head = (
                f"**{len(self.pairs):,} pairs** ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
                f"models: {', '.join(self.labels)}"
            )
            self.gui["summary"] = gui.add_markdown(head + "\n\n" + self._metrics_md())
            self.gui["overlap"] = gui.add_dropdown("Overlap", OVERLAP_FILTERS, initial_value="all")
            self.gui["sort"] = gui.add_dropdown("Sort by", SORTS, initial_value=SORTS[0])
            self.gui["model"] = gui.add_dropdown(
                "Error of", tuple(self.labels) or ("–",), hint="Model whose error sorts the pairs"
            )
            self.gui["pair"] = gui.add_dropdown("Pair", ("–",))
            self.gui["prev"] = gui.add_button("Previous pair")
            self.gui["next"] = gui.add_button("Next pair")
            self.gui["legend"] = gui.add_markdown(self._model_color_md())
            self.gui["info"] = gui.add_markdown("", image_root=self.images_root)
        for key in ("overlap", "sort", "model"):
            self.gui[key].on_update(self._locked(self.refresh))
        self.gui["pair"].on_update(self._locked(self._on_pair_dropdown))
        self.gui["prev"].on_click(self._locked(lambda: self.step(-1)))
        self.gui["next"].on_click(self._locked(lambda: self.step(+1)))

    def _locked(self, fn: Any) -> Any:
        """Read the GUI state and act under the lock (viser runs callbacks on a thread pool)."""

        def cb(_event: Any) -> None:
            with self._lock:
                fn()

        return cb

    def _label(self, k: int) -> str:
        p = self.pairs[k]
        model = self.gui["model"].value if "model" in self.gui else None
        err = (p.get("errors_deg") or {}).get(model)
        name = lambda s: Path(str(s)).name  # noqa: E731
        return f"#{p.get('index', k)} {name(p['image1'])} ↔ {name(p['image2'])} ({p.get('overlap')}, err {_fmt(err)}°)"

    def refresh(self) -> None:
        with self._lock:
            flt = self.gui["overlap"].value
            sort = self.gui["sort"].value
            model = self.gui["model"].value
            idx = [k for k, p in enumerate(self.pairs) if flt == "all" or p.get("overlap") == flt]

            def err(k: int) -> float:
                v = (self.pairs[k].get("errors_deg") or {}).get(model)
                return float(v) if v is not None and math.isfinite(float(v)) else -math.inf

            if sort == "largest error":
                idx.sort(key=lambda k: -err(k))
            elif sort == "smallest error":
                idx.sort(key=lambda k: (err(k) == -math.inf, err(k)))
            elif sort == "largest GT angle":
                idx.sort(key=lambda k: -float(self.pairs[k].get("gt_angle_deg") or 0.0))
            self.order = idx
            options = [self._label(k) for k in idx[:MAX_OPTIONS]]
            self._option_to_pair = dict(zip(options, idx[:MAX_OPTIONS]))
            self.gui["pair"].options = tuple(options) or ("–",)
            if self.selected is not None and self._label(self.selected) in self._option_to_pair:
                if self.gui["pair"].value != self._label(self.selected):
                    self.gui["pair"].value = self._label(self.selected)
            elif idx:
                self.select(idx[0])

    def _on_pair_dropdown(self) -> None:
        k = self._option_to_pair.get(self.gui["pair"].value)
        if k is not None:
            self.select(k)

    def step(self, delta: int) -> None:
        with self._lock:
            if not self.order:
                return
            pos = self.order.index(self.selected) if self.selected in self.order else -delta
            self.select(self.order[(pos + delta) % len(self.order)])

    def select(self, k: int) -> None:
        with self._lock:
            if k == self.selected:
                return
            self.selected = k
            label = self._label(k)
            if label in self._option_to_pair and self.gui["pair"].value != label:
                self.gui["pair"].value = label
            self._draw(k)
            self.gui["info"].content = self._info_md(k)

    def _info_md(self, k: int) -> str:
        p = self.pairs[k]
        imgs = []
        for key in ("image1", "image2"):
            try:
                imgs.append(f"![{key}]({image_data_url(self.images_root / p[key], 170)})")
            except Exception:  # noqa: BLE001
                imgs.append(f"({key} not found: `{self.images_root / p[key]}`)")
        rows = [
            ("scene", str(p.get("scene", ""))),
            ("image 1", f"`{p['image1']}`"),
            ("image 2", f"`{p['image2']}`"),
            ("overlap", f"**{p.get('overlap')}**"),
            ("GT angle", f"{_fmt(p.get('gt_angle_deg'))}°"),
        ]
        R_gt = self.gt_rel_rotation(k)
        preds = self.pred_rel_rotations(k)
        for label in self.labels:
            pred = (p.get("pred_angle_deg") or {}).get(label)
            err = (p.get("errors_deg") or {}).get(label)
            extra = ""
            if label in preds and R_gt is not None:
                extra = f" (check: {geodesic_angle_deg(preds[label], R_gt):.1f}°)"
            rows.append((label, f"predicted {_fmt(pred)}°, error **{_fmt(err)}°**{extra}"))
        table = "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
        return " ".join(imgs) + "\n\n" + table

    def state(self) -> dict[str, Any]:
        return {
            "pairs": len(self.pairs),
            "listed": len(self.order),
            "selected": self.selected,
            "frusta": sorted(self.handles),
            "models": list(self.labels),
            "gui": sorted(self.gui),
        }


def _color_name(c: tuple) -> str:
    return {MODEL_COLORS[0]: "orange", MODEL_COLORS[1]: "blue", MODEL_COLORS[2]: "magenta", MODEL_COLORS[3]: "ochre",
            MODEL_COLORS[4]: "cyan", MODEL_COLORS[5]: "violet"}.get(c, str(c))  # fmt: skip


def start_pairs_browser(report_path: str | Path, host: str = "127.0.0.1", port: int = 8080) -> Any:
    """Serve the browser for ``report_path`` and return at once (a ``standalone.RunningViewer``)."""
    import time

    from ns_extreme.viewer.standalone import RunningViewer, start_server

    t0 = time.perf_counter()
    report = load_report(report_path)
    server, bound = start_server(host, port, label=f"ns_extreme · {Path(report['_path']).parent.name} pairs")
    try:
        browser = PairsBrowser(server, report)
    except BaseException:
        server.stop()
        raise
    return RunningViewer(
        server=server, host=host, port=bound, timings_s={"total_s": time.perf_counter() - t0}, browser=browser
    )


def serve_pairs_browser(
    report_path: str | Path, host: str = "127.0.0.1", port: int = 8080, block: bool = True, say: Any = print
) -> Any:
    """``ns-extreme-align eval --view``: serve the pair browser for a report.json; with ``block`` (default) wait
    for Ctrl-C, then stop the server. Returns the ``RunningViewer`` (already stopped when ``block``)."""
    from ns_extreme.viewer.standalone import wait_forever

    viewer = start_pairs_browser(report_path, host, port)
    if not block:
        _announce(viewer, port, say)
        return viewer
    with viewer:
        _announce(viewer, port, say)
        wait_forever()
    return viewer


def _announce(viewer: Any, port: int, say: Any) -> None:
    if port and viewer.port != port:
        say(f"port {port} is taken; using {viewer.port}")
    say(f"pair browser: {viewer.url}  ({len(viewer.browser.pairs)} pairs; Ctrl-C to stop)")
