"""nerfstudio `transforms.json`: write ours, read anyone's (for `--poses-from`).

Conventions: inputs/outputs are world-to-camera OpenCV extrinsics `w2c_opencv [N,3,4]` and
intrinsics `K [N,3,3]` at the original image resolution (pixels span [0,W]x[0,H]). The file stores
per-frame `transform_matrix` = camera-to-world OpenGL = inv(w2c) . diag(1,-1,-1,1).

`applied_transform` A ([3,4] rigid) maps the caller's world to the saved world: x_saved = A x.
nerfstudio records the same meaning (original -> saved); its parser folds it into
`dataparser_transform`. It is always written (identity if none) because without it nerfstudio
assumes a legacy axis swap whenever `colmap/sparse/0` sits next to the file. Points written to
`ply_file_path` must be in the saved world: map them with `apply_world_transform(A, xyz)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from ns_extreme.geometry.conventions import c2w_opengl_from_w2c_opencv, to_homogeneous, w2c_opencv_from_c2w_opengl
from ns_extreme.io.atomic import atomic_write_json

__all__ = ["write_transforms_json", "read_transforms_json", "apply_world_transform", "as_applied_transform"]

_RESERVED = {
    "camera_model", "frames", "applied_transform", "ply_file_path",
    "fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k2", "k3", "k4", "p1", "p2", "distortion_params",
}  # fmt: skip
_RIGID_TOL = 1e-6


def as_applied_transform(applied_transform: np.ndarray | None) -> np.ndarray:
    """Validate a rigid world transform ([3,4] or [4,4]; None = identity) and return it as [3,4] float64."""
    if applied_transform is None:
        return np.eye(4)[:3]
    A = np.asarray(applied_transform, dtype=np.float64)
    if A.shape not in ((3, 4), (4, 4)) or not np.all(np.isfinite(A)):
        raise ValueError(f"applied_transform must be a finite [3,4] or [4,4] matrix, got shape {A.shape}")
    if A.shape == (4, 4) and not np.allclose(A[3], [0, 0, 0, 1]):
        raise ValueError("applied_transform [4,4] must have last row (0, 0, 0, 1)")
    R = A[:3, :3]
    if not np.allclose(R.T @ R, np.eye(3), atol=_RIGID_TOL) or np.linalg.det(R) <= 0:
        raise ValueError("applied_transform must be rigid (rotation + translation, no scale or reflection)")
    return A[:3].copy()


def apply_world_transform(applied_transform: np.ndarray | None, xyz: np.ndarray) -> np.ndarray:
    """Map points [N,3] from the caller's world to the saved world: x_saved = R x + t."""
    A = as_applied_transform(applied_transform)
    return np.asarray(xyz, dtype=np.float64) @ A[:, :3].T + A[:, 3]


def _posix_rel(p: str | os.PathLike[str], what: str) -> str:
    rel = PurePath(p)
    if rel.is_absolute():
        raise ValueError(f"{what} must be relative to the dataset folder, got {p}")
    return rel.as_posix()


def _check_cameras(w2c_opencv: np.ndarray, K: np.ndarray, image_sizes_wh: np.ndarray, n: int) -> None:
    if w2c_opencv.shape not in ((n, 3, 4), (n, 4, 4)):
        raise ValueError(f"w2c_opencv must be [{n},3,4] or [{n},4,4], got {w2c_opencv.shape}")
    if K.shape != (n, 3, 3):
        raise ValueError(f"K must be [{n},3,3], got {K.shape}")
    if image_sizes_wh.shape != (n, 2) or np.any(image_sizes_wh <= 0):
        raise ValueError(f"image_sizes_wh must be [{n},2] positive (W, H), got {image_sizes_wh.shape}")
    if not (np.all(np.isfinite(w2c_opencv)) and np.all(np.isfinite(K))):
        raise ValueError("cameras contain NaN or infinite values")
    if not np.allclose(K[:, 2], [0.0, 0.0, 1.0]) or np.any(K[:, 0, 1] != 0) or np.any(K[:, 1, 0] != 0):
        raise ValueError("K must be pinhole [[fx,0,cx],[0,fy,cy],[0,0,1]] (no skew)")


