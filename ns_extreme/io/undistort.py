"""Undistort photos with known lens distortion (OpenCV), so they can be posed and exported as pinhole images.

Camera models and parameters follow COLMAP (pixel centres at +0.5, as everywhere in ns_extreme):
``OPENCV`` fx,fy,cx,cy,k1,k2,p1,p2, ``FULL_OPENCV`` fx,fy,cx,cy,k1,k2,p1,p2,k3,k4,k5,k6 and ``OPENCV_FISHEYE``
fx,fy,cx,cy,k1,k2,k3,k4. Known lenses come from ``--camera-params``, from the cameras of a ``--poses-from`` COLMAP
model, or from a ``--poses-from`` transforms.json (nerfstudio's OPENCV with k1,k2,k3,p1,p2 and OPENCV_FISHEYE).

- OPENCV, FULL_OPENCV: the pinhole camera of ``cv2.getOptimalNewCameraMatrix`` with alpha 0 at the same size:
  every output pixel sees the scene (no black border), the focal length grows a little where the lens barrels.
- OPENCV_FISHEYE: a pinhole view at the same size and principal point whose horizontal field of view is
  ``fisheye_fov_deg`` (default 90°): a wider pinhole view stretches the border without limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ns_extreme.io.images import load_rgb
from ns_extreme.io.layout import reencode_with_exif

CAMERA_MODELS = {
    "OPENCV": "fx,fy,cx,cy,k1,k2,p1,p2",
    "FULL_OPENCV": "fx,fy,cx,cy,k1,k2,p1,p2,k3,k4,k5,k6",
    "OPENCV_FISHEYE": "fx,fy,cx,cy,k1,k2,k3,k4",
}
"""Each lens model ns_extreme undistorts, with its parameters in COLMAP's order."""
FISHEYE_FOV_DEG = 90.0


@dataclass
class LensDistortion:
    model: str
    params: list[float]
    """COLMAP order: fx, fy, cx, cy, then the distortion coefficients."""

    def K(self) -> np.ndarray:
        fx, fy, cx, cy = self.params[:4]
        return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])

    def coefficients(self) -> np.ndarray:
        return np.asarray(self.params[4:], dtype=np.float64)

    def summary(self) -> dict:
        return {"model": self.model, "params": self.params, "convention": "COLMAP (pixel centres at +0.5)"}


def parse_lens(model: str, params: str) -> LensDistortion:
    """``--camera-model`` and ``--camera-params`` as a LensDistortion (ValueError with what to write)."""
    if model not in CAMERA_MODELS:
        raise ValueError(f"--camera-model must be one of {', '.join(CAMERA_MODELS)}, got {model!r}")
    try:
        values = [float(v) for v in params.split(",")]
    except ValueError:
        values = []
    order = CAMERA_MODELS[model]
    if len(values) != len(order.split(",")) or not all(map(math.isfinite, values)) or min(values[:2]) <= 0:
        raise ValueError(f"--camera-params for {model} must be {order} (pixels of the original photos), got {params!r}")
    return LensDistortion(model, values)


def _to_cv(K: np.ndarray) -> np.ndarray:
    K = np.array(K, dtype=np.float64)
    K[:2, 2] -= 0.5
    return K


def undistorted_camera(lens: LensDistortion, size_wh: Sequence[int], fisheye_fov_deg: float = FISHEYE_FOV_DEG):
    """(pinhole K of the undistorted image, COLMAP convention; OpenCV remap maps x, y)."""
    import cv2

    w, h = int(size_wh[0]), int(size_wh[1])
    K_cv, D = _to_cv(lens.K()), lens.coefficients()
    if lens.model != "OPENCV_FISHEYE":  # OpenCV's own order: k1, k2, p1, p2[, k3, k4, k5, k6]
        new_cv, _ = cv2.getOptimalNewCameraMatrix(K_cv, D, (w, h), 0.0, (w, h))
        map_x, map_y = cv2.initUndistortRectifyMap(K_cv, D, None, new_cv, (w, h), cv2.CV_32FC1)
    else:
        f = (w / 2.0) / math.tan(math.radians(fisheye_fov_deg) / 2.0)
        new_cv = np.array([[f, 0.0, K_cv[0, 2]], [0.0, f, K_cv[1, 2]], [0.0, 0.0, 1.0]])
        D = D.reshape(4, 1)
        map_x, map_y = cv2.fisheye.initUndistortRectifyMap(K_cv, D, np.eye(3), new_cv, (w, h), cv2.CV_32FC1)
    new_K = np.array(new_cv, dtype=np.float64)
    new_K[:2, 2] += 0.5
    return new_K, map_x, map_y


