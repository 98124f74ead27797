"""Read a dataset folder into ``SceneData``: what both viewers draw, in the **model world** (the world of
``extreme_poses.json`` / ``colmap/``, i.e. transforms.json's saved world with ``applied_transform`` undone).

A folder written by ``ns-process-data extreme-poses`` has transforms.json, sparse_pc.ply and extreme_poses.json
(per-view confidence, optional pretrained poses, pair diagnostics, optional bundle-adjustment refinement); any
other nerfstudio-style folder has transforms.json only, and then those parts are simply absent.

Light on purpose (numpy, PIL, plyfile; no torch): the standalone viewer's start-up time is mostly this.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import numpy as np

from ns_extreme.io.ply import read_ply
from ns_extreme.io.transforms_json import as_applied_transform, read_transforms_json
from ns_extreme.posing.reconstruction import PairDiagnostic
from ns_extreme.viewer.json_values import opt_float, opt_str
from ns_extreme.viewer.refinement import RefinementSummary, ViewRefinement

__all__ = ["SceneData", "ModelInfo", "load_scene", "find_dataset_json", "SFM_SOURCE"]

SFM_SOURCE = 1
"""sparse_pc.ply ``source`` value of points triangulated from feature tracks (0: the 3D foundation model's)."""
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ModelInfo:
    backbone: Optional[str]
    alignment: Optional[str]
    licence: Optional[str]


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
    """Pose set -> w2c_opencv [N, 3, 4]: "aligned" (the final poses, refined when refinement ran), optionally
    "input" (before refinement) and "pretrained" (--compare-pretrained)."""
    input_K: Optional[np.ndarray] = None
    """Intrinsics before refinement [N, 3, 3], when the refinement stage ran."""
    confidence: Optional[np.ndarray] = None
    """Per-view confidence [N] (NaN where unknown), None without extreme_poses.json."""
    intrinsics_source: Optional[list[str]] = None
    pairs: list[PairDiagnostic] = field(default_factory=list)
    view_refinement: Optional[list[Optional[ViewRefinement]]] = None
    """Per view, when the refinement stage ran."""
    refinement: Optional[RefinementSummary] = None
    points_xyz: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    points_rgb: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.uint8))
    points_conf: Optional[np.ndarray] = None
    """Per-point confidence when sparse_pc.ply has a ``confidence`` property."""
    points_sfm: Optional[np.ndarray] = None
    """bool [P]: SfM (feature-track) point, when sparse_pc.ply has a ``source`` property."""
    applied_transform: np.ndarray = field(default_factory=lambda: np.eye(4)[:3])
    """Model world -> transforms.json world ([3, 4])."""
    model: Optional[ModelInfo] = None
    """What posed the dataset (from extreme_poses.json)."""
    normal_maps: Optional[list[Optional[Path]]] = None
    """Per view, its normal map (normals/, models with a normal head), when the dataset has them."""

    @property
    def num_views(self) -> int:
        return len(self.names)

    @property
    def has_pretrained(self) -> bool:
        return "pretrained" in self.poses

    @property
    def has_input_poses(self) -> bool:
        return "input" in self.poses

    @property
    def has_sfm_points(self) -> bool:
        return self.points_sfm is not None and bool(self.points_sfm.any())

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
            f"{p} is a folder of images, not a posed dataset: "
            f"run ns-process-data extreme-poses --data {p} --output-dir OUT, then view OUT"
        )
    raise ValueError(f"{p} is not a dataset folder: no transforms.json (write one with ns-process-data extreme-poses)")


def load_scene(path: str | Path) -> SceneData:
    """Read a dataset folder (transforms.json + sparse_pc.ply + optional extreme_poses.json)."""
    json_path = find_dataset_json(path)
    try:
        names, w2c, K, sizes_wh, meta = read_transforms_json(json_path, in_original_world=True)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        reason = str(exc).removeprefix(f"{json_path}: ")
        raise ValueError(f"{json_path}: not a readable transforms.json ({reason})") from None
    if not np.all(np.isfinite(w2c)):
        raise ValueError(f"{json_path}: non-finite transform_matrix values")
    root = json_path.parent
    applied = as_applied_transform(meta["applied_transform"])
    data = SceneData(root=root, json_path=json_path, names=names, sizes_wh=sizes_wh, K=K,
                     poses={"aligned": w2c}, applied_transform=applied)  # fmt: skip

    prov_path = root / str(meta["top_level"].get("ns_extreme") or "extreme_poses.json")
    if prov_path.is_file():
        _read_provenance(data, prov_path)
    ply = meta["ply_file_path"]
    if ply and (root / ply).is_file():
        _read_points(data, root / ply)
    return data