def write_transforms_json(
    path: str | os.PathLike[str],
    image_paths_rel: Sequence[str | os.PathLike[str]],
    w2c_opencv: np.ndarray,
    K: np.ndarray,
    image_sizes_wh: np.ndarray,
    applied_transform: np.ndarray | None = None,
    ply_file_path: str | os.PathLike[str] | None = None,
    depth_paths_rel: Sequence[str | os.PathLike[str]] | None = None,
    mask_paths_rel: Sequence[str | os.PathLike[str]] | None = None,
    extra: dict[str, Any] | None = None,
    normal_paths_rel: Sequence[str | os.PathLike[str]] | None = None,
) -> Path:
    """Write a nerfstudio transforms.json (OPENCV model, zero distortion, per-frame intrinsics) atomically.

    Cameras are given in the caller's world; `applied_transform` (rigid, [3,4] or [4,4]) is applied
    to them before saving and recorded. Paths are relative to the folder of `path`.
    `extra` adds top-level keys (must not clash with the ones written here).
    """
    n = len(image_paths_rel)
    w2c = np.asarray(w2c_opencv, dtype=np.float64)
    Ks = np.asarray(K, dtype=np.float64)
    sizes = np.asarray(image_sizes_wh)
    _check_cameras(w2c, Ks, sizes, n)
    if np.any(sizes != np.round(sizes)):
        raise ValueError("image_sizes_wh must be whole pixels")
    for name, seq in (
        ("depth_paths_rel", depth_paths_rel),
        ("mask_paths_rel", mask_paths_rel),
        ("normal_paths_rel", normal_paths_rel),
    ):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} must have one entry per image ({n}), got {len(seq)}")
    clash = _RESERVED.intersection(extra or {})
    if clash:
        raise ValueError(f"extra keys clash with transforms.json keys: {sorted(clash)}")

    A = as_applied_transform(applied_transform)
    c2w_saved = to_homogeneous(A) @ c2w_opengl_from_w2c_opencv(to_homogeneous(w2c))

    frames = []
    for i in range(n):
        frame: dict[str, Any] = {
            "file_path": _posix_rel(image_paths_rel[i], "image path"),
            "transform_matrix": c2w_saved[i].tolist(),
            "fl_x": float(Ks[i, 0, 0]),
            "fl_y": float(Ks[i, 1, 1]),
            "cx": float(Ks[i, 0, 2]),
            "cy": float(Ks[i, 1, 2]),
            "w": int(sizes[i, 0]),
            "h": int(sizes[i, 1]),
            "k1": 0.0,
            "k2": 0.0,
            "p1": 0.0,
            "p2": 0.0,
        }
        if depth_paths_rel is not None:
            frame["depth_file_path"] = _posix_rel(depth_paths_rel[i], "depth path")
        if mask_paths_rel is not None:
            frame["mask_path"] = _posix_rel(mask_paths_rel[i], "mask path")
        if normal_paths_rel is not None:  # camera-frame normals, OpenCV axes (ns_extreme.io.normals)
            frame["normal_file_path"] = _posix_rel(normal_paths_rel[i], "normal path")
        frames.append(frame)

    out: dict[str, Any] = {"camera_model": "OPENCV", "frames": frames, "applied_transform": A.tolist()}
    if ply_file_path is not None:
        out["ply_file_path"] = _posix_rel(ply_file_path, "ply_file_path")
    out.update(extra or {})
    return atomic_write_json(path, out, indent=2)


def _frame_value(frame: dict[str, Any], meta: dict[str, Any], key: str) -> Any:
    return frame[key] if key in frame else meta.get(key)


def _frame_intrinsics(
    frame: dict[str, Any], meta: dict[str, Any], i: int
) -> tuple[float, float, float, float, int, int]:
    """fx, fy, cx, cy, w, h of one frame: per-frame keys first, then global ones (instant-ngp fov keys too)."""
    w, h = _frame_value(frame, meta, "w"), _frame_value(frame, meta, "h")
    if w is None or h is None:
        raise ValueError(f"frame {i}: image size 'w'/'h' missing (neither per frame nor global)")
    fx, fy = _frame_value(frame, meta, "fl_x"), _frame_value(frame, meta, "fl_y")
    if fx is None:
        angle_x = _frame_value(frame, meta, "camera_angle_x")
        if angle_x is None:
            raise ValueError(f"frame {i}: focal length missing (need 'fl_x' or 'camera_angle_x')")
        fx = 0.5 * float(w) / np.tan(0.5 * float(angle_x))
    if fy is None:
        angle_y = _frame_value(frame, meta, "camera_angle_y")
        fy = fx if angle_y is None else 0.5 * float(h) / np.tan(0.5 * float(angle_y))
    cx, cy = _frame_value(frame, meta, "cx"), _frame_value(frame, meta, "cy")
    cx = float(w) / 2.0 if cx is None else cx
    cy = float(h) / 2.0 if cy is None else cy
    return float(fx), float(fy), float(cx), float(cy), int(w), int(h)


