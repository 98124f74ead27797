"""``--poses-from``: keep user-given poses exactly and place the other views by a similarity alignment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ns_extreme.geometry.sim3 import Sim3, sim3_from_camera_pairs


@dataclass
class KnownPoses:
    names: list[str]
    w2c_opencv: np.ndarray
    intrinsics: np.ndarray
    sizes_wh: np.ndarray
    source: str
    distorted: list[str]
    """Names of the known cameras with lens distortion (exported as undistorted pinhole)."""


def read_known_poses(path: Path) -> KnownPoses:
    """A COLMAP model folder (cameras/images .bin or .txt) or a transforms.json (file or its folder)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json" or (path / "transforms.json").is_file():
        from ns_extreme.io.transforms_json import read_transforms_json

        names, w2c, K, sizes, meta = read_transforms_json(path, in_original_world=False)
        names = [Path(n).name for n in names]
        fisheye = meta["camera_model"] == "OPENCV_FISHEYE"  # equidistant even without coefficients
        distorted = [n for n, d in zip(names, meta["distortion_params"]) if fisheye or np.any(np.asarray(d) != 0)]
        return KnownPoses(names, w2c, K, sizes, f"transforms.json {path}", distorted)
    if path.is_dir() and any((path / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
        from ns_extreme.io.colmap_model import read_colmap_model

        model = read_colmap_model(path)
        names = [Path(n).name for n in model.image_names]
        distorted = [
            n
            for n, extra, camera in zip(names, model.extra_params, model.camera_models)
            if "FISHEYE" in camera or np.any(np.asarray(extra) != 0)
        ]
        return KnownPoses(names, model.w2c_opencv, model.K, model.sizes_wh, f"COLMAP {path}", distorted)
    raise FileNotFoundError(
        f"--poses-from {path}: expected a COLMAP model folder (cameras, images .bin or .txt) or a transforms.json"
    )


def match_known(image_paths: list[Path], known: KnownPoses) -> dict[int, int]:
    """view index -> known index, by file name."""
    index = {name: k for k, name in enumerate(known.names)}
    return {i: index[p.name] for i, p in enumerate(image_paths) if p.name in index}


def known_intrinsics(known: KnownPoses, k: int, size_wh: np.ndarray) -> np.ndarray:
    """K [3, 3] of known camera ``k`` for an image of ``size_wh`` (the same photo, possibly resized)."""
    scale = np.asarray(size_wh, dtype=np.float64) / known.sizes_wh[k]
    return np.diag([scale[0], scale[1], 1.0]) @ known.intrinsics[k]


def sim3_to_known(w2c_pred: np.ndarray, w2c_known: np.ndarray) -> Sim3:
    """Similarity taking the model's world to the known world, from the views posed in both."""
    return sim3_from_camera_pairs(w2c_pred, w2c_known)
