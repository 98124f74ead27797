"""SIFT features, pair matching and two-view verification with pycolmap, in a database of a work folder.

Features are extracted from upright grey copies of the originals, downscaled to the feature size, written to the
work folder (never the user's image folder). Keypoints map back to original pixels by the per-axis size ratio
(continuous pixel coordinates, [0, W] x [0, H], as COLMAP and nerfstudio use).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pycolmap
from PIL import Image  # before pycolmap: its bundled zlib must not replace Pillow's (PNG encoding aborts)
from tqdm.auto import tqdm

from ns_extreme.io.images import load_rgb

MATCH_BATCH = 16
"""Pairs per matching call (one progress-bar step)."""
MAX_FEATURES = 4096
"""SIFT features per image: brute-force matching costs grow with the square of it (COLMAP's default is 8192)."""
UPSAMPLE_BELOW = 1000
"""Feature images with a shorter long side are upsampled once before the first octave (COLMAP's default,
``first_octave = -1``), which finds the small features such images need; larger ones start at full size."""


_CALIBRATED = (pycolmap.TwoViewGeometryConfiguration.CALIBRATED, pycolmap.TwoViewGeometryConfiguration.PLANAR)


@dataclass
class FeatureSet:
    """The work folder's database and how its images relate to the input views."""

    database: Path
    image_dir: Path
    image_ids: list[int]
    """Database image id of each view."""
    names: list[str]
    """Database image name of each view (a file in ``image_dir``)."""
    sizes_wh: np.ndarray
    """[N, 2] size of the feature images."""
    to_original: np.ndarray
    """[N, 2] per-axis factor from feature-image to original pixels."""

    def intrinsics_at_features(self, K: np.ndarray) -> np.ndarray:
        """Original-resolution intrinsics [N, 3, 3] expressed at the feature images' resolution."""
        scale = np.zeros((len(K), 3, 3))
        scale[:, 0, 0], scale[:, 1, 1], scale[:, 2, 2] = 1.0 / self.to_original[:, 0], 1.0 / self.to_original[:, 1], 1.0
        return scale @ K

    def intrinsics_at_original(self, K_features: np.ndarray, views: Sequence[int]) -> np.ndarray:
        """Feature-resolution intrinsics of ``views`` back at the original resolution."""
        to_original = self.to_original[list(views)]
        scale = np.zeros((len(K_features), 3, 3))
        scale[:, 0, 0], scale[:, 1, 1], scale[:, 2, 2] = to_original[:, 0], to_original[:, 1], 1.0
        return scale @ K_features


@dataclass
class VerifiedPair:
    i: int
    j: int
    inliers: int
    """Matches that survived two-view geometric verification."""
    rotation_disagreement_deg: Optional[float]
    """Angle between the verified relative rotation and the input poses' (None without a calibrated geometry)."""
    accepted: bool
    """Links the two views (enough inliers, rotation consistent with the input poses)."""


@contextlib.contextmanager
def quiet_colmap() -> Iterator[None]:
    """Keep COLMAP's log lines (glog, INFO and WARNING) off the terminal."""
    previous = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = int(pycolmap.logging.ERROR)
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = previous


def feature_size_of(size_wh: Sequence[int], feature_size: int) -> tuple[int, int]:
    """(W, H) of the feature image: the long side at most ``feature_size``, never upscaled."""
    w, h = int(size_wh[0]), int(size_wh[1])
    scale = min(1.0, feature_size / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def extract_features(
    image_paths: Sequence[Path],
    sizes_wh: np.ndarray,
    K: np.ndarray,
    work_dir: Path,
    feature_size: int,
    progress: bool,
    masks: Optional[Sequence[np.ndarray]] = None,
) -> FeatureSet:
    """SIFT keypoints of every view into ``work_dir/database.db``; each view gets a PINHOLE camera with ``K``
    (original resolution, scaled to the feature image) as a prior, so verification estimates essential matrices.
    ``masks`` (bool [H, W] per view, original size): no keypoints where False (COLMAP's per-image mask files)."""
    image_dir = work_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir = work_dir / "masks"
    database = work_dir / "database.db"
    names, feature_sizes = [], []
    for i, path in enumerate(tqdm(image_paths, desc="refine: features", unit="view", disable=not progress)):
        w, h = feature_size_of(sizes_wh[i], feature_size)
        options = pycolmap.FeatureExtractionOptions()
        options.sift.max_num_features = MAX_FEATURES
        options.sift.first_octave = -1 if max(w, h) < UPSAMPLE_BELOW else 0
        grey = Image.fromarray(load_rgb(path)).convert("L")
        if grey.size != (w, h):
            grey = grey.resize((w, h), Image.Resampling.LANCZOS)
        name = f"{i:05d}.png"
        grey.save(image_dir / name, compress_level=1)
        reader = pycolmap.ImageReaderOptions()
        if masks is not None and masks[i] is not None:  # COLMAP reads MASK_PATH/<image name>.png: 0 = no features
            mask_dir.mkdir(exist_ok=True)
            reader.mask_path = str(mask_dir)
            mask = Image.fromarray(np.where(masks[i], 255, 0).astype(np.uint8))
            mask.resize((w, h), Image.Resampling.NEAREST).save(mask_dir / f"{name}.png", compress_level=1)
        pycolmap.extract_features(
            database,
            image_dir,
            image_names=[name],
            camera_mode=pycolmap.CameraMode.PER_IMAGE,
            reader_options=reader,
            extraction_options=options,
        )
        names.append(name)
        feature_sizes.append((w, h))
    sizes_f = np.asarray(feature_sizes, dtype=np.int64)
    features = FeatureSet(
        database=database,
        image_dir=image_dir,
        image_ids=[],
        names=names,
        sizes_wh=sizes_f,
        to_original=np.asarray(sizes_wh, dtype=np.float64) / sizes_f,
    )
    K_f = features.intrinsics_at_features(K)
    with open_database(database) as db:
        by_name = {image.name: image for image in db.read_all_images()}
        for i, name in enumerate(names):
            image = by_name[name]
            features.image_ids.append(int(image.image_id))
            camera = pinhole_camera(K_f[i], sizes_f[i], int(image.camera_id))
            camera.has_prior_focal_length = True
            db.update_camera(camera)
    return features


def pinhole_camera(K: np.ndarray, size_wh: Sequence[int], camera_id: int) -> pycolmap.Camera:
    params = [float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])]
    return pycolmap.Camera(
        model="PINHOLE", width=int(size_wh[0]), height=int(size_wh[1]), params=params, camera_id=camera_id
    )


