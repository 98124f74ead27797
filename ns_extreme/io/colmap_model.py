"""COLMAP sparse models (cameras / images / points3D) through pycolmap.

Conventions: `w2c_opencv [N,3,4]` (COLMAP's `cam_from_world`, OpenCV axes), `K [N,3,3]` and
`sizes_wh [N,2]` at the image resolution the model refers to (pixels span [0,W]x[0,H], as COLMAP).
Written models use PINHOLE cameras; points carry their tracks (2-D observations and reprojection errors) when
they come from feature matches (``SfmPoints``) and empty tracks otherwise (depth points of the 3D foundation
model). pycolmap >= 3.12 also writes rigs/frames files next to the classic three, which older readers ignore.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pycolmap

from ns_extreme.io.sfm_points import SfmPoints

__all__ = ["ColmapModel", "SfmPoints", "build_reconstruction", "write_colmap_model", "read_colmap_model"]

_ROTATION_TOL = 1e-4
_DEFAULT_RGB = 128


class ColmapModel(NamedTuple):
    """A COLMAP model as arrays, registered images in image-id order."""

    image_names: list[str]
    w2c_opencv: np.ndarray  # [N,3,4] float64
    K: np.ndarray  # [N,3,3] pinhole part of each camera
    sizes_wh: np.ndarray  # [N,2] int64
    camera_models: list[str]  # COLMAP model name per image, e.g. "PINHOLE", "SIMPLE_RADIAL"
    extra_params: list[np.ndarray]  # per image: the model's non-pinhole (distortion) parameters
    points_xyz: np.ndarray  # [M,3] float64
    points_rgb: np.ndarray  # [M,3] uint8


def _check_inputs(image_names: Sequence[str], w2c: np.ndarray, K: np.ndarray, sizes: np.ndarray) -> None:
    n = len(image_names)
    if len(set(image_names)) != n:
        raise ValueError("image names must be unique")
    if w2c.shape not in ((n, 3, 4), (n, 4, 4)) or K.shape != (n, 3, 3) or sizes.shape != (n, 2):
        raise ValueError(
            f"expected w2c [{n},3,4], K [{n},3,3], sizes [{n},2]; got {w2c.shape}, {K.shape}, {sizes.shape}"
        )
    if not (np.all(np.isfinite(w2c)) and np.all(np.isfinite(K))):
        raise ValueError("cameras contain NaN or infinite values")
    if np.any(sizes <= 0) or np.any(sizes != np.round(sizes)):
        raise ValueError("image sizes must be positive whole pixels")
    R = w2c[:, :3, :3]
    if not np.allclose(R @ np.swapaxes(R, 1, 2), np.eye(3), atol=_ROTATION_TOL) or np.any(np.linalg.det(R) <= 0):
        raise ValueError("w2c rotations must be proper rotations")
    if np.any(K[:, 0, 1] != 0) or np.any(K[:, 1, 0] != 0) or not np.allclose(K[:, 2], [0.0, 0.0, 1.0]):
        raise ValueError("K must be pinhole [[fx,0,cx],[0,fy,cy],[0,0,1]] (no skew)")


def build_reconstruction(
    image_names: Sequence[str],
    w2c: np.ndarray,
    K: np.ndarray,
    sizes: np.ndarray,
    points_xyz: np.ndarray | None = None,
    points_rgb: np.ndarray | None = None,
    sfm_points: SfmPoints | None = None,
) -> pycolmap.Reconstruction:
    """A pycolmap Reconstruction: one PINHOLE camera per distinct (size, fx, fy, cx, cy), image ids 1..N in the
    given order, ``sfm_points`` with their tracks (each observation becomes a 2-D point of its image) and
    ``points_xyz`` / ``points_rgb`` without tracks. Inputs are not checked (``write_colmap_model`` does)."""
    rec = pycolmap.Reconstruction()
    sfm = sfm_points if sfm_points is not None else SfmPoints.empty()
    obs_index = np.zeros(len(sfm.obs_view), dtype=np.int64)  # 2-D point index of each observation in its image
    camera_ids: dict[tuple[float, ...], int] = {}
    for i, name in enumerate(image_names):
        w, h = int(sizes[i, 0]), int(sizes[i, 1])
        params = (float(K[i, 0, 0]), float(K[i, 1, 1]), float(K[i, 0, 2]), float(K[i, 1, 2]))
        key = (w, h, *params)
        if key not in camera_ids:
            camera_ids[key] = len(camera_ids) + 1
            cam = pycolmap.Camera(model="PINHOLE", width=w, height=h, params=list(params), camera_id=camera_ids[key])
            rec.add_camera_with_trivial_rig(cam)
        image = pycolmap.Image(name=str(name), camera_id=camera_ids[key], image_id=i + 1)
        mine = np.flatnonzero(sfm.obs_view == i)
        obs_index[mine] = np.arange(len(mine))
        image.points2D = pycolmap.Point2DList([pycolmap.Point2D(xy) for xy in sfm.obs_xy[mine]])
        cam_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[i, :3, :3]), w2c[i, :3, 3])
        rec.add_image_with_trivial_frame(image, cam_from_world)
    order = np.argsort(sfm.obs_point, kind="stable")
    bounds = np.searchsorted(sfm.obs_point[order], np.arange(len(sfm) + 1))
    for k in range(len(sfm)):
        track = pycolmap.Track()
        for o in order[bounds[k] : bounds[k + 1]]:
            track.add_element(int(sfm.obs_view[o]) + 1, int(obs_index[o]))
        point_id = rec.add_point3D(sfm.xyz[k], track, sfm.rgb[k])
        rec.points3D[point_id].error = float(sfm.error[k])
    if points_xyz is not None:
        for xyz, rgb in zip(points_xyz, points_rgb):
            rec.add_point3D(xyz, pycolmap.Track(), rgb)
    return rec


def write_colmap_model(
    folder: str | os.PathLike[str],
    image_names: Sequence[str],
    w2c_opencv: np.ndarray,
    K: np.ndarray,
    image_sizes_wh: np.ndarray,
    points_xyz: np.ndarray | None = None,
    points_rgb: np.ndarray | None = None,
    binary: bool = True,
    sfm_points: SfmPoints | None = None,
) -> Path:
    """Write a COLMAP model to `folder` (created if needed); each file is replaced atomically.

    One PINHOLE camera per distinct (size, fx, fy, cx, cy), shared by the images that have it.
    `image_names` are relative to the images folder. `sfm_points` are written with their tracks; `points_xyz`
    get colours `points_rgb` (uint8 [M,3], grey if None) and empty tracks.
    """
    w2c = np.asarray(w2c_opencv, dtype=np.float64)
    Ks = np.asarray(K, dtype=np.float64)
    sizes = np.asarray(image_sizes_wh)
    _check_inputs(image_names, w2c, Ks, sizes)
    xyz = rgb = None
    if points_xyz is not None:
        xyz = np.asarray(points_xyz, dtype=np.float64)
        if xyz.ndim != 2 or xyz.shape[1] != 3 or not np.all(np.isfinite(xyz)):
            raise ValueError(f"points_xyz must be finite [M,3], got {xyz.shape}")
        rgb = np.full(xyz.shape, _DEFAULT_RGB, np.uint8) if points_rgb is None else np.asarray(points_rgb)
        if rgb.shape != xyz.shape or rgb.dtype != np.uint8:
            raise ValueError(f"points_rgb must be uint8 [M,3] like points_xyz, got {rgb.dtype} {rgb.shape}")
    elif points_rgb is not None:
        raise ValueError("points_rgb given without points_xyz")

    if (
        sfm_points is not None
        and len(sfm_points.obs_view)
        and (sfm_points.obs_view.min() < 0 or sfm_points.obs_view.max() >= len(image_names))
    ):
        raise ValueError("sfm_points observe an image index outside the model")
    rec = build_reconstruction(image_names, w2c, Ks, sizes, xyz, rgb, sfm_points)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".colmap.tmp-", dir=out))
    try:
        (rec.write_binary if binary else rec.write_text)(str(staging))
        for f in sorted(staging.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def read_colmap_model(folder: str | os.PathLike[str]) -> ColmapModel:
    """Read any COLMAP model (binary or text, any camera model); registered images only."""
    path = Path(folder)
    if not any((path / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
        raise FileNotFoundError(f"no COLMAP model (cameras.bin/.txt) in {path}")
    rec = pycolmap.Reconstruction(str(path))

    names, w2c, Ks, sizes, models, extras = [], [], [], [], [], []
    for image_id in sorted(rec.images):
        image = rec.images[image_id]
        if not image.has_pose:
            continue
        cam = image.camera
        names.append(image.name)
        w2c.append(image.cam_from_world().matrix())
        Ks.append(cam.calibration_matrix())
        sizes.append((cam.width, cam.height))
        models.append(cam.model.name)
        extras.append(np.asarray(cam.params, dtype=np.float64)[list(cam.extra_params_idxs())])

    points = rec.points3D
    point_list = [points[p] for p in sorted(points)]
    xyz = np.array([p.xyz for p in point_list], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in point_list], dtype=np.uint8).reshape(-1, 3)
    return ColmapModel(
        image_names=names,
        w2c_opencv=np.asarray(w2c, dtype=np.float64).reshape(-1, 3, 4),
        K=np.asarray(Ks, dtype=np.float64).reshape(-1, 3, 3),
        sizes_wh=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        camera_models=models,
        extra_params=extras,
        points_xyz=xyz,
        points_rgb=rgb,
    )