def _read_points(data: SceneData, ply_path: Path) -> None:
    xyz, rgb, extra = read_ply(ply_path)
    if not len(xyz):
        return
    A = data.applied_transform
    data.points_xyz = (xyz - A[:, 3]) @ A[:, :3]  # transforms.json world -> model world: Aᵀ (x - t)
    data.points_rgb = rgb if rgb is not None else np.full((len(xyz), 3), 160, dtype=np.uint8)
    for key in ("confidence", "conf"):
        if key in extra:
            conf = np.asarray(extra[key], dtype=np.float64)
            data.points_conf = conf if np.isfinite(conf).any() else None
            break
    if "source" in extra:
        data.points_sfm = np.asarray(extra["source"]) == SFM_SOURCE


def _norm_rel(name: str) -> str:
    s = str(name).replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return PurePosixPath(s).as_posix() if s else s


def _nan_if_none(v: Optional[float]) -> float:
    return float("nan") if v is None else v


def _stack_if_complete(per_view: list[Any], n: int, shape: tuple[int, int]) -> Optional[np.ndarray]:
    """[n, *shape] from one matrix per view, or None unless every view has a finite one."""
    out = np.full((n, *shape), np.nan)
    for k, value in enumerate(per_view):
        if value is None:
            return None
        try:
            out[k] = np.asarray(value, dtype=np.float64)[: shape[0], : shape[1]]
        except (TypeError, ValueError):
            return None
    return out if np.isfinite(out).all() else None


def _read_provenance(data: SceneData, prov_path: Path) -> None:
    try:
        prov = json.loads(prov_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warnings.warn(f"{prov_path}: unreadable ({exc}); showing the cameras without diagnostics", stacklevel=3)
        return
    index = {_norm_rel(n): k for k, n in enumerate(data.names)}
    views = [v if isinstance(v, dict) else {} for v in prov.get("views") or []]
    view_index: dict[int, int] = {}  # extreme_poses.json view -> dataset view
    for vi, view in enumerate(views):
        k = index.get(_norm_rel(view.get("file", "")))
        if k is not None:
            view_index[vi] = k
    n = data.num_views
    by_dataset_view: list[dict[str, Any]] = [{} for _ in range(n)]
    for vi, k in view_index.items():
        by_dataset_view[k] = views[vi]

    conf = np.array([_nan_if_none(opt_float(v.get("confidence"))) for v in by_dataset_view])
    if np.isfinite(conf).any():
        data.confidence = conf
    sources = [str(v.get("intrinsics_source", "")) for v in by_dataset_view]
    if any(sources):
        data.intrinsics_source = sources
    for name, key in (("input", "input_w2c_opencv"), ("pretrained", "pretrained_w2c_opencv")):
        poses = _stack_if_complete([v.get(key) for v in by_dataset_view], n, (3, 4))
        if poses is not None:
            data.poses[name] = poses
    data.input_K = _stack_if_complete([v.get("input_K") for v in by_dataset_view], n, (3, 3))
    refinements = [ViewRefinement.from_json(v.get("refinement")) for v in by_dataset_view]
    if any(r is not None for r in refinements):
        data.view_refinement = refinements
    data.refinement = RefinementSummary.from_json(prov.get("refinement"), view_index)
    outputs = prov.get("outputs") if isinstance(prov.get("outputs"), dict) else {}
    normals = (outputs.get("normals") or {}).get("files") if isinstance(outputs.get("normals"), dict) else None
    if isinstance(normals, list) and len(normals) == len(views):
        maps: list[Optional[Path]] = [None] * n
        for vi, k in view_index.items():
            if isinstance(normals[vi], str) and (data.root / normals[vi]).is_file():
                maps[k] = data.root / normals[vi]
        data.normal_maps = maps if any(m is not None for m in maps) else None

    for p in prov.get("pairs") or []:
        try:
            i, j = view_index[int(p["i"])], view_index[int(p["j"])]
        except (KeyError, TypeError, ValueError):
            continue
        data.pairs.append(
            PairDiagnostic(
                i=i,
                j=j,
                angle_deg=_nan_if_none(opt_float(p.get("angle_deg"))),
                overlap=str(p.get("overlap", "?")),
                pretrained_angle_deg=opt_float(p.get("pretrained_angle_deg")),
                model_disagreement_deg=opt_float(p.get("model_disagreement_deg")),
            )
        )
    model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
    data.model = ModelInfo(backbone=opt_str(prov.get("backbone")), alignment=_alignment_name(model.get("alignment")),
                           licence=opt_str(model.get("licence")))  # fmt: skip


def _alignment_name(a: Any) -> Optional[str]:
    if isinstance(a, str):
        return a
    if isinstance(a, dict):
        src = a.get("source")
        return f"{Path(str(src)).name} ({a.get('parameters', '?')} bias parameters)" if src else None
    return "pretrained (no bias alignment)" if a is None else str(a)