def _frame_distortion(frame: dict[str, Any], meta: dict[str, Any]) -> np.ndarray:
    """[k1, k2, k3, k4, p1, p2] (nerfstudio's order), per frame if given there, else global."""
    src = frame if any(k in frame for k in ("k1", "k2", "k3", "k4", "p1", "p2", "distortion_params")) else meta
    if "distortion_params" in src:
        return np.asarray(src["distortion_params"], dtype=np.float64)
    return np.array([float(src.get(k, 0.0)) for k in ("k1", "k2", "k3", "k4", "p1", "p2")])


def read_transforms_json(
    path: str | os.PathLike[str], in_original_world: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a nerfstudio-style transforms.json (file, or a folder holding one), in file order.

    Returns (image_paths as written, relative to meta["data_dir"]; w2c_opencv [N,3,4]; K [N,3,3];
    sizes_wh int [N,2]; meta). Poses are in the saved world unless `in_original_world`, which
    undoes `applied_transform`. meta: data_dir, camera_model, distortion_params [N,6]
    (k1,k2,k3,k4,p1,p2), applied_transform [3,4] or None, ply_file_path, depth_paths, mask_paths,
    c2w_opengl [N,4,4] (each transform_matrix exactly as written, made homogeneous) and `top_level` (every
    other top-level key).
    """
    json_path = Path(path)
    if json_path.is_dir():
        json_path = json_path / "transforms.json"
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    frames = data.get("frames")
    if not frames:
        raise ValueError(f"{json_path}: no 'frames'")

    names, c2w, intr, dist = [], [], [], []
    for i, frame in enumerate(frames):
        if "file_path" not in frame or "transform_matrix" not in frame:
            raise ValueError(f"{json_path}: frame {i} lacks 'file_path' or 'transform_matrix'")
        names.append(str(frame["file_path"]))
        c2w.append(to_homogeneous(np.asarray(frame["transform_matrix"], dtype=np.float64)))
        intr.append(_frame_intrinsics(frame, data, i))
        dist.append(_frame_distortion(frame, data))
    c2w_gl = np.stack(c2w)
    R = c2w_gl[:, :3, :3]
    if not np.allclose(R @ np.swapaxes(R, 1, 2), np.eye(3), atol=1e-3):
        raise ValueError(f"{json_path}: some transform_matrix rotations are not orthonormal (scaled poses?)")
    w2c = w2c_opencv_from_c2w_opengl(c2w_gl)[:, :3, :]

    applied = np.asarray(data["applied_transform"], dtype=np.float64)[:3] if "applied_transform" in data else None
    if in_original_world and applied is not None:
        w2c = w2c @ to_homogeneous(as_applied_transform(applied))

    fx, fy, cx, cy, w, h = (np.array(v) for v in zip(*intr))
    K = np.zeros((len(frames), 3, 3))
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = fx, fy, cx, cy, 1.0
    sizes_wh = np.stack([w, h], axis=1).astype(np.int64)

    def per_frame(key: str) -> list[str] | None:
        return [str(fr[key]) for fr in frames] if all(key in fr for fr in frames) else None

    meta: dict[str, Any] = {
        "data_dir": json_path.parent,
        "camera_model": data.get("camera_model", "OPENCV"),
        "distortion_params": np.stack(dist),
        "applied_transform": applied,
        "ply_file_path": data.get("ply_file_path"),
        "depth_paths": per_frame("depth_file_path"),
        "mask_paths": per_frame("mask_path"),
        "c2w_opengl": c2w_gl,
        "top_level": {k: v for k, v in data.items() if k != "frames"},
    }
    return names, w2c, K, sizes_wh, meta
