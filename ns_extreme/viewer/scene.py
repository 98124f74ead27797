"""The "Extreme poses" scene and panel, shared by nerfstudio's viewer and ``ns-extreme-view``.

``load_scene(DIR)`` reads a folder written by ``ns-process-data extreme-poses`` (or any nerfstudio-style
``transforms.json`` folder: then there is no confidence, pretrained pose set or pair table) into
``SceneData``, in the **model world** (the world of ``extreme_poses.json`` / ``colmap/``, i.e. the saved
world of transforms.json with ``applied_transform`` undone).

``ExtremePanel(server, data, frame)`` draws it on a ``viser.ViserServer`` under the scene-node prefix
``/extreme3d`` and adds one GUI folder, "Extreme poses":

* camera frusta coloured by per-view confidence (red = lowest, green = highest of this dataset; legend);
  clicking one (or choosing it in "View") shows its image and numbers;
* the initial point cloud (``sparse_pc.ply``) with a confidence-percentile slider (when the PLY has a
  per-point ``confidence`` property) and a point-size slider;
* a pose-set toggle (aligned / pretrained) when the dataset holds both (``--compare-pretrained``): the
  frusta move between the two sets;
* a table of per-pair relative-rotation angles, overlap class, the pretrained model's angle and the angle
  between the two models' estimates, with an overlap filter, a sort order and a pair selector.

``frame`` maps the model world to viser's world: ``standalone_frame`` (nerfstudio-like auto orientation,
centring and scaling) or ``nerfstudio_frame`` (the dataparser's transform and scale times
``VISER_NERFSTUDIO_SCALE_RATIO``, so the panel lines up with nerfstudio's own training cameras).
viser frusta use OpenCV camera axes, like our world-to-camera poses, so no axis flip is needed.

GUI callbacks arrive on viser's threads; every state change goes through one lock. Nothing here imports
nerfstudio.
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional

import numpy as np

from ns_extreme.io.ply import read_ply
from ns_extreme.posing.reconstruction import PairDiagnostic

__all__ = [
    "ROOT",
    "FOLDER_LABEL",
    "SceneData",
    "DisplayFrame",
    "load_scene",
    "find_dataset_json",
    "standalone_frame",
    "nerfstudio_frame",
    "confidence_colors",
    "ExtremePanel",
]

ROOT = "/extreme3d"
"""Prefix of every scene node the panel adds."""
FOLDER_LABEL = "Extreme poses"
POSE_SETS = ("aligned", "pretrained")
OVERLAP_FILTERS = ("all", "large", "small", "none")
SORT_ORDERS = ("largest angle", "largest model disagreement", "view order")
MAX_TABLE_ROWS = 40
MAX_PAIR_OPTIONS = 200
MAX_DISPLAY_POINTS = 300_000
THUMBNAIL_SIDE = 320
NO_PAIR = "(none)"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}

# Red (lowest confidence) -> yellow -> green (highest), ColorBrewer RdYlGn.
_RAMP = np.array([[215, 48, 39], [252, 141, 89], [254, 224, 139], [145, 207, 96], [26, 152, 80]], dtype=np.float64)
UNKNOWN_COLOR = (150, 150, 150)
SELECTED_COLOR = (20, 110, 255)
PAIR_COLOR = (255, 0, 200)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class SceneData:
    """A posed dataset in the model world (world-to-camera poses with OpenCV axes)."""

    root: Path
    json_path: Path
    names: list[str]
    """Image paths as written in transforms.json (relative to ``root``)."""
    sizes_wh: np.ndarray
    K: np.ndarray
    poses: dict[str, np.ndarray]
    """Pose set name ("aligned", optionally "pretrained") -> w2c_opencv [N, 3, 4]."""
    confidence: Optional[np.ndarray] = None
    """Per-view confidence [N] (NaN where unknown), None without extreme_poses.json."""
    intrinsics_source: Optional[list[str]] = None
    pairs: list[PairDiagnostic] = field(default_factory=list)
    points_xyz: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    points_rgb: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.uint8))
    points_conf: Optional[np.ndarray] = None
    """Per-point confidence when sparse_pc.ply has a ``confidence`` property."""
    applied_transform: np.ndarray = field(default_factory=lambda: np.eye(4)[:3])
    """Model world -> transforms.json world ([3, 4])."""
    info: dict[str, Any] = field(default_factory=dict)
    """model, alignment, licence, ns_extreme version (from extreme_poses.json when present)."""

    @property
    def num_views(self) -> int:
        return len(self.names)

    @property
    def has_pretrained(self) -> bool:
        return "pretrained" in self.poses

    @property
    def image_paths(self) -> list[Path]:
        return [self.root / n for n in self.names]

    def label(self, i: int) -> str:
        """Short unique label of view ``i`` (its file stem, or the relative path when stems repeat)."""
        stems = [PurePosixPath(n).stem for n in self.names]
        return stems[i] if stems.count(stems[i]) == 1 else self.names[i]


def find_dataset_json(path: str | Path) -> Path:
    """The transforms.json of a dataset folder (or the file itself); clear errors otherwise."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir() and (p / "transforms.json").is_file():
        return p / "transforms.json"
    if p.is_dir() and (p / ".extreme3d" / "transforms.json").is_file():  # an image folder posed by extreme3d
        return p / ".extreme3d" / "transforms.json"
    if p.is_dir() and any(f.suffix.lower() in _IMAGE_SUFFIXES for f in p.iterdir() if f.is_file()):
        raise ValueError(
            f"{p} is a folder of images, not a posed dataset: run ns-process-data extreme-poses --data {p} --output-dir OUT, then view OUT"
        )
    raise ValueError(f"{p} is not a dataset folder: no transforms.json (write one with ns-process-data extreme-poses)")