def undistort_photo(
    src: Path,
    dst: Path,
    lens: LensDistortion,
    fisheye_fov_deg: float = FISHEYE_FOV_DEG,
    rgb: np.ndarray | None = None,
) -> np.ndarray:
    """Write the undistorted ``src`` (upright, EXIF carried over) to ``dst``; returns its pinhole K. ``rgb``: ``src``
    already decoded (``load_rgb``), so that a caller that has read it does not decode it twice."""
    import cv2

    rgb = load_rgb(src) if rgb is None else rgb
    h, w = rgb.shape[:2]
    new_K, map_x, map_y = undistorted_camera(lens, (w, h), fisheye_fov_deg)
    out = cv2.remap(rgb, map_x, map_y, interpolation=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT)
    reencode_with_exif(src, Image.fromarray(out), dst)
    return new_K


def undistort_mask(mask: np.ndarray, dst: Path, lens: LensDistortion, fisheye_fov_deg: float = FISHEYE_FOV_DEG) -> None:
    """Write a photo-size bool mask, undistorted like its photo (nearest neighbour; outside the lens = ignore)."""
    import cv2

    h, w = mask.shape
    _, map_x, map_y = undistorted_camera(lens, (w, h), fisheye_fov_deg)
    keep = cv2.remap(mask.astype(np.uint8) * 255, map_x, map_y, cv2.INTER_NEAREST, borderValue=0)
    Image.fromarray(keep).save(dst)


def undistort_photos(
    paths: Sequence[Path], folder: Path, lens: LensDistortion, fisheye_fov_deg: float = FISHEYE_FOV_DEG
) -> tuple[list[Path], np.ndarray]:
    """Undistort every photo into ``folder`` (same stem; PNG unless JPEG); returns (new paths, their shared K).

    All photos must have the size the parameters refer to."""
    out, K = [], None
    for p in paths:
        dst = folder / (p.name if p.suffix.lower() in (".jpg", ".jpeg", ".png") else f"{p.stem}.png")
        K_p = undistort_photo(p, dst, lens, fisheye_fov_deg)
        if K is not None and not np.allclose(K, K_p):
            raise ValueError(f"--camera-params: {p.name} differs in size from the first photo (one camera, one size)")
        K = K_p
        out.append(dst)
    return out, K


def lens_from_colmap(model: str, params: Sequence[float]) -> LensDistortion | None:
    """A COLMAP camera as a lens to undistort; None for pinhole cameras, zero distortion or a model this module does
    not undistort (the caller keeps the old behaviour: pinhole part only, with a warning). A fisheye is returned even
    with zero coefficients: its projection is equidistant, not pinhole."""
    p = [float(v) for v in params]
    if model == "SIMPLE_RADIAL":
        lens = LensDistortion("OPENCV", [p[0], p[0], p[1], p[2], p[3], 0.0, 0.0, 0.0])
    elif model == "RADIAL":
        lens = LensDistortion("OPENCV", [p[0], p[0], p[1], p[2], p[3], p[4], 0.0, 0.0])
    elif model in CAMERA_MODELS:
        lens = LensDistortion(model, p)
    else:
        return None
    return lens if lens.model == "OPENCV_FISHEYE" or np.any(lens.coefficients() != 0) else None


def lens_from_nerfstudio(camera_model: str, K: np.ndarray, distortion: Sequence[float]) -> LensDistortion | None:
    """A transforms.json camera (``camera_model``, K, nerfstudio's [k1, k2, k3, k4, p1, p2]) as a lens to undistort;
    None where there is nothing to undo or nerfstudio's model has no OpenCV equivalent (an OPENCV k4, the r⁸ term
    of nerfstudio's radial polynomial; EQUIRECTANGULAR)."""
    k1, k2, k3, k4, p1, p2 = (float(v) for v in distortion)
    pinhole = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
    if camera_model == "OPENCV_FISHEYE":
        return LensDistortion("OPENCV_FISHEYE", [*pinhole, k1, k2, k3, k4])
    if camera_model != "OPENCV" or k4 != 0 or not any((k1, k2, k3, p1, p2)):
        return None
    if k3 == 0:
        return LensDistortion("OPENCV", [*pinhole, k1, k2, p1, p2])
    return LensDistortion("FULL_OPENCV", [*pinhole, k1, k2, p1, p2, k3, 0.0, 0.0, 0.0])


def _undistort_known_photo(photo: Path, lens: LensDistortion, size_wh, source: Path, folder: Path, fov: float):
    """``photo`` undistorted into ``folder`` with its --poses-from lens; returns (path, pinhole K)."""
    rgb = load_rgb(photo)
    h, w = rgb.shape[:2]  # upright size
    if (w, h) != tuple(int(v) for v in size_wh):
        raise ValueError(
            f"--poses-from {source}: {photo.name} is {w}x{h} but its camera is {int(size_wh[0])}x{int(size_wh[1])}; "
            "undistortion needs the photos the poses were made from"
        )
    dst = folder / (photo.name if photo.suffix.lower() in (".jpg", ".jpeg", ".png") else f"{photo.stem}.png")
    return dst, undistort_photo(photo, dst, lens, fov, rgb)