def share_cameras(features: FeatureSet, groups: np.ndarray) -> None:
    """Let the views of each group use the camera (and rig) of its first view in the database, as COLMAP's own
    automatic camera mode would have created them; the frames follow, so that the database stays consistent."""
    with open_database(features.database) as db:
        images = {image.image_id: image for image in db.read_all_images()}
        rig_of_camera = {rig.ref_sensor_id.id: rig.rig_id for rig in db.read_all_rigs()}
        first: dict[int, int] = {}
        for v, group in enumerate(groups):
            image = images[features.image_ids[v]]
            camera_id = first.setdefault(int(group), int(image.camera_id))
            if camera_id == image.camera_id:
                continue
            frame = db.read_frame(image.frame_id)
            frame.rig_id = rig_of_camera[camera_id]
            frame.clear_data_ids()
            frame.add_data_id(pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, camera_id), image.image_id))
            db.update_frame(frame)
            image.camera_id = camera_id
            db.update_image(image)


@contextlib.contextmanager
def open_database(path: Path) -> Iterator[pycolmap.Database]:
    db = pycolmap.Database.open(str(path))
    try:
        yield db
    finally:
        db.close()


def match_pairs(features: FeatureSet, pairs: Sequence[tuple[int, int]], progress: bool) -> None:
    """Match and geometrically verify ``pairs`` (view indices), in batches for the progress bar."""
    matching = pycolmap.FeatureMatchingOptions()
    verification = pycolmap.TwoViewGeometryOptions()
    verification.compute_relative_pose = True
    verification.ransac.random_seed = 0
    pairs = list(pairs)
    list_path = features.database.parent / "pairs.txt"
    with tqdm(total=len(pairs), desc="refine: matching", unit="pair", disable=not progress) as bar:
        for start in range(0, len(pairs), MATCH_BATCH):
            batch = pairs[start : start + MATCH_BATCH]
            list_path.write_text("".join(f"{features.names[i]} {features.names[j]}\n" for i, j in batch))
            pairing = pycolmap.ImportedPairingOptions()
            pairing.match_list_path = list_path
            pycolmap.match_image_pairs(features.database, matching, pairing, verification)
            bar.update(len(batch))


