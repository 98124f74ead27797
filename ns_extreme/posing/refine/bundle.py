"""Triangulate tracks from the current poses and bundle-adjust one component of linked views, in rounds.

With poses a few degrees off, COLMAP's default thresholds (4 px) reject most tracks, so the first rounds
triangulate loosely and later ones tighten: each round re-triangulates every track from the current poses
(``pycolmap.triangulate_points``, which also merges, completes and filters tracks) and then adjusts poses, points
and the focal lengths that may change. Everything runs at the feature images' resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap

from ns_extreme.posing.refine.matching import FeatureSet, open_database, pinhole_camera


def round_thresholds_px(long_side: int) -> tuple[float, ...]:
    """Reprojection thresholds of the rounds: loose ones relative to the image size, then sub-pixel-SfM ones."""
    return (0.08 * long_side, 0.02 * long_side, 4.0, 2.0)


@dataclass
class Component:
    """Views linked by verified matches, and what the adjustment may change."""

    views: list[int]
    constant_pose: np.ndarray
    """[n] bool: poses kept exactly (``--known-poses fixed``)."""
    constant_focal: np.ndarray
    """[n] bool: focal lengths kept exactly."""
    camera_group: np.ndarray
    """[n] views with the same group id share one camera (its intrinsics start at the group's median)."""


@dataclass
class Observations:
    """Every track observation of a reconstruction, flattened."""

    view: np.ndarray  # [O] view index
    xy: np.ndarray  # [O, 2] feature-image pixels
    point: np.ndarray  # [O] index into xyz
    xyz: np.ndarray  # [M, 3]


def observations(rec: pycolmap.Reconstruction, view_of_image: dict[int, int]) -> Observations:
    view, xy, point, xyz = [], [], [], []
    for k, (_, p) in enumerate(sorted(rec.points3D.items())):
        xyz.append(p.xyz)
        for element in p.track.elements:
            view.append(view_of_image[element.image_id])
            xy.append(rec.images[element.image_id].points2D[element.point2D_idx].xy)
            point.append(k)
    return Observations(
        view=np.asarray(view, dtype=np.int64),
        xy=np.asarray(xy, dtype=np.float64).reshape(-1, 2),
        point=np.asarray(point, dtype=np.int64),
        xyz=np.asarray(xyz, dtype=np.float64).reshape(-1, 3),
    )


def _build(features: FeatureSet, component: Component, w2c: np.ndarray, K_f: np.ndarray) -> pycolmap.Reconstruction:
    with open_database(features.database) as db:
        db_camera = {v: int(db.read_image(features.image_ids[v]).camera_id) for v in component.views}
    views = np.asarray(component.views)
    rec = pycolmap.Reconstruction()
    camera_of: dict[int, int] = {}
    for group in np.unique(component.camera_group):
        members = views[component.camera_group == group]
        camera_id = db_camera[int(members[0])]
        K = np.median(K_f[members], axis=0)
        rec.add_camera_with_trivial_rig(pinhole_camera(K, features.sizes_wh[members[0]], camera_id))
        camera_of.update({int(v): camera_id for v in members})
    for v in component.views:
        image = pycolmap.Image(name=features.names[v], camera_id=camera_of[v], image_id=features.image_ids[v])
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[v, :3, :3]), w2c[v, :3, 3]))
    return rec


def _triangulate(rec: pycolmap.Reconstruction, features: FeatureSet, threshold: float, work_dir: Path):
    options = pycolmap.IncrementalPipelineOptions()
    tri = options.triangulation
    tri.complete_max_reproj_error = tri.merge_max_reproj_error = threshold
    # Rays of a track may miss each other by degrees while poses are still off: allow that in early rounds.
    tri.create_max_angle_error = tri.continue_max_angle_error = max(2.0, threshold / 8.0)
    tri.ignore_two_view_tracks = False
    tri.min_angle = 1.0
    options.mapper.filter_max_reproj_error = threshold
    options.mapper.filter_min_tri_angle = 1.0
    out = work_dir / "triangulated"
    out.mkdir(exist_ok=True)
    return pycolmap.triangulate_points(
        rec, features.database, features.image_dir, out, clear_points=True, options=options, refine_intrinsics=False
    )


def _adjust(rec: pycolmap.Reconstruction, features: FeatureSet, component: Component, loss: str, scale: float) -> None:
    options = pycolmap.BundleAdjustmentOptions()
    options.refine_focal_length = True
    options.refine_principal_point = False
    options.refine_extra_params = False
    options.print_summary = False
    options.ceres.loss_function_type = getattr(pycolmap.LossFunctionType, loss.upper())
    options.ceres.loss_function_scale = scale
    options.ceres.solver_options.function_tolerance = 1e-6
    options.ceres.solver_options.max_num_iterations = 50
    config = pycolmap.BundleAdjustmentConfig()
    for k, v in enumerate(component.views):
        image = rec.images[features.image_ids[v]]
        config.add_image(image.image_id)
        if component.constant_focal[k]:
            config.set_constant_cam_intrinsics(image.camera_id)
        if component.constant_pose[k]:
            config.set_constant_rig_from_world_pose(image.frame_id)
    if not component.constant_pose.any():
        config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    # One constant pose leaves the scale free: the stage fixes it afterwards (a scale about that camera).
    pycolmap.create_default_bundle_adjuster(options, config, rec).solve()


def adjust_component(
    features: FeatureSet, component: Component, w2c: np.ndarray, K_f: np.ndarray, loss: str, work_dir: Path
) -> tuple[np.ndarray, np.ndarray, pycolmap.Reconstruction]:
    """Refined w2c [n, 3, 4] and feature-resolution K [n, 3, 3] of the component's views (in its own gauge), and
    the final reconstruction with its tracks."""
    rec = _build(features, component, w2c, K_f)
    long_side = int(features.sizes_wh[component.views].max())
    thresholds = round_thresholds_px(long_side)
    poses_only = Component(
        component.views, component.constant_pose, np.ones_like(component.constant_focal), component.camera_group
    )
    for k, threshold in enumerate(thresholds):
        rec = _triangulate(rec, features, threshold, work_dir)
        if rec.num_points3D() == 0:
            raise RuntimeError("no track could be triangulated")
        # Focal lengths trade off against depth while the structure is still wrong: free them in the last round.
        _adjust(
            rec, features, component if k == len(thresholds) - 1 else poses_only, loss, scale=max(1.0, threshold / 4.0)
        )
    images = [rec.images[features.image_ids[v]] for v in component.views]
    w2c_out = np.stack([image.cam_from_world().matrix() for image in images])
    K_out = np.stack([image.camera.calibration_matrix() for image in images])
    if not (np.isfinite(w2c_out).all() and np.isfinite(K_out).all()):
        raise RuntimeError("bundle adjustment produced non-finite cameras")
    return w2c_out, K_out, rec