def undistort_with_known_poses(
    poses_from: Path, images: Sequence[Path], folder: Path, fisheye_fov_deg: float = FISHEYE_FOV_DEG
) -> tuple[list[Path], Path | None, dict[str, dict]]:
    """Undistort the photos whose ``--poses-from`` camera (a COLMAP model or a transforms.json, matched by file
    name) has lens distortion into ``folder``, and write a copy of ``poses_from`` whose cameras for them are the
    undistorted pinhole ones (``folder/model`` or ``folder/poses/transforms.json``).

    Returns (photo paths: undistorted copies or the originals, the new --poses-from or None when no photo needed
    it, per undistorted photo the original lens)."""
    poses_from = Path(poses_from)
    if poses_from.suffix == ".json" or (poses_from / "transforms.json").is_file():
        return _undistort_with_transforms(poses_from, images, folder, fisheye_fov_deg)
    if any((poses_from / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
        return _undistort_with_colmap(poses_from, images, folder, fisheye_fov_deg)
    return list(images), None, {}  # not a model: posing says what --poses-from must be


def _undistort_with_colmap(model_dir: Path, images: Sequence[Path], folder: Path, fisheye_fov_deg: float):
    import pycolmap

    rec = pycolmap.Reconstruction(str(model_dir))
    by_name = {im.name: im for im in rec.images.values()}
    by_name.update({Path(name).name: im for name, im in list(by_name.items())})
    new_K: dict[int, np.ndarray] = {}
    out, lenses = [], {}
    for p in images:
        image = by_name.get(p.name)
        camera = rec.cameras[image.camera_id] if image is not None else None
        lens = lens_from_colmap(camera.model.name, camera.params) if camera is not None else None
        if lens is None:
            out.append(p)
            continue
        dst, K = _undistort_known_photo(p, lens, (camera.width, camera.height), model_dir, folder, fisheye_fov_deg)
        new_K[image.camera_id] = K
        lenses[p.name] = {**lens.summary(), "colmap_model": camera.model.name, "undistorted_K": K.tolist()}
        out.append(dst)
    if not new_K:
        return list(images), None, {}
    for camera_id, K in new_K.items():
        camera = rec.cameras[camera_id]
        camera.model = pycolmap.CameraModelId.PINHOLE
        camera.params = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
    (folder / "model").mkdir()
    rec.write(str(folder / "model"))
    return out, folder / "model", lenses


_NERFSTUDIO_LENS_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2", "distortion_params", "camera_model")


def _undistort_with_transforms(json_path: Path, images: Sequence[Path], folder: Path, fisheye_fov_deg: float):
    """The transforms.json case: each undistorted photo's frame gets its own pinhole intrinsics and zero distortion
    (frame keys win over the file's global ones in nerfstudio's format); everything else is copied as it is."""
    import json

    from ns_extreme.io.atomic import atomic_write_json
    from ns_extreme.io.transforms_json import read_transforms_json

    json_path = json_path / "transforms.json" if json_path.is_dir() else json_path
    names, _, K, sizes_wh, meta = read_transforms_json(json_path)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    frame_of = {Path(n).name: k for k, n in enumerate(names)}
    out, lenses = [], {}
    for p in images:
        k = frame_of.get(p.name)
        lens = None if k is None else lens_from_nerfstudio(meta["camera_model"], K[k], meta["distortion_params"][k])
        if lens is None:
            out.append(p)
            continue
        dst, new_K = _undistort_known_photo(p, lens, sizes_wh[k], json_path, folder, fisheye_fov_deg)
        frame = data["frames"][k]
        for key in _NERFSTUDIO_LENS_KEYS:
            frame.pop(key, None)
        fx, fy, cx, cy = (float(v) for v in (new_K[0, 0], new_K[1, 1], new_K[0, 2], new_K[1, 2]))
        frame.update(fl_x=fx, fl_y=fy, cx=cx, cy=cy, w=int(sizes_wh[k][0]), h=int(sizes_wh[k][1]),
                     k1=0.0, k2=0.0, k3=0.0, k4=0.0, p1=0.0, p2=0.0)  # fmt: skip
        lenses[p.name] = {**lens.summary(), "nerfstudio_model": meta["camera_model"], "undistorted_K": new_K.tolist()}
        out.append(dst)
    if not lenses:
        return list(images), None, {}
    data["camera_model"] = "OPENCV"  # the frames posing reads are pinhole now
    (folder / "poses").mkdir()
    atomic_write_json(folder / "poses" / "transforms.json", data)
    return out, folder / "poses" / "transforms.json", lenses
