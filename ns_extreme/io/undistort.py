"""Undistort photos with known lens distortion (OpenCV), so they can be posed and exported as pinhole images.

Camera models and parameters follow COLMAP (pixel centres at +0.5, as everywhere in ns_extreme):
``OPENCV`` fx,fy,cx,cy,k1,k2,p1,p2 and ``OPENCV_FISHEYE`` fx,fy,cx,cy,k1,k2,k3,k4.

- OPENCV: the pinhole camera of ``cv2.getOptimalNewCameraMatrix`` with alpha 0 at the same size: every output
  pixel sees the scene (no black border), the focal length grows a little where the lens barrels.
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

CAMERA_MODELS = {"OPENCV": 8, "OPENCV_FISHEYE": 8}
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
    order = "fx,fy,cx,cy,k1,k2,p1,p2" if model == "OPENCV" else "fx,fy,cx,cy,k1,k2,k3,k4"
    if len(values) != CAMERA_MODELS[model] or not all(map(math.isfinite, values)) or min(values[:2]) <= 0:
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
    if lens.model == "OPENCV":
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


def undistort_photo(src: Path, dst: Path, lens: LensDistortion, fisheye_fov_deg: float = FISHEYE_FOV_DEG) -> np.ndarray:
    """Write the undistorted ``src`` (upright, EXIF carried over) to ``dst``; returns its pinhole K."""
    import cv2

    rgb = load_rgb(src)
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
    """A COLMAP camera as an OPENCV / OPENCV_FISHEYE lens; None for pinhole cameras, zero distortion or a model
    this module does not undistort (the caller keeps the old behaviour: pinhole part only, with a warning)."""
    p = [float(v) for v in params]
    if model == "SIMPLE_RADIAL":
        lens = LensDistortion("OPENCV", [p[0], p[0], p[1], p[2], p[3], 0.0, 0.0, 0.0])
    elif model == "RADIAL":
        lens = LensDistortion("OPENCV", [p[0], p[0], p[1], p[2], p[3], p[4], 0.0, 0.0])
    elif model in CAMERA_MODELS:
        lens = LensDistortion(model, p)
    else:
        return None
    return lens if np.any(lens.coefficients() != 0) else None


def undistort_with_known_model(
    model_dir: Path, images: Sequence[Path], folder: Path, fisheye_fov_deg: float = FISHEYE_FOV_DEG
) -> tuple[list[Path], Path | None, dict[str, dict]]:
    """Undistort the photos whose ``--poses-from`` COLMAP camera has lens distortion (matched by file name) into
    ``folder`` and write a copy of the model whose cameras are the undistorted pinhole ones to ``folder/model``.

    Returns (photo paths: undistorted copies or the originals, the new model folder or None when no photo needed
    it, per undistorted photo the original lens)."""
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
        w, h = load_rgb(p).shape[1::-1]  # upright size
        if (w, h) != (camera.width, camera.height):
            raise ValueError(
                f"--poses-from {model_dir}: {p.name} is {w}x{h} but its camera is {camera.width}x{camera.height}; "
                "undistortion needs the photos the model was made from"
            )
        dst = folder / (p.name if p.suffix.lower() in (".jpg", ".jpeg", ".png") else f"{p.stem}.png")
        K = undistort_photo(p, dst, lens, fisheye_fov_deg)
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
