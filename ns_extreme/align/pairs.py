"""Training / evaluation image pairs: records, the JSON pair-list format, collection readers, mining, import.

A pair list is a JSON file::

    {"format": "ns_extreme.pairs", "version": 1, "root": "<folder the image paths are relative to>",
     "num_pairs": N, "counts": {"large": .., "small": .., "none": ..},
     "pairs": [{"scene": .., "view1": {..}, "view2": {..}, "rel_angle_deg": .., "overlap": ..,
                "overlap_reference": .. | null, "rel_translation": [x, y, z] | null}, ...]}

with one pair per line. A view is ``{"path", "width", "height", "fx", "fy", "cx", "cy",
"qvec_wxyz": [qw, qx, qy, qz], "tvec": [tx, ty, tz] | null}``: a world-to-camera COLMAP pose (OpenCV axes)
and pinhole intrinsics at the image's own resolution. ``path`` is relative to ``root`` and may not escape it
(checked on the path as written: no absolute paths, no ``..`` above the root; symbolic links inside the root are
the owner's and are followed, since a pair file can name paths but not create links).
``overlap`` is always our label (``ns_extreme.geometry.overlap``); ``overlap_reference`` keeps a label
from an imported file when it had one. ``rel_translation`` keeps an imported file's pair translation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import numpy as np
from scipy.spatial.transform import Rotation

from ns_extreme.geometry.overlap import (
    OVERLAP_CLASSES,
    OverlapClass,
    fov_xy_deg,
    overlap_class_from_angles,
    yaw_pitch_deg,
)
from ns_extreme.geometry.rotations import geodesic_angle_deg, relative_rotation
from ns_extreme.io.atomic import atomic_write_text

__all__ = [
    "PAIR_FORMAT",
    "PAIR_FORMAT_VERSION",
    "MINING_STRATEGIES",
    "PairFileError",
    "PairView",
    "PairRecord",
    "PairList",
    "SceneViews",
    "check_relative_path",
    "views_from_colmap",
    "views_from_transforms",
    "scan_megaunscene",
    "candidate_pairs",
    "label_pairs",
    "mine_pairs",
    "import_unscene_pairs",
]

log = logging.getLogger(__name__)

PAIR_FORMAT = "ns_extreme.pairs"
PAIR_FORMAT_VERSION = 1
MiningStrategy = Literal["knn-center", "knn-direction", "all"]
MINING_STRATEGIES: tuple[str, ...] = ("knn-center", "knn-direction", "all")


class PairFileError(ValueError):
    """A pair file is missing, malformed or unsafe; the message names the file, record index and field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike[str] | None = None,
        index: int | str | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = message
        self.file = None if file is None else str(file)
        self.index = index
        self.field = field
        where = []
        if self.file is not None:
            where.append(self.file)
        if index is not None:
            where.append(f"pair {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(": ".join(where + [message]))

    def located(self, *, file: str | os.PathLike[str] | None = None, index: int | str | None = None) -> PairFileError:
        """The same error with the file / record index filled in (keeps already-known values)."""
        return PairFileError(
            self.reason,
            file=self.file if self.file is not None else file,
            index=self.index if self.index is not None else index,
            field=self.field,
        )


# ----------------------------------------------------------------------------------------------------------
# field validation helpers (raise PairFileError naming the field; file/index are added by the caller)


def check_relative_path(path: str) -> str:
    """Return ``path`` (POSIX separators) if it is relative and stays inside its root, else raise ValueError."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError("image path must be a non-empty string")
    if "\x00" in path:
        raise ValueError(f"image path contains a NUL byte: {path!r}")
    posix = path.replace("\\", "/")
    if PurePosixPath(posix).is_absolute() or PureWindowsPath(path).is_absolute() or PureWindowsPath(path).drive:
        raise ValueError(f"image path must be relative to the pair list's root, got absolute path {path!r}")
    norm = posixpath.normpath(posix)
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"image path escapes the pair list's root with '..': {path!r}")
    if norm == ".":
        raise ValueError(f"image path names the root folder itself: {path!r}")
    return posix


def _get(d: Mapping[str, Any], key: str, prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise PairFileError(f"expected an object, got {type(d).__name__}", field=prefix.rstrip(".") or None)
    if key not in d:
        raise PairFileError("missing field", field=prefix + key)
    return d[key]


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise PairFileError(f"expected a number, got {value!r}", field=name)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise PairFileError(f"expected a number, got {value!r}", field=name) from None
    if not math.isfinite(out):
        raise PairFileError(f"expected a finite number, got {value!r}", field=name)
    return out


def _positive(value: Any, name: str) -> float:
    out = _finite(value, name)
    if out <= 0:
        raise PairFileError(f"expected a positive number, got {value!r}", field=name)
    return out


def _positive_int(value: Any, name: str) -> int:
    out = _positive(value, name)
    if out != int(out):
        raise PairFileError(f"expected an integer, got {value!r}", field=name)
    return int(out)


def _vector(value: Any, n: int, name: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)) or len(value) != n:
        raise PairFileError(f"expected a list of {n} numbers, got {value!r}", field=name)
    return tuple(_finite(v, f"{name}[{i}]") for i, v in enumerate(value))


def _overlap_label(value: Any, name: str, optional: bool = False) -> OverlapClass | None:
    if value is None and optional:
        return None
    if value not in OVERLAP_CLASSES:
        raise PairFileError(f"expected one of {OVERLAP_CLASSES}, got {value!r}", field=name)
    return value  # type: ignore[return-value]


def _canonical_quat_wxyz(R: np.ndarray) -> tuple[float, float, float, float]:
    x, y, z, w = Rotation.from_matrix(np.asarray(R, dtype=np.float64)[:3, :3]).as_quat()
    q = (w, x, y, z) if w >= 0 else (-w, -x, -y, -z)
    return tuple(float(v) for v in q)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class PairView:
    """One posed image: path relative to a root, pinhole intrinsics (pixels), w2c COLMAP pose (OpenCV axes)."""

    path: str
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    qvec_wxyz: tuple[float, float, float, float]
    tvec: tuple[float, float, float] | None = None

    @classmethod
    def from_w2c(cls, path: str, w2c: np.ndarray, K: np.ndarray, width: int, height: int) -> PairView:
        """Build from a world-to-camera ``[3,3]``/``[3,4]``/``[4,4]`` matrix (OpenCV) and a 3×3 ``K``."""
        w2c = np.asarray(w2c, dtype=np.float64)
        K = np.asarray(K, dtype=np.float64)
        tvec = tuple(float(v) for v in w2c[:3, 3]) if w2c.shape[1] >= 4 else None
        return cls(
            path=check_relative_path(path),
            width=int(width),
            height=int(height),
            fx=float(K[0, 0]),
            fy=float(K[1, 1]),
            cx=float(K[0, 2]),
            cy=float(K[1, 2]),
            qvec_wxyz=_canonical_quat_wxyz(w2c[:3, :3]),
            tvec=tvec,  # type: ignore[arg-type]
        )

    def rotation(self) -> np.ndarray:
        """World-to-camera rotation matrix [3, 3] (float64)."""
        w, x, y, z = self.qvec_wxyz
        return Rotation.from_quat([x, y, z, w]).as_matrix()

    def center(self) -> np.ndarray:
        """Camera centre in world coordinates, ``−Rᵀ t``; needs ``tvec``."""
        if self.tvec is None:
            raise ValueError(f"view {self.path!r} has no translation, so no camera centre")
        return -self.rotation().T @ np.asarray(self.tvec, dtype=np.float64)

    def viewing_direction(self) -> np.ndarray:
        """Optical axis (+z of the OpenCV camera) in world coordinates: the third row of the w2c rotation."""
        return self.rotation()[2].copy()

    def fov_xy_deg(self) -> tuple[float, float]:
        return fov_xy_deg(self.fx, self.fy, self.width, self.height)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "width": int(self.width),
            "height": int(self.height),
            "fx": float(self.fx),
            "fy": float(self.fy),
            "cx": float(self.cx),
            "cy": float(self.cy),
            "qvec_wxyz": [float(v) for v in self.qvec_wxyz],
            "tvec": None if self.tvec is None else [float(v) for v in self.tvec],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "") -> PairView:
        """Validate and parse; errors are PairFileError naming ``prefix + field``."""
        raw_path = _get(d, "path", prefix)
        try:
            path = check_relative_path(raw_path)
        except ValueError as exc:
            raise PairFileError(str(exc), field=prefix + "path") from None
        q = _vector(_get(d, "qvec_wxyz", prefix), 4, prefix + "qvec_wxyz")
        norm = math.sqrt(sum(v * v for v in q))
        if not 0.9 < norm < 1.1:
            raise PairFileError(f"quaternion is not unit length (norm {norm:.4g})", field=prefix + "qvec_wxyz")
        tvec_raw = d.get("tvec") if isinstance(d, Mapping) else None
        return cls(
            path=path,
            width=_positive_int(_get(d, "width", prefix), prefix + "width"),
            height=_positive_int(_get(d, "height", prefix), prefix + "height"),
            fx=_positive(_get(d, "fx", prefix), prefix + "fx"),
            fy=_positive(_get(d, "fy", prefix), prefix + "fy"),
            cx=_finite(_get(d, "cx", prefix), prefix + "cx"),
            cy=_finite(_get(d, "cy", prefix), prefix + "cy"),
            qvec_wxyz=q if abs(norm - 1.0) < 1e-9 else tuple(v / norm for v in q),  # type: ignore[arg-type]
            tvec=None if tvec_raw is None else _vector(tvec_raw, 3, prefix + "tvec"),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class PairRecord:
    """One image pair with its GT relative-rotation angle and overlap class (ours, and the source's if any)."""

    scene: str
    view1: PairView
    view2: PairView
    rel_angle_deg: float
    overlap: OverlapClass
    overlap_reference: OverlapClass | None = None
    rel_translation: tuple[float, float, float] | None = None

    def gt_relative_rotation(self) -> np.ndarray:
        """``R2 · R1ᵀ`` of the two w2c rotations [3, 3]."""
        return relative_rotation(self.view1.rotation(), self.view2.rotation())

    def to_dict(self) -> dict[str, Any]:
        return {
            "scene": self.scene,
            "view1": self.view1.to_dict(),
            "view2": self.view2.to_dict(),
            "rel_angle_deg": float(self.rel_angle_deg),
            "overlap": self.overlap,
            "overlap_reference": self.overlap_reference,
            "rel_translation": None if self.rel_translation is None else [float(v) for v in self.rel_translation],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PairRecord:
        """Validate and parse one record; errors are PairFileError naming the field (e.g. ``view1.fx``)."""
        scene = _get(d, "scene", "")
        if not isinstance(scene, str):
            raise PairFileError(f"expected a string, got {scene!r}", field="scene")
        view1 = PairView.from_dict(_get(d, "view1", ""), prefix="view1.")
        view2 = PairView.from_dict(_get(d, "view2", ""), prefix="view2.")
        angle = _finite(_get(d, "rel_angle_deg", ""), "rel_angle_deg")
        if not -1e-6 <= angle <= 180.0 + 1e-6:
            raise PairFileError(f"expected an angle in [0, 180] degrees, got {angle}", field="rel_angle_deg")
        overlap = _overlap_label(_get(d, "overlap", ""), "overlap")
        reference = _overlap_label(d.get("overlap_reference"), "overlap_reference", optional=True)
        t_raw = d.get("rel_translation")
        return cls(
            scene=scene,
            view1=view1,
            view2=view2,
            rel_angle_deg=angle,
            overlap=overlap,  # type: ignore[arg-type]
            overlap_reference=reference,
            rel_translation=None if t_raw is None else _vector(t_raw, 3, "rel_translation"),  # type: ignore[arg-type]
        )


def _class_counts(labels: Iterable[str]) -> dict[str, int]:
    counts = {c: 0 for c in OVERLAP_CLASSES}
    for label in labels:
        counts[label] += 1
    return counts


@dataclass
class PairList:
    """Pairs whose image paths are relative to ``root`` (a folder; relative roots are taken as given)."""

    root: str
    records: list[PairRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def overlap_labels(self) -> list[str]:
        return [r.overlap for r in self.records]

    def counts(self) -> dict[str, int]:
        """Number of pairs per overlap class (our labels)."""
        return _class_counts(self.overlap_labels())

    def gt_relative_rotations(self) -> np.ndarray:
        """``[N, 3, 3]`` GT relative rotations ``R2 · R1ᵀ``."""
        if not self.records:
            return np.zeros((0, 3, 3))
        return np.stack([r.gt_relative_rotation() for r in self.records])

    def image_path(self, view: PairView) -> Path:
        """Where a view's image is: ``root / view.path``."""
        return Path(self.root) / view.path

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PAIR_FORMAT,
            "version": PAIR_FORMAT_VERSION,
            "root": self.root,
            "num_pairs": len(self.records),
            "counts": self.counts(),
            "pairs": [r.to_dict() for r in self.records],
        }

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file + ``os.replace``), one pair per line."""
        head = {k: v for k, v in self.to_dict().items() if k != "pairs"}
        lines = [json.dumps(r.to_dict(), allow_nan=False, ensure_ascii=False) for r in self.records]
        text = json.dumps(head, ensure_ascii=False)[:-1] + ', "pairs": [\n' + ",\n".join(lines) + "\n]}\n"
        return atomic_write_text(path, text)

    @classmethod
    def from_dict(cls, d: Any, file: str | os.PathLike[str] | None = None) -> PairList:
        if not isinstance(d, Mapping):
            raise PairFileError(f"expected a JSON object at top level, got {type(d).__name__}", file=file)
        fmt = d.get("format", PAIR_FORMAT)
        if fmt != PAIR_FORMAT:
            raise PairFileError(f"not an ns_extreme pair list (format {fmt!r})", file=file, field="format")
        version = d.get("version", PAIR_FORMAT_VERSION)
        if not isinstance(version, int) or version > PAIR_FORMAT_VERSION:
            raise PairFileError(
                f"unsupported version {version!r} (this build reads <= {PAIR_FORMAT_VERSION})",
                file=file,
                field="version",
            )
        if "root" not in d:
            raise PairFileError("missing field", file=file, field="root")
        if not isinstance(d["root"], str):
            raise PairFileError(f"expected a string, got {d['root']!r}", file=file, field="root")
        if "pairs" not in d:
            raise PairFileError("missing field", file=file, field="pairs")
        if not isinstance(d["pairs"], list):
            raise PairFileError("expected a list of pairs", file=file, field="pairs")
        records = []
        for i, rec in enumerate(d["pairs"]):
            try:
                records.append(PairRecord.from_dict(rec))
            except PairFileError as exc:
                raise exc.located(file=file, index=i) from None
        return cls(root=d["root"], records=records)

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> PairList:
        """Read and validate; any problem raises PairFileError naming the file, pair index and field."""
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise PairFileError(f"cannot read pair list: {exc.strerror or exc}", file=path) from None
        if raw.startswith((b"\x93NUMPY", b"\x80", b"PK\x03\x04")):  # .npy, pickle, torch zip: never unpickled here
            raise PairFileError(
                "this is a NumPy / pickle file, not a JSON pair list; convert the paper's pickled pair files once with "
                "`ns-extreme-align pairs --sources FILE --allow-pickle --output pairs.json` (only for files you trust)",
                file=path,
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PairFileError("not a UTF-8 JSON file", file=path) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PairFileError(
                f"invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", file=path
            ) from None
        return cls.from_dict(data, file=path)


# ----------------------------------------------------------------------------------------------------------
# collection readers


@dataclass(frozen=True)
class SceneViews:
    """The posed views of one reconstruction (paths relative to the collection root)."""

    scene: str
    recon: str | None
    views: list[PairView]


def _relative_to_root(image_path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    rel = os.path.relpath(os.path.abspath(image_path), os.path.abspath(root))
    try:
        return check_relative_path(rel.replace(os.sep, "/"))
    except ValueError:
        raise ValueError(f"image {image_path} is not inside the root folder {root}") from None


def views_from_colmap(
    model_dir: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
) -> list[PairView]:
    """Posed views of a COLMAP model (``cameras/images.{bin,txt}``); paths relative to ``root`` (default
    ``images_dir``).

    Distortion parameters of non-pinhole camera models are ignored (only fx, fy, cx, cy are kept): the
    overlap rule needs the fields of view only. Image files are not opened.
    """
    from ns_extreme.io.colmap_model import read_colmap_model

    model = read_colmap_model(model_dir)
    root = images_dir if root is None else root
    views = []
    for name, E, Ki, (w, h) in zip(model.image_names, model.w2c_opencv, model.K, model.sizes_wh):
        views.append(PairView.from_w2c(_relative_to_root(Path(images_dir) / name, root), E, Ki, w, h))
    return views


def views_from_transforms(
    transforms_json: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> list[PairView]:
    """Posed views of a nerfstudio ``transforms.json`` (file or its folder); paths relative to ``root``.

    ``root`` defaults to the folder holding ``transforms.json``. Poses are taken in the file's world.
    """
    from ns_extreme.io.transforms_json import read_transforms_json

    image_paths, w2c, K, sizes, meta = read_transforms_json(transforms_json)
    base = Path(meta["data_dir"])
    root = base if root is None else root
    views = []
    for p, E, Ki, (w, h) in zip(image_paths, w2c, K, sizes):
        p = Path(p)
        views.append(PairView.from_w2c(_relative_to_root(p if p.is_absolute() else base / p, root), E, Ki, w, h))
    return views


def _find_sparse_model(sparse: Path) -> Path | None:
    def has_model(d: Path) -> bool:
        return any((d / f"cameras.{ext}").is_file() and (d / f"images.{ext}").is_file() for ext in ("bin", "txt"))

    if has_model(sparse):
        return sparse
    if has_model(sparse / "0"):
        return sparse / "0"
    return None


def scan_megaunscene(root: str | os.PathLike[str]) -> list[SceneViews]:
    """All reconstructions under ``root/scenes/<scene>/<recon>/{images, sparse[/0]}``, sorted by scene and recon.

    View paths are relative to ``root`` (``scenes/<scene>/<recon>/images/<COLMAP image name>``), as in the
    paper's pair files. Reconstructions without a model are skipped with a logged warning.
    """
    root = Path(root)
    scenes_dir = root / "scenes"
    if not scenes_dir.is_dir():
        raise FileNotFoundError(f"not a MegaUnScene root (no scenes/ folder): {root}")
    out = []
    for scene_dir in sorted(p for p in scenes_dir.iterdir() if p.is_dir()):
        for recon_dir in sorted(p for p in scene_dir.iterdir() if p.is_dir()):
            model = _find_sparse_model(recon_dir / "sparse")
            if model is None:
                log.warning("skipping %s: no COLMAP model in sparse/ or sparse/0/", recon_dir)
                continue
            views = views_from_colmap(model, recon_dir / "images", root=root)
            out.append(SceneViews(scene=scene_dir.name, recon=recon_dir.name, views=views))
    return out


# ----------------------------------------------------------------------------------------------------------
# mining


def _knn_edges(dist: np.ndarray, k: int, mutual: bool) -> list[tuple[int, int]]:
    n = dist.shape[0]
    d = dist.astype(np.float64, copy=True)
    np.fill_diagonal(d, np.inf)
    kk = min(k, n - 1)
    nbrs = np.argsort(d, axis=1, kind="stable")[:, :kk]  # ties broken by index: deterministic
    directed = {(i, int(j)) for i in range(n) for j in nbrs[i]}
    edges = set()
    for i, j in directed:
        if mutual and (j, i) not in directed:
            continue
        edges.add((min(i, j), max(i, j)))
    return sorted(edges)


def candidate_pairs(
    views: Sequence[PairView], strategy: MiningStrategy = "knn-center", k: int = 5, mutual: bool = False
) -> list[tuple[int, int]]:
    """Unique unordered index pairs ``(i < j)``, sorted.

    ``knn-center``: each view with its k nearest views by camera-centre distance (needs translations);
    ``knn-direction``: by the angle between optical axes; ``all``: every pair. With ``mutual`` only
    mutual nearest neighbours are kept (ExRot's graph), otherwise the union of both directions.
    """
    n = len(views)
    if strategy == "all":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < 2:
        return []
    if strategy == "knn-center":
        missing = [v.path for v in views if v.tvec is None]
        if missing:
            raise ValueError(f"knn-center needs camera translations; missing for {missing[:3]}")
        c = np.stack([v.center() for v in views])
        dist = np.linalg.norm(c[:, None, :] - c[None, :, :], axis=-1)
    elif strategy == "knn-direction":
        a = np.stack([v.viewing_direction() for v in views])
        dist = np.degrees(np.arccos(np.clip(a @ a.T, -1.0, 1.0)))
    else:
        raise ValueError(f"unknown mining strategy {strategy!r}; choose from {MINING_STRATEGIES}")
    return _knn_edges(dist, k, mutual)


def label_pairs(views: Sequence[PairView], scene: str, index_pairs: Sequence[tuple[int, int]]) -> list[PairRecord]:
    """PairRecords for index pairs: GT relative-rotation angle and overlap class by the paper's rule."""
    if not index_pairs:
        return []
    R = np.stack([v.rotation() for v in views])
    fov = [v.fov_xy_deg() for v in views]
    i_idx = np.array([i for i, _ in index_pairs])
    j_idx = np.array([j for _, j in index_pairs])
    R_rel = relative_rotation(R[i_idx], R[j_idx])
    angles = np.atleast_1d(geodesic_angle_deg(R_rel, np.eye(3)))
    yaw, pitch = yaw_pitch_deg(R_rel)
    records = []
    for n, (i, j) in enumerate(index_pairs):
        label = overlap_class_from_angles(yaw[n], pitch[n], fov[i], fov[j])
        records.append(PairRecord(scene, views[i], views[j], float(angles[n]), label))
    return records


def _select(records: list[PairRecord], max_pairs: int | None, balance: bool, seed: int) -> list[PairRecord]:
    """Deterministic subset (in the input order); see ``mine_pairs``."""
    rng = np.random.default_rng(seed)
    if not balance:
        if max_pairs is None or len(records) <= max_pairs:
            return list(records)
        keep = np.sort(rng.permutation(len(records))[:max_pairs])
        return [records[i] for i in keep]
    by_class = {c: [n for n, r in enumerate(records) if r.overlap == c] for c in OVERLAP_CLASSES}
    present = [c for c in OVERLAP_CLASSES if by_class[c]]
    if not present:
        return []
    smallest = min(len(by_class[c]) for c in present)
    per_class = dict.fromkeys(present, smallest)
    if max_pairs is not None and max_pairs < smallest * len(present):
        base, extra = divmod(max_pairs, len(present))
        per_class = {c: base + (1 if n < extra else 0) for n, c in enumerate(present)}
    keep: list[int] = []
    for c in present:  # one generator, fixed class order: deterministic for a seed
        keep.extend(int(by_class[c][i]) for i in rng.permutation(len(by_class[c]))[: per_class[c]])
    return [records[i] for i in sorted(keep)]


def mine_pairs(
    views: Sequence[PairView],
    scene: str,
    strategy: MiningStrategy = "knn-center",
    k: int = 5,
    max_pairs: int | None = None,
    balance: bool = True,
    seed: int = 0,
    mutual: bool = False,
) -> list[PairRecord]:
    """Mine labelled pairs from the posed views of one scene (one reconstruction).

    Candidates come from ``candidate_pairs`` (kNN graph on centres or viewing directions, or all pairs).
    With ``balance`` every overlap class present among the candidates keeps the same number of pairs, the
    size of the smallest present class (classes with no candidate are left out); ``max_pairs`` caps the
    total (split evenly over the present classes, the first classes in large/small/none order taking the
    remainder). Without ``balance`` a uniform random subset of ``max_pairs`` is kept. Selection is random
    with ``seed`` but deterministic; the result is in candidate order (by view index).
    """
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0, got {max_pairs}")
    records = label_pairs(views, scene, candidate_pairs(views, strategy, k, mutual))
    return _select(records, max_pairs, balance, seed)


# ----------------------------------------------------------------------------------------------------------
# import of the paper's pickled pair files


def _unscene_view(entry: Any, prefix: str) -> PairView:
    if not isinstance(entry, Mapping):
        raise PairFileError(f"expected an object, got {type(entry).__name__}", field=prefix.rstrip("."))
    width = _positive_int(_get(entry, "width", prefix), prefix + "width")
    height = _positive_int(_get(entry, "height", prefix), prefix + "height")
    q = [_finite(_get(entry, key, prefix), prefix + key) for key in ("qw", "qx", "qy", "qz")]
    cx = entry.get("cx")
    cy = entry.get("cy")
    return PairView.from_dict(
        {
            "path": str(_get(entry, "path", prefix)),
            "width": width,
            "height": height,
            "fx": _get(entry, "fx", prefix),
            "fy": _get(entry, "fy", prefix),
            "cx": width / 2.0 if cx is None else cx,
            "cy": height / 2.0 if cy is None else cy,
            "qvec_wxyz": q,
            "tvec": None,
        },
        prefix=prefix,
    )


def import_unscene_pairs(path: str | os.PathLike[str], allow_pickle: bool, *, root: str = "") -> PairList:
    """Import the paper's ``UnScenePairs*.npy`` (a pickled dict index → pair) as a PairList.

    Refused unless ``allow_pickle``: unpickling can run arbitrary code. ``overlap`` is recomputed with our
    rule from the quaternions and fields of view; the file's ``overlap_amount`` is kept as
    ``overlap_reference`` and ``t_x, t_y, t_z`` as ``rel_translation``. Missing ``cx``/``cy`` default to the
    image centre. ``root`` is the MegaUnScene folder the paths are relative to (may be set later).
    """
    if not allow_pickle:
        raise PairFileError(
            "this is a pickled NumPy file and loading a pickle can run arbitrary code; "
            "pass --allow-pickle (allow_pickle=True) only if you trust where the file came from",
            file=path,
        )
    try:
        loaded = np.load(path, allow_pickle=True)
    except (OSError, ValueError, EOFError) as exc:
        raise PairFileError(f"cannot load: {exc}", file=path) from None
    data = loaded.item() if isinstance(loaded, np.ndarray) and loaded.dtype == object and loaded.ndim == 0 else loaded
    if not isinstance(data, Mapping):
        raise PairFileError(f"expected a pickled dict of pairs, got {type(data).__name__}", file=path)

    def order(key: Any) -> tuple[int, Any]:
        try:
            return (0, int(key))
        except (TypeError, ValueError):
            return (1, str(key))

    records = []
    for key in sorted(data.keys(), key=order):
        entry = data[key]
        try:
            if not isinstance(entry, Mapping):
                raise PairFileError(f"expected a dict, got {type(entry).__name__}")
            v1 = _unscene_view(_get(entry, "img1", ""), "img1.")
            v2 = _unscene_view(_get(entry, "img2", ""), "img2.")
            reference = _overlap_label(entry.get("overlap_amount"), "overlap_amount", optional=True)
            scene = str(_get(entry, "scene", ""))
            t = None
            if all(k in entry for k in ("t_x", "t_y", "t_z")):
                t = _vector([entry["t_x"], entry["t_y"], entry["t_z"]], 3, "t_x/t_y/t_z")
            rec = label_pairs([v1, v2], scene, [(0, 1)])[0]
        except PairFileError as exc:
            raise exc.located(file=path, index=key) from None
        records.append(
            PairRecord(
                scene=rec.scene,
                view1=v1,
                view2=v2,
                rel_angle_deg=rec.rel_angle_deg,
                overlap=rec.overlap,
                overlap_reference=reference,
                rel_translation=t,  # type: ignore[arg-type]
            )
        )
    return PairList(root=root, records=records)