def _relative_rotation(db: pycolmap.Database, geometry: Any, a: int, b: int, cameras: tuple) -> tuple[Any, int]:
    """(cam2_from_cam1 rotation matrix or None, supporting inliers) of a verified pair with known intrinsics: the
    verifier's own calibrated estimate, else an essential matrix fitted to its inlier matches."""
    inliers = len(geometry.inlier_matches)
    if geometry.config in _CALIBRATED and geometry.cam2_from_cam1 is not None:
        return geometry.cam2_from_cam1.rotation.matrix(), inliers
    matches = np.asarray(geometry.inlier_matches)
    points_a = db.read_keypoints(a)[matches[:, 0], :2].astype(np.float64)
    points_b = db.read_keypoints(b)[matches[:, 1], :2].astype(np.float64)
    estimate = pycolmap.estimate_essential_matrix(points_a, points_b, cameras[0], cameras[1])
    if estimate is None:
        return None, 0
    return estimate["cam2_from_cam1"].rotation.matrix(), int(estimate["num_inliers"])


def screen_verified_pairs(
    features: FeatureSet,
    pairs: Sequence[tuple[int, int]],
    w2c: np.ndarray,
    K: np.ndarray,
    min_inliers: int,
    max_disagreement_deg: float,
) -> list[VerifiedPair]:
    """Verified pairs whose relative rotation agrees with the input poses'; the matches of the others are deleted
    from the database, so that no track is built from them.

    A pair is accepted with at least ``min_inliers`` inliers of a calibrated two-view geometry whose rotation is
    within ``3 x`` the median disagreement of all verified pairs (the input poses' own noise level), clamped to
    [10°, ``max_disagreement_deg``]: repeated structures and symmetric facades give pairs far outside it.
    """
    from ns_extreme.geometry.rotations import geodesic_angle_deg

    K_f = features.intrinsics_at_features(K)
    found = []
    with open_database(features.database) as db:
        for i, j in pairs:
            a, b = features.image_ids[i], features.image_ids[j]
            if not db.exists_two_view_geometry(a, b):
                continue
            geometry = db.read_two_view_geometry(a, b)
            if len(geometry.inlier_matches) == 0:
                continue
            cameras = (pinhole_camera(K_f[i], features.sizes_wh[i], 1), pinhole_camera(K_f[j], features.sizes_wh[j], 2))
            R_verified, support = _relative_rotation(db, geometry, a, b, cameras)
            disagreement = None
            if R_verified is not None:
                disagreement = float(geodesic_angle_deg(R_verified, w2c[j, :3, :3] @ w2c[i, :3, :3].T))
            found.append((i, j, a, b, len(geometry.inlier_matches), support, disagreement))
        measured = [d for *_, support, d in found if d is not None and support >= min_inliers]
        limit = max_disagreement_deg
        if measured:
            limit = float(np.clip(3.0 * np.median(measured), 10.0, max_disagreement_deg))
        out = []
        for i, j, a, b, inliers, support, disagreement in found:
            accepted = support >= min_inliers and disagreement is not None and disagreement <= limit
            if not accepted:
                db.delete_two_view_geometry(a, b)
            out.append(VerifiedPair(i, j, inliers, disagreement, accepted))
    return out