def _norm_rel(name: str) -> str:
    s = str(name).replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return PurePosixPath(s).as_posix() if s else s


def _opt_float(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def load_scene(path: str | Path) -> SceneData:
    """Read a dataset folder (transforms.json + sparse_pc.ply + optional extreme_poses.json).

    Deliberately light (numpy, PIL and plyfile, no torch): the standalone viewer's start-up time is mostly this.
    """
    json_path = find_dataset_json(path)
    names, w2c, K, sizes_wh, meta = read_cameras(json_path)
    root = json_path.parent
    applied = meta["applied_transform"]
    data = SceneData(root=root, json_path=json_path, names=names, sizes_wh=sizes_wh, K=K,
                     poses={"aligned": w2c}, applied_transform=applied)  # fmt: skip

    prov_path = root / str(meta.get("ns_extreme") or "extreme_poses.json")
    if prov_path.is_file():
        _read_provenance(data, prov_path)

    ply = meta.get("ply_file_path")
    if ply and (root / ply).is_file():
        xyz, rgb, extra = read_ply(root / ply)
        if len(xyz):
            # transforms.json world -> model world: x = Rᵀ (x_saved - t)
            data.points_xyz = (np.asarray(xyz, dtype=np.float64) - applied[:, 3]) @ applied[:, :3]
            data.points_rgb = rgb if rgb is not None else np.full((len(xyz), 3), 160, dtype=np.uint8)
            for key in ("confidence", "conf"):
                if key in extra:
                    conf = np.asarray(extra[key], dtype=np.float64)
                    data.points_conf = conf if np.isfinite(conf).any() else None
                    break
    return data


def _frame_intrinsics(frame: dict[str, Any], top: dict[str, Any], i: int) -> tuple[float, float, float, float, int, int]:
    """fx, fy, cx, cy, w, h: per-frame keys first, then global ones (as ns_extreme.io.transforms_json)."""

    def get(key: str) -> Any:
        return frame[key] if key in frame else top.get(key)

    w, h = get("w"), get("h")
    if w is None or h is None:
        raise ValueError(f"frame {i}: image size 'w'/'h' missing (neither per frame nor global)")
    fx, fy = get("fl_x"), get("fl_y")
    if fx is None:
        if get("camera_angle_x") is None:
            raise ValueError(f"frame {i}: focal length missing (need 'fl_x' or 'camera_angle_x')")
        fx = 0.5 * float(w) / math.tan(0.5 * float(get("camera_angle_x")))
    if fy is None:
        fy = fx if get("camera_angle_y") is None else 0.5 * float(h) / math.tan(0.5 * float(get("camera_angle_y")))
    cx = float(w) / 2.0 if get("cx") is None else get("cx")
    cy = float(h) / 2.0 if get("cy") is None else get("cy")
    return float(fx), float(fy), float(cx), float(cy), int(w), int(h)


def read_cameras(json_path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """transforms.json -> (names, w2c_opencv [N,3,4] in the model world, K [N,3,3], sizes_wh [N,2], top-level
    keys with ``applied_transform`` as a [3,4] array, identity when absent). Same result as
    ``ns_extreme.io.transforms_json.read_transforms_json(path, in_original_world=True)`` (tested), without
    importing torch."""
    try:
        top = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{json_path}: not a readable transforms.json ({exc})") from None
    frames = top.get("frames") if isinstance(top, dict) else None
    if not frames:
        raise ValueError(f"{json_path}: no 'frames'")
    names, w2c, intr = [], [], []
    for i, frame in enumerate(frames):
        if "file_path" not in frame or "transform_matrix" not in frame:
            raise ValueError(f"{json_path}: frame {i} lacks 'file_path' or 'transform_matrix'")
        names.append(str(frame["file_path"]))
        c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)[:3, :4].copy()
        c2w[:, 1:3] *= -1.0  # OpenGL -> OpenCV camera axes
        R = c2w[:, :3].T
        w2c.append(np.concatenate([R, -(R @ c2w[:, 3])[:, None]], axis=1))
        intr.append(_frame_intrinsics(frame, top, i))
    W = np.stack(w2c)
    if not np.all(np.isfinite(W)):
        raise ValueError(f"{json_path}: non-finite transform_matrix values")
    applied = np.eye(4)[:3]
    if top.get("applied_transform") is not None:
        applied = np.asarray(top["applied_transform"], dtype=np.float64)[:3, :4]
        Ra = applied[:, :3]
        if not np.allclose(Ra.T @ Ra, np.eye(3), atol=1e-6) or np.linalg.det(Ra) <= 0:
            raise ValueError(f"{json_path}: applied_transform is not a rigid transform")
        # w2c_model = w2c_saved · [A; 0 0 0 1]
        W = np.concatenate([W[:, :, :3] @ Ra, (W[:, :, :3] @ applied[:, 3] + W[:, :, 3])[..., None]], axis=2)
    fx, fy, cx, cy, w, h = (np.array(v) for v in zip(*intr))
    K = np.zeros((len(frames), 3, 3))
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = fx, fy, cx, cy, 1.0
    meta = {k: v for k, v in top.items() if k != "frames"}
    meta["applied_transform"] = applied
    return names, W, K, np.stack([w, h], axis=1).astype(np.int64), meta


def _read_provenance(data: SceneData, prov_path: Path) -> None:
    try:
        prov = json.loads(prov_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warnings.warn(f"{prov_path}: unreadable ({exc}); showing the cameras without diagnostics", stacklevel=3)
        return
    index = {_norm_rel(n): k for k, n in enumerate(data.names)}
    views = prov.get("views") or []
    view_to_name: dict[int, int] = {}
    for vi, view in enumerate(views):
        k = index.get(_norm_rel(view.get("file", "")))
        if k is not None:
            view_to_name[vi] = k
    n = data.num_views
    conf = np.full(n, np.nan)
    sources: list[str] = ["" for _ in range(n)]
    pretrained = np.full((n, 3, 4), np.nan)
    for vi, k in view_to_name.items():
        view = views[vi]
        c = _opt_float(view.get("confidence"))
        if c is not None:
            conf[k] = c
        sources[k] = str(view.get("intrinsics_source", ""))
        if "pretrained_w2c_opencv" in view:
            pretrained[k] = np.asarray(view["pretrained_w2c_opencv"], dtype=np.float64)[:3, :4]
    if np.isfinite(conf).any():
        data.confidence = conf
    if any(sources):
        data.intrinsics_source = sources
    if np.isfinite(pretrained).all():
        data.poses["pretrained"] = pretrained
    for p in prov.get("pairs") or []:
        try:
            i, j = view_to_name[int(p["i"])], view_to_name[int(p["j"])]
        except (KeyError, TypeError, ValueError):
            continue
        data.pairs.append(
            PairDiagnostic(i=i, j=j, angle_deg=float(p.get("angle_deg", float("nan"))), overlap=str(p.get("overlap", "?")),
                    pretrained_angle_deg=_opt_float(p.get("pretrained_angle_deg")),
                    model_disagreement_deg=_opt_float(p.get("model_disagreement_deg")))  # fmt: skip
        )
    model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
    data.info = {
        "backbone": prov.get("backbone"),
        "alignment": _alignment_name(model.get("alignment")),
        "licence": model.get("licence"),
        "weights": model.get("weights"),
        "ns_extreme_version": prov.get("ns_extreme_version"),
        "compare_pretrained": prov.get("compare_pretrained"),
        "points": (prov.get("points") or {}).get("count"),
    }


def _alignment_name(a: Any) -> Optional[str]:
    if isinstance(a, str):
        return a
    if isinstance(a, dict):
        src = a.get("source")
        return f"{Path(str(src)).name} ({a.get('parameters', '?')} bias parameters)" if src else None
    return "pretrained (no bias alignment)" if a is None else str(a)


# ----------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class DisplayFrame:
    """Model world -> viser world: ``x_display = s · (R x + t)`` (R a rotation)."""

    R: np.ndarray
    t: np.ndarray
    s: float
    name: str = "display"

    def points(self, x: np.ndarray) -> np.ndarray:
        return self.s * (np.asarray(x, dtype=np.float64) @ self.R.T + self.t)

    def cameras(self, w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(wxyz [N, 4], positions [N, 3]) of viser frusta (OpenCV camera axes) for w2c [N, 3, 4]."""
        import viser.transforms as vtf

        Rw = np.asarray(w2c)[:, :3, :3]
        tw = np.asarray(w2c)[:, :3, 3]
        R_c2w = np.swapaxes(Rw, 1, 2)
        centres = -np.einsum("nij,nj->ni", R_c2w, tw)
        R_disp = np.einsum("ij,njk->nik", self.R, R_c2w)
        wxyz = np.stack([vtf.SO3.from_matrix(_orthonormal(r)).wxyz for r in R_disp])
        return wxyz, self.points(centres)


def _orthonormal(R: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(R)
    out = u @ vt
    if np.linalg.det(out) < 0:
        u[:, -1] *= -1
        out = u @ vt
    return out


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector a to unit vector b."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    if c < -1 + 1e-9:  # opposite: rotate pi about any axis orthogonal to a
        axis = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def standalone_frame(data: SceneData, radius: float = 10.0) -> DisplayFrame:
    """Like nerfstudio's default parser frame ("up" orientation, centred on the cameras, max |t| = 1), times
    ``radius``: the mean camera up vector becomes +z (viser's up), the cameras fit a ±radius box."""
    w2c = data.poses["aligned"]
    R_c2w = np.swapaxes(w2c[:, :3, :3], 1, 2)
    centres = -np.einsum("nij,nj->ni", R_c2w, w2c[:, :3, 3])
    up = -R_c2w[:, :, 1].mean(axis=0)  # OpenCV: y points down
    R = _rotation_between(up, np.array([0.0, 0.0, 1.0])) if np.linalg.norm(up) > 1e-6 else np.eye(3)
    rotated = centres @ R.T
    centre = rotated.mean(axis=0)
    extent = float(np.abs(rotated - centre).max()) if len(rotated) else 0.0
    if extent < 1e-9 and len(data.points_xyz):  # cameras at one point (rotation-only capture): use the points
        extent = float(np.percentile(np.linalg.norm(data.points_xyz @ R.T - centre, axis=1), 90))
    if not math.isfinite(extent) or extent < 1e-9:
        extent = 1.0
    return DisplayFrame(R=R, t=-centre, s=radius / extent, name="standalone")


def nerfstudio_frame(dataparser_transform: Any, scale_factor: float, ratio: float = 10.0) -> DisplayFrame:
    """The dataparser's frame in nerfstudio's viewer: ``ratio · scale_factor · (T x)``, where T (3x4) maps the
    model world to the training frame (``dataparser_transform``) and ratio is VISER_NERFSTUDIO_SCALE_RATIO."""
    T = np.asarray(dataparser_transform, dtype=np.float64)[:3, :4]
    return DisplayFrame(R=_orthonormal(T[:, :3]), t=T[:, 3].copy(), s=float(scale_factor) * ratio, name="nerfstudio")


# ----------------------------------------------------------------------------------------------- colours, images


def confidence_colors(conf: Optional[np.ndarray]) -> np.ndarray:
    """uint8 [N, 3]: the dataset's lowest confidence red, highest green, unknown (NaN) grey."""
    if conf is None:
        return np.zeros((0, 3), dtype=np.uint8)
    conf = np.asarray(conf, dtype=np.float64)
    out = np.tile(np.array(UNKNOWN_COLOR, dtype=np.uint8), (len(conf), 1))
    ok = np.isfinite(conf)
    if not ok.any():
        return out
    lo, hi = float(conf[ok].min()), float(conf[ok].max())
    u = np.full(len(conf), 0.5) if hi - lo <= 1e-12 * max(1.0, abs(hi)) else (conf - lo) / (hi - lo)
    out[ok] = _ramp(u[ok])
    return out


def _ramp(u: np.ndarray) -> np.ndarray:
    x = np.clip(u, 0, 1) * (len(_RAMP) - 1)
    k = np.minimum(np.floor(x).astype(int), len(_RAMP) - 2)
    f = (x - k)[:, None]
    return np.round(_RAMP[k] * (1 - f) + _RAMP[k + 1] * f).astype(np.uint8)


def _png_data_url(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colorbar_data_url(width: int = 240, height: int = 12) -> str:
    row = _ramp(np.linspace(0, 1, width))
    return _png_data_url(np.repeat(row[None], height, axis=0))


def _load_thumbnail(path: Path, max_side: int) -> Any:
    """PIL RGB thumbnail, upright (EXIF). Unusual modes (16-bit, float) go through ns_extreme's full loader."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "1"):
            im.draft("RGB", (max_side, max_side))  # fast JPEG downscale on decode
            img = ImageOps.exif_transpose(im)
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img)
            img = img.convert("RGB")
        else:
            from ns_extreme.io.images import load_rgb

            img = Image.fromarray(load_rgb(path))
    img.thumbnail((max_side, max_side))
    return img


def image_data_url(path: Path, max_side: int = THUMBNAIL_SIDE) -> str:
    """A JPEG thumbnail of an image file as a data URL (EXIF orientation, 16-bit, RGBA handled)."""
    img = _load_thumbnail(path, max_side)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_array(path: Path, max_side: int = 160) -> np.ndarray:
    return np.asarray(_load_thumbnail(path, max_side))


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------------------------- panel


class ExtremePanel:
    """Scene nodes under ``root`` and the "Extreme poses" GUI folder on a viser server (see module doc)."""

    def __init__(
        self,
        server: Any,
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
        self._thumbs: dict[int, str] = {}
        self.pose_set = "aligned"
        self.selected_view: Optional[int] = None
        self.selected_pair: Optional[int] = None
        self.percentile = 0.0
        self.visible_points = 0
        self.table_rows: list[int] = []

        self._display = {name: frame.cameras(w2c) for name, w2c in data.poses.items()}
        wxyz, pos = self._display["aligned"]
        self.centre = pos.mean(axis=0) if len(pos) else np.zeros(3)
        extent = float(np.linalg.norm(pos - self.centre, axis=1).max()) if len(pos) > 1 else 0.0
        if extent < 1e-9:
            pts = frame.points(data.points_xyz) if len(data.points_xyz) else np.zeros((0, 3))
            extent = float(np.percentile(np.linalg.norm(pts - self.centre, axis=1), 90)) if len(pts) else 1.0
        self.extent = extent if math.isfinite(extent) and extent > 1e-9 else 1.0
        if len(pos) > 1:
            d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
            np.fill_diagonal(d, np.inf)
            nn = float(np.median(d.min(axis=1)))
        else:
            nn = self.extent
        self.frustum_scale = float(np.clip(0.3 * nn, 0.03 * self.extent, 0.1 * self.extent))
        self.point_size = 0.004 * self.extent
        self.base_frustum_scale, self.base_point_size = self.frustum_scale, self.point_size
        self.colors = confidence_colors(data.confidence) if data.confidence is not None else None

        # Point cloud in display coordinates, capped for the browser.
        pts = frame.points(data.points_xyz) if len(data.points_xyz) else np.zeros((0, 3))
        keep = np.arange(len(pts))
        if len(keep) > MAX_DISPLAY_POINTS:
            keep = np.sort(np.random.default_rng(0).choice(len(keep), MAX_DISPLAY_POINTS, replace=False))
        self._pts = pts[keep].astype(np.float32)
        self._rgb = np.asarray(data.points_rgb)[keep].astype(np.uint8)
        self._pconf = None if data.points_conf is None else np.asarray(data.points_conf)[keep]

        self.frusta: list[Any] = []
        self.points_handle: Any = None
        self.selection_handle: Any = None
        self.pair_handle: Any = None
        self.gui: dict[str, Any] = {}
        self._build_scene()
        self._build_gui(folder_label, expand)
        if set_initial_camera:
            server.on_client_connect(self._frame_client)

    # ------------------------------------------------------------------ scene

    def _frustum_color(self, i: int) -> tuple[int, int, int]:
        if self.colors is None:
            return UNKNOWN_COLOR
        return tuple(int(c) for c in self.colors[i])  # type: ignore[return-value]

    def _fov_aspect(self, i: int) -> tuple[float, float]:
        w, h = (float(v) for v in self.data.sizes_wh[i])
        fy = float(self.data.K[i, 1, 1])
        return 2.0 * math.atan2(h / 2.0, fy), w / h

    def _build_scene(self) -> None:
        scene = self.server.scene
        wxyz, pos = self._display[self.pose_set]
        for i in range(self.data.num_views):
            fov, aspect = self._fov_aspect(i)
            handle = scene.add_camera_frustum(
                f"{self.root}/cameras/{i:04d}", fov=fov, aspect=aspect, scale=self.frustum_scale,
                color=self._frustum_color(i), wxyz=wxyz[i], position=pos[i],
            )  # fmt: skip
            handle.on_click(self._click_cb(i))
            self.frusta.append(handle)
        self._draw_points()

    def _click_cb(self, i: int) -> Callable[[Any], None]:
        def cb(_event: Any) -> None:
            self.select_view(i)

        return cb

    def _locked(self, fn: Callable[[], Any]) -> Callable[[Any], None]:
        """A viser callback that reads the GUI state and acts under the panel lock: callbacks run on a thread
        pool, so a stale one must not re-apply an old value after a newer change."""

        def cb(_event: Any) -> None:
            with self._lock:
                fn()

        return cb

    def _point_mask(self) -> np.ndarray:
        if self._pconf is None or self.percentile <= 0 or not len(self._pconf):
            return np.ones(len(self._pts), dtype=bool)
        finite = np.isfinite(self._pconf)
        threshold = np.percentile(self._pconf[finite], self.percentile) if finite.any() else -np.inf
        return finite & (self._pconf >= threshold)

    def _draw_points(self) -> None:
        if not len(self._pts):
            self.visible_points = 0
            return
        mask = self._point_mask()
        self.visible_points = int(mask.sum())
        pts = self._pts[mask] if self.visible_points else np.zeros((0, 3), dtype=np.float32)
        rgb = self._rgb[mask] if self.visible_points else np.zeros((0, 3), dtype=np.uint8)
        self.points_handle = self.server.scene.add_point_cloud(
            f"{self.root}/points", points=pts, colors=rgb, point_size=self.point_size, point_shape="circle"
        )

    def initial_camera(self) -> tuple[np.ndarray, np.ndarray]:
        """(eye, look_at) of the standalone viewer's first view: above the cameras' centre, at 40° elevation,
        from the side the cameras look towards least (so that frusta and points are both in view)."""
        import viser.transforms as vtf

        wxyz, _ = self._display["aligned"]
        fwd = np.mean([vtf.SO3(q).as_matrix()[:, 2] for q in wxyz], axis=0) if len(wxyz) else np.zeros(3)
        fwd[2] = 0.0
        horiz = -fwd / np.linalg.norm(fwd) if np.linalg.norm(fwd) > 0.2 else np.array([-0.6, -0.8, 0.0])
        distance = 2.6 * self.extent
        elev = math.radians(40.0)
        eye = self.centre + distance * (math.cos(elev) * horiz + np.array([0.0, 0.0, math.sin(elev)]))
        return eye, self.centre.copy()

    def _frame_client(self, client: Any) -> None:
        eye, target = self.initial_camera()
        with client.atomic():
            client.camera.position = eye
            client.camera.look_at = target

    def view_all(self) -> None:
        """Move every connected browser's camera to the overview of all cameras."""
        for client in list(self.server.get_clients().values()):
            self._frame_client(client)

    # ------------------------------------------------------------------ gui

    def _build_gui(self, label: str, expand: bool) -> None:
        gui = self.server.gui
        d = self.data
        self.folder = gui.add_folder(label, expand_by_default=expand)
        with self.folder:
            self.gui["summary"] = gui.add_markdown(self._summary_md(), image_root=d.root)
            self.gui["pose_set"] = gui.add_dropdown(
                "Poses", POSE_SETS if d.has_pretrained else ("aligned",), initial_value="aligned",
                disabled=not d.has_pretrained,
                hint="Move the frusta between the aligned model's poses and the pretrained model's (--compare-pretrained)",
            )  # fmt: skip
            self.gui["pose_set"].on_update(self._locked(lambda: self.set_pose_set(self.gui["pose_set"].value)))
            self.gui["frustum_scale"] = gui.add_slider(
                "Frustum size", min=0.2, max=4.0, step=0.1, initial_value=1.0, hint="Relative to the default size"
            )
            self.gui["frustum_scale"].on_update(
                self._locked(lambda: self.set_frustum_scale(self.gui["frustum_scale"].value * self.base_frustum_scale))
            )
            self.gui["view_all"] = gui.add_button("View all cameras", hint="Move the viewport to an overview of the cameras")
            self.gui["view_all"].on_click(self._locked(self.view_all))
            self.gui["legend"] = gui.add_markdown(self._legend_md(), image_root=d.root)

            with gui.add_folder("Points"):
                self.gui["percentile"] = gui.add_slider(
                    "Conf. percentile", min=0, max=99, step=1, initial_value=0, disabled=self._pconf is None,
                    hint="Hide points below this percentile of per-point confidence",
                )  # fmt: skip
                self.gui["percentile"].on_update(self._locked(lambda: self.set_percentile(self.gui["percentile"].value)))
                self.gui["point_size"] = gui.add_slider(
                    "Point size", min=0.1, max=8.0, step=0.1, initial_value=1.0, hint="Relative to the default size"
                )
                self.gui["point_size"].on_update(
                    self._locked(lambda: self.set_point_size(self.gui["point_size"].value * self.base_point_size))
                )
                self.gui["points_info"] = gui.add_markdown(self._points_md())

            with gui.add_folder("Selected view"):
                self.gui["view"] = gui.add_dropdown("View", (NO_PAIR, *[d.label(i) for i in range(d.num_views)]))
                self.gui["view"].on_update(self._locked(self._on_view_dropdown))
                self.gui["view_info"] = gui.add_markdown("Click a camera (or pick one above) to see its image and numbers.", image_root=d.root)

            with gui.add_folder("Pairs", expand_by_default=bool(d.pairs)):
                self.gui["overlap_filter"] = gui.add_dropdown("Overlap", OVERLAP_FILTERS, initial_value="all")
                self.gui["sort"] = gui.add_dropdown("Sort by", SORT_ORDERS, initial_value=SORT_ORDERS[0])
                self.gui["pair"] = gui.add_dropdown("Pair", (NO_PAIR,))
                self.gui["pair_info"] = gui.add_markdown("")
                self.gui["pairs_table"] = gui.add_markdown("")
                self.gui["overlap_filter"].on_update(self._locked(self.refresh_pairs))
                self.gui["sort"].on_update(self._locked(self.refresh_pairs))
                self.gui["pair"].on_update(self._locked(self._on_pair_dropdown))
        self.refresh_pairs()

    def _summary_md(self) -> str:
        d = self.data
        parts = [f"**{d.num_views} views**, {len(d.points_xyz):,} points, {len(d.pairs):,} pairs"]
        info = d.info
        if info.get("backbone") or info.get("alignment"):
            parts.append(f"model: {info.get('backbone') or '?'}, alignment: {info.get('alignment') or '?'}")
        if info.get("licence"):
            parts.append(f"weights licence: {info['licence']}")
        parts.append(
            "pose sets: aligned + pretrained" if d.has_pretrained else "pose sets: aligned only (pose with `--compare-pretrained` to compare)"
        )
        return "  \n".join(parts)

    def _legend_md(self) -> str:
        c = self.data.confidence
        if c is None or not np.isfinite(c).any():
            return "Frustum colour: grey (no per-view confidence in this dataset)"
        lo, hi = float(np.nanmin(c)), float(np.nanmax(c))
        return (
            f"Frustum colour = view confidence  \n![confidence colour scale]({colorbar_data_url()})  \n"
            f"low **{_fmt_pair(lo, hi)[0]}** → high **{_fmt_pair(lo, hi)[1]}**"
        )

    def _points_md(self) -> str:
        total = len(self._pts)
        if total == 0:
            return "No point cloud in this dataset."
        text = f"showing {self.visible_points:,} of {total:,} points"
        if self._pconf is None:
            text += "  \n(no per-point confidence in sparse_pc.ply: the percentile filter is off)"
        elif self.percentile > 0:
            text += f" (confidence ≥ {self.percentile:g}th percentile)"
        return text

    # ------------------------------------------------------------------ state changes (callbacks and tests)

    def set_pose_set(self, name: str) -> None:
        if name not in self.data.poses:
            raise ValueError(f"pose set {name!r} is not in this dataset (has: {', '.join(self.data.poses)})")
        with self._lock:
            if name == self.pose_set:
                return
            wxyz, pos = self._display[name]
            for i, handle in enumerate(self.frusta):
                handle.wxyz = wxyz[i]
                handle.position = pos[i]
            self.pose_set = name
            if self.gui["pose_set"].value != name:
                self.gui["pose_set"].value = name
            self._redraw_selection()

    def set_frustum_scale(self, scale: float) -> None:
        with self._lock:
            if abs(float(scale) - self.frustum_scale) < 1e-12:
                return
            self.frustum_scale = float(scale)
            old = self.frusta
            self.frusta = []
            for h in old:
                h.remove()
            self._build_frusta_only()
            self._redraw_selection()

    def _build_frusta_only(self) -> None:
        wxyz, pos = self._display[self.pose_set]
        for i in range(self.data.num_views):
            fov, aspect = self._fov_aspect(i)
            handle = self.server.scene.add_camera_frustum(
                f"{self.root}/cameras/{i:04d}", fov=fov, aspect=aspect, scale=self.frustum_scale,
                color=self._frustum_color(i), wxyz=wxyz[i], position=pos[i],
            )  # fmt: skip
            handle.on_click(self._click_cb(i))
            self.frusta.append(handle)

    def set_percentile(self, p: float) -> None:
        with self._lock:
            p = float(p)
            if self._pconf is None and p > 0:
                raise ValueError("this dataset's sparse_pc.ply has no per-point confidence")
            self.percentile = p
            if self.gui["percentile"].value != p:
                self.gui["percentile"].value = p
            self._draw_points()
            self.gui["points_info"].content = self._points_md()

    def set_point_size(self, size: float) -> None:
        with self._lock:
            if abs(float(size) - self.point_size) < 1e-12:
                return
            self.point_size = float(size)
            self._draw_points()

    def _on_view_dropdown(self) -> None:
        value = self.gui["view"].value
        if value == NO_PAIR:
            self.select_view(None)
            return
        labels = [self.data.label(i) for i in range(self.data.num_views)]
        if value in labels:
            self.select_view(labels.index(value))

    def select_view(self, i: Optional[int]) -> None:
        """Highlight view ``i`` (None: clear) and show its image and numbers in the panel."""
        with self._lock:
            if i == self.selected_view:
                return
            self.selected_view = i
            label = NO_PAIR if i is None else self.data.label(i)
            if self.gui["view"].value != label:
                self.gui["view"].value = label
            self._redraw_selection()
            self.gui["view_info"].content = self._view_md(i)

    def _redraw_selection(self) -> None:
        if self.selection_handle is not None:
            self.selection_handle.remove()
            self.selection_handle = None
        if self.pair_handle is not None:
            self.pair_handle.remove()
            self.pair_handle = None
        wxyz, pos = self._display[self.pose_set]
        if self.selected_view is not None:
            i = self.selected_view
            fov, aspect = self._fov_aspect(i)
            self.selection_handle = self.server.scene.add_camera_frustum(
                f"{self.root}/selected", fov=fov, aspect=aspect, scale=self.frustum_scale * 1.25,
                color=SELECTED_COLOR, wxyz=wxyz[i], position=pos[i],
            )  # fmt: skip
        if self.selected_pair is not None:
            p = self.data.pairs[self.selected_pair]
            self.pair_handle = self.server.scene.add_spline_catmull_rom(
                f"{self.root}/pair", positions=np.stack([pos[p.i], pos[p.j]]), color=PAIR_COLOR, line_width=4.0
            )

    def _view_md(self, i: Optional[int]) -> str:
        if i is None:
            return "Click a camera (or pick one above) to see its image and numbers."
        d = self.data
        if i not in self._thumbs:
            try:
                self._thumbs[i] = image_data_url(d.image_paths[i])
            except Exception as exc:  # noqa: BLE001 -- a missing image must not break the panel
                self._thumbs[i] = ""
                warnings.warn(f"cannot read {d.image_paths[i]}: {exc}", stacklevel=2)
        w, h = (int(v) for v in d.sizes_wh[i])
        K = d.K[i]
        fovx = math.degrees(2 * math.atan2(w / 2, K[0, 0]))
        fovy = math.degrees(2 * math.atan2(h / 2, K[1, 1]))
        w2c = d.poses["aligned"][i]
        centre = -w2c[:3, :3].T @ w2c[:3, 3]
        rows = [
            ("file", f"`{d.names[i]}`"),
            ("size", f"{w} × {h} px"),
            ("fx, fy", f"{K[0, 0]:.1f}, {K[1, 1]:.1f}"),
            ("cx, cy", f"{K[0, 2]:.1f}, {K[1, 2]:.1f}"),
            ("FoV x / y", f"{fovx:.1f}° / {fovy:.1f}°"),
        ]
        if d.confidence is not None:
            c = d.confidence[i]
            rank = int(np.sum(d.confidence[np.isfinite(d.confidence)] <= c)) if math.isfinite(c) else 0
            rows.append(("confidence", f"{_fmt(float(c), 4)} (rank {rank} of {int(np.isfinite(d.confidence).sum())})"))
        if d.intrinsics_source is not None and d.intrinsics_source[i]:
            rows.append(("intrinsics", d.intrinsics_source[i]))
        rows.append(("centre (model world)", ", ".join(f"{v:.3g}" for v in centre)))
        if d.has_pretrained:
            Rp = d.poses["pretrained"][i][:3, :3]
            rows.append(("aligned vs pretrained", f"{rotation_angle_deg(w2c[:3, :3] @ Rp.T):.1f}° rotation"))
        mine = [p for p in d.pairs if i in (p.i, p.j)]
        if mine:
            counts = {c: sum(p.overlap == c for p in mine) for c in ("large", "small", "none")}
            rows.append(("pairs", ", ".join(f"{k}: {v}" for k, v in counts.items())))
        table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
        img = f"![{d.label(i)}]({self._thumbs[i]})\n\n" if self._thumbs[i] else ""
        return f"**{d.label(i)}**\n\n{img}{table}"

    # ------------------------------------------------------------------ pairs

    def _sorted_pairs(self) -> list[int]:
        d = self.data
        flt = self.gui["overlap_filter"].value if "overlap_filter" in self.gui else "all"
        order = self.gui["sort"].value if "sort" in self.gui else SORT_ORDERS[0]
        idx = [k for k, p in enumerate(d.pairs) if flt == "all" or p.overlap == flt]

        def key(k: int) -> Any:
            p = d.pairs[k]
            if order == SORT_ORDERS[0]:
                return -_nan_low(p.angle_deg)
            if order == SORT_ORDERS[1]:
                return -_nan_low(p.model_disagreement_deg)
            return (p.i, p.j)

        return sorted(idx, key=key)

    def _pair_label(self, k: int) -> str:
        p = self.data.pairs[k]
        return f"{self.data.label(p.i)} ↔ {self.data.label(p.j)}  {_fmt(p.angle_deg)}° {p.overlap}"

    def refresh_pairs(self) -> None:
        """Rebuild the pair table and selector for the current filter and sort order."""
        with self._lock:
            d = self.data
            order = self._sorted_pairs()
            self.table_rows = order[:MAX_TABLE_ROWS]
            if not d.pairs:
                self.gui["pairs_table"].content = "No pair diagnostics in this dataset (extreme_poses.json `pairs`)."
            else:
                head = "| views | angle° | overlap | pretrained° | Δ models° |\n|---|---|---|---|---|\n"
                body = "\n".join(
                    f"| {d.label(p.i)}–{d.label(p.j)} | {_fmt(p.angle_deg)} | {p.overlap} | "
                    f"{_fmt(p.pretrained_angle_deg)} | {_fmt(p.model_disagreement_deg)} |"
                    for p in (d.pairs[k] for k in self.table_rows)
                )
                counts = {c: sum(p.overlap == c for p in d.pairs) for c in ("large", "small", "none")}
                note = f"{len(order):,} pairs shown" if len(order) <= MAX_TABLE_ROWS else f"first {MAX_TABLE_ROWS} of {len(order):,} pairs"
                self.gui["pairs_table"].content = (
                    f"{note}; all: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + "  \n"
                    "angle = aligned model's relative rotation; Δ models = angle between the two models' estimates\n\n"
                    + head + body
                )
            options = [self._pair_label(k) for k in order[:MAX_PAIR_OPTIONS]]
            self._pair_options = dict(zip(options, order[:MAX_PAIR_OPTIONS]))
            current = self._pair_label(self.selected_pair) if self.selected_pair is not None else NO_PAIR
            self.gui["pair"].options = (NO_PAIR, *options)
            if current not in self._pair_options and current != NO_PAIR:
                current = NO_PAIR
                self.selected_pair = None
                self._redraw_selection()
                self.gui["pair_info"].content = ""
            if self.gui["pair"].value != current:
                self.gui["pair"].value = current

    def _on_pair_dropdown(self) -> None:
        value = self.gui["pair"].value
        self.select_pair(self._pair_options.get(value) if value != NO_PAIR else None)

    def select_pair(self, k: Optional[int]) -> None:
        """Link the two cameras of pair ``k`` (index into ``data.pairs``) and show its numbers."""
        with self._lock:
            if k == self.selected_pair:
                return
            self.selected_pair = k
            label = NO_PAIR if k is None else self._pair_label(k)
            if label != NO_PAIR and label not in self._pair_options:  # filtered out: show all again
                self.gui["overlap_filter"].value = "all"
                self.refresh_pairs()
            if self.gui["pair"].value != label:
                self.gui["pair"].value = label
            self._redraw_selection()
            if k is None:
                self.gui["pair_info"].content = ""
                return
            p = self.data.pairs[k]
            self.gui["pair_info"].content = (
                f"**{self.data.label(p.i)} ↔ {self.data.label(p.j)}**: aligned {_fmt(p.angle_deg)}°, "
                f"pretrained {_fmt(p.pretrained_angle_deg)}°, Δ models {_fmt(p.model_disagreement_deg)}°, overlap **{p.overlap}**"
            )

    # ------------------------------------------------------------------ inspection / teardown

    def state(self) -> dict[str, Any]:
        """Counts for tests and logs."""
        return {
            "frusta": len(self.frusta),
            "points_total": len(self._pts),
            "points_visible": self.visible_points,
            "pairs": len(self.data.pairs),
            "table_rows": len(self.table_rows),
            "pose_sets": list(self.data.poses),
            "pose_set": self.pose_set,
            "selected_view": self.selected_view,
            "selected_pair": self.selected_pair,
            "gui": sorted(self.gui),
        }

    def positions(self) -> np.ndarray:
        return np.array([h.position for h in self.frusta])

    def remove(self) -> None:
        with self._lock:
            for h in [*self.frusta, self.points_handle, self.selection_handle, self.pair_handle]:
                if h is not None:
                    h.remove()
            self.frusta = []
            self.folder.remove()


def _fmt_pair(lo: float, hi: float) -> tuple[str, str]:
    """Enough significant digits to tell lo and hi apart."""
    for digits in range(3, 8):
        a, b = f"{lo:.{digits}g}", f"{hi:.{digits}g}"
        if a != b or lo == hi:
            return a, b
    return a, b


def rotation_angle_deg(R: np.ndarray) -> float:
    """Geodesic angle of a rotation matrix, degrees (clamped)."""
    return math.degrees(math.acos(min(1.0, max(-1.0, (float(np.trace(R)) - 1.0) / 2.0))))


def _nan_low(v: Optional[float]) -> float:
    return -math.inf if v is None or not math.isfinite(v) else float(v)


def build_panel(server: Any, dataset: str | Path, frame: Optional[DisplayFrame] = None, **kwargs: Any) -> ExtremePanel:
    """Load ``dataset`` and build the panel (standalone frame unless ``frame`` is given)."""
    data = load_scene(dataset)
    return ExtremePanel(server, data, frame or standalone_frame(data), **kwargs)
