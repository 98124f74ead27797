"""pose_images: the posing pipeline from image files to a Reconstruction.

Stages, in order: load → inference → intrinsics → known poses → refinement → points → comparison. Each stage is a
function below that takes what earlier stages produced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from ns_extreme.geometry.sim3 import sim3_from_camera_pairs, transform_w2c_opencv
from ns_extreme.io.images import PreprocessedBatch, SkippedImage, preprocess_images, screen_images
from ns_extreme.io.masks import kept_pixels_preprocessed, photo_masks
from ns_extreme.io.sfm_points import POINT_SOURCE_SFM
from ns_extreme.posing.backbone import PosingBackbone
from ns_extreme.posing.chunking import predict_in_chunks
from ns_extreme.posing.diagnostics import pair_diagnostics
from ns_extreme.posing.intrinsics import choose_intrinsics
from ns_extreme.posing.known_poses import known_intrinsics, match_known, read_known_poses, sim3_to_known
from ns_extreme.posing.options import PosingOptions
from ns_extreme.posing.points import PointCloud, limit_points, sfm_cloud, uncovered, view_points, voxel_downsample
from ns_extreme.posing.priors import FramePriors, network_priors
from ns_extreme.posing.reconstruction import Reconstruction
from ns_extreme.posing.world_frame import frame_world


def _run_backbone(
    backbone: PosingBackbone,
    batch: PreprocessedBatch,
    options: PosingOptions,
    progress: bool,
    distribute: bool,
    priors: Optional[FramePriors] = None,
):
    bar = tqdm(total=1, desc=f"inference ({backbone.name})", unit="pass", disable=not progress)

    def on_chunk(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    valid = np.stack([r.valid_mask_preprocessed() for r in batch.records])
    try:  # close the bar on errors too, so an error message starts on a line of its own
        pred, residuals = predict_in_chunks(
            backbone.predict,
            batch.images,
            options.max_frames_per_pass,
            options.chunk_overlap,
            on_chunk,
            options.seed,
            valid,
            distribute,
            priors,
        )
    finally:
        bar.close()
    if pred is None:  # a rank other than 0 under torchrun: its chunks went to rank 0
        return None, []
    if pred.intrinsics is None:
        # Backbones without an intrinsics head recover them inside predict() (Pi3Backbone: focal.recover_focal),
        # because chunked inference needs them per pass to join chunks.
        raise NotImplementedError(
            f"{backbone.name} returned no intrinsics; a backbone without an intrinsics "
            "head must fill them in predict(), "
            "e.g. with ns_extreme.posing.focal.recover_focal as Pi3Backbone does"
        )
    return pred, residuals


def _skipped_summary(skipped: list[SkippedImage], limit: int = 5) -> str:
    shown = "; ".join(s.describe() for s in skipped[:limit])
    return shown + (f"; ... ({len(skipped) - limit} more)" if len(skipped) > limit else "")


def _need_two(usable: int, total: int, skipped: list[SkippedImage]) -> None:
    if usable < 2:
        raise ValueError(
            f"only {usable} of {total} images can be used, posing needs at least 2 (skipped: "
            f"{_skipped_summary(skipped)}); "
            "replace or remove the unreadable files, or add more photos"
        )


@dataclass
class _Cameras:
    """Cameras as they pass through the stages (original resolution, OpenCV world-to-camera)."""

    w2c: np.ndarray
    K: np.ndarray
    sources: list[str]
    depth: np.ndarray
    known: dict[int, int] = field(default_factory=dict)
    """view -> row of the --poses-from model."""
    depth_scale: float = 1.0
    """Factor from the model's depth units to the world's (the Sim(3) onto --poses-from, or --scale-from)."""
    world_source: str = "model"

    def apply(self, sim) -> None:
        """Move the cameras into the world of ``sim`` (a Sim(3)); depth follows its scale."""
        self.w2c = transform_w2c_opencv(self.w2c, sim)
        self.depth *= np.float32(sim.scale)
        self.depth_scale *= float(sim.scale)


def _known_poses_stage(
    cams: _Cameras, image_paths: list[Path], sizes_wh: np.ndarray, options: PosingOptions, notes: list[str]
) -> None:
    """Put every view into the --poses-from world and give the known views their given cameras."""
    known = read_known_poses(options.poses_from)
    matches = match_known(image_paths, known)
    if not matches:
        raise ValueError(
            f"--poses-from {options.poses_from}: none of its {len(known.names)} image names matches an input image"
        )
    views, rows = list(matches), list(matches.values())
    if len(matches) == 1:
        notes.append("only one view has a known pose: the other views keep the model's scale, not the known world's")
    distorted = [known.names[k] for k in rows if known.names[k] in known.distorted]
    if distorted:
        notes.append(
            f"{len(distorted)} known cameras have lens distortion that the export drops (pinhole intrinsics only), "
            f"e.g. {distorted[0]}; undistort the images first for exact geometry (ns-process-data extreme-poses "
            "does so for OPENCV, FULL_OPENCV, RADIAL and fisheye lenses)"
        )
    cams.apply(sim3_to_known(cams.w2c[views], known.w2c_opencv[rows]))
    for i, k in matches.items():
        cams.w2c[i] = known.w2c_opencv[k]
        if options.intrinsics == "auto":
            cams.K[i] = known_intrinsics(known, k, sizes_wh[i])
            cams.sources[i] = "known-pose"
    cams.known = matches
    cams.world_source = "transforms" if known.source.startswith("transforms") else "colmap"


def _refinement_stage(
    cams: _Cameras,
    image_paths: list[Path],
    sizes_wh: np.ndarray,
    records,
    valid: np.ndarray,
    options: PosingOptions,
    progress: bool,
    masks=None,
):
    """Refine with image evidence where views overlap (never fatal: see posing.refine.stage)."""
    from ns_extreme.posing.refine import refine_poses
    from ns_extreme.posing.refine.pairs import covisibility

    ropts = options.refinement
    n = len(image_paths)
    known = np.zeros(n, dtype=bool)
    known[list(cams.known)] = True
    constant_pose = known if options.known_poses == "fixed" else np.zeros(n, dtype=bool)
    if ropts.refine_focal == "auto":
        constant_focal = np.array([s not in ("predicted", "shared") for s in cams.sources])
    else:
        constant_focal = np.full(n, ropts.refine_focal == "never")
    # Given pose priors place each component; model poses only where a component holds fewer than two priors.
    gauge_weights = np.where(known, 1.0, 1e-3) if options.known_poses == "prior" and known.sum() >= 2 else None
    scores = None
    if n > ropts.match_partners + 1:
        K_pre = np.stack([r.intrinsics_to_preprocessed(k) for r, k in zip(records, cams.K)])
        scores = covisibility(cams.depth, K_pre, cams.w2c, valid, seed=options.seed)
    return refine_poses(
        image_paths, cams.w2c, cams.K, sizes_wh, ropts,
        constant_pose=constant_pose, constant_focal=constant_focal, gauge_weights=gauge_weights,
        pair_scores=scores, progress=progress, masks=masks,
    )  # fmt: skip


def _points_stage(
    cams: _Cameras,
    pred,
    batch: PreprocessedBatch,
    valid: np.ndarray,
    refinement,
    options: PosingOptions,
    progress: bool,
) -> PointCloud:
    """The initial point cloud: SfM points and/or the model's confidence-filtered depth points (--points)."""
    records = batch.records
    sfm = refinement.sfm_points if refinement is not None and len(refinement.sfm_points) else None
    mode = options.refinement.points if sfm is not None else "3dfm"
    model_cloud = PointCloud.empty()
    if mode != "sfm":
        K_pre = np.stack([r.intrinsics_to_preprocessed(k) for r, k in zip(records, cams.K)])
        rgb = (batch.images.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
        with tqdm(range(len(records)), desc="points", unit="view", disable=not progress) as views:
            clouds = [
                view_points(
                    cams.depth[i], pred.confidence[i], K_pre[i], cams.w2c[i], rgb[i], valid[i],
                    options.conf_percentile, options.edge_threshold, view_index=i,
                )
                for i in views
            ]  # fmt: skip
        model_cloud = PointCloud.concatenate(clouds)
        if mode == "both":
            model_cloud = model_cloud.subset(uncovered(model_cloud, sfm, records))
        if options.voxel_size > 0 and len(model_cloud.xyz):
            typical = float(np.median(cams.depth[cams.depth > 0]))
            model_cloud = voxel_downsample(model_cloud, options.voxel_size * typical)
    if mode == "3dfm":
        return limit_points(model_cloud, options.max_points, options.seed)
    sfm_points = sfm_cloud(sfm, records, pred.confidence)
    budget = max(options.max_points - len(sfm_points.xyz), 0)
    return PointCloud.concatenate([sfm_points, limit_points(model_cloud, budget, options.seed)])


def pose_images(
    image_paths: list[Path],
    backbone: PosingBackbone,
    options: Optional[PosingOptions] = None,
    compare_backbone: Optional[PosingBackbone] = None,
    progress: bool = True,
    skip_bad_images: bool = True,
    distribute: bool = False,
) -> Optional[Reconstruction]:
    """Pose ``image_paths`` (at least 2) with ``backbone``; ``compare_backbone`` adds a second pose set.

    ``skip_bad_images`` (the documented fallback): files that cannot be read (empty, corrupt, truncated,
    unreadable, too large) and byte-identical copies of an earlier file are left out with a warning in
    ``recon.warnings`` and listed in ``recon.provenance["skipped_images"]``; a ValueError only if fewer than 2
    usable images remain. ``recon.image_paths`` holds the posed images. ``False``: the first bad file raises
    ``ImageReadError`` and duplicates are posed as given.

    ``distribute`` (a process group is up, torchrun): the inference chunks (``--max-frames-per-pass``) are spread
    over the ranks; rank 0 joins them and runs every later stage, the other ranks return None.
    """
    options = options or PosingOptions()
    options.check_world_options()
    image_paths = [Path(p) for p in image_paths]
    if len(image_paths) < 2:
        raise ValueError(f"posing needs at least 2 images, got {len(image_paths)}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    total = len(image_paths)
    skipped: list[SkippedImage] = []
    if skip_bad_images:
        screen = screen_images(image_paths)
        skipped += screen.skipped
        image_paths = list(screen.usable)
        _need_two(len(image_paths), total, skipped)
    batch = preprocess_images(
        image_paths,
        mode=options.preprocess,
        target_size=backbone.target_size,
        patch_size=backbone.patch_size,
        on_error="skip" if skip_bad_images else "raise",
    )
    if batch.skipped:
        skipped += batch.skipped
        image_paths = [Path(p) for p in batch.paths if p is not None]
        _need_two(len(image_paths), total, skipped)
    records = batch.records
    sizes_wh = np.array([(r.original_hw[1], r.original_hw[0]) for r in records], dtype=np.int64)
    timings["load_s"] = time.perf_counter() - t

    priors = None
    accepted = getattr(backbone, "priors", ())  # adapters written before network priors existed take none
    if accepted:
        priors = network_priors(
            accepted, records, image_paths, sizes_wh, options.intrinsics, options.poses_from, options.depth_from
        )
    t = time.perf_counter()
    pred, residuals = _run_backbone(backbone, batch, options, progress, distribute, priors)
    timings["inference_s"] = time.perf_counter() - t
    other = None
    if compare_backbone is not None:  # here, so that all ranks share both inference passes and then stop
        t = time.perf_counter()
        other, _ = _run_backbone(compare_backbone, batch, options, progress, distribute, priors)
        timings["compare_inference_s"] = time.perf_counter() - t
    if pred is None:
        return None

    K_predicted = np.stack([r.intrinsics_to_original(k) for r, k in zip(records, pred.intrinsics)])
    K, sources = choose_intrinsics(options.intrinsics, K_predicted, sizes_wh, image_paths)
    cams = _Cameras(pred.w2c_opencv.copy(), K, sources, pred.depth.copy())
    notes: list[str] = []
    if skipped:
        notes.append(f"skipped {len(skipped)} of {total} image(s) that cannot be posed: {_skipped_summary(skipped)}")
    if options.poses_from is not None:
        _known_poses_stage(cams, image_paths, sizes_wh, options, notes)
    masks = photo_masks(image_paths, sizes_wh, options.masks)
    valid = kept_pixels_preprocessed(records, masks)
    cams.depth[~valid] = 0.0

    refinement = None
    input_w2c = input_K = None
    if options.refinement.refine:
        t = time.perf_counter()
        input_w2c, input_K = cams.w2c.copy(), cams.K.copy()
        refinement = _refinement_stage(cams, image_paths, sizes_wh, records, valid, options, progress, masks)
        cams.w2c, cams.K = refinement.w2c_opencv, refinement.intrinsics
        if refinement.warning:
            notes.append(refinement.warning)
        timings["refine_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cloud = _points_stage(cams, pred, batch, valid, refinement, options, progress)
    view_conf = np.array(
        [float(pred.confidence[i][valid[i]].mean()) if valid[i].any() else 0.0 for i in range(len(image_paths))]
    )
    timings["points_s"] = time.perf_counter() - t

    sfm = refinement.sfm_points if refinement is not None else None
    world_frame: dict = {"source": "--poses-from: the given world, not rotated or scaled"}
    if cams.world_source == "model":
        world, world_frame = frame_world(
            cams.w2c, cloud.xyz, image_paths, options.orient, options.scale_from, options.seed
        )
        if world is not None:
            cams.apply(world)
            cloud.xyz = world.apply(cloud.xyz)
            if input_w2c is not None:
                input_w2c = transform_w2c_opencv(input_w2c, world)
            if sfm is not None:
                sfm = sfm.transformed(world.apply(sfm.xyz))

    pretrained_w2c = None
    if other is not None:
        # Express the pretrained poses in the same world, so that both sets can be drawn together.
        pretrained_w2c = transform_w2c_opencv(other.w2c_opencv, sim3_from_camera_pairs(other.w2c_opencv, cams.w2c))

    if not (cloud.source == POINT_SOURCE_SFM).any():
        sfm = None
    return Reconstruction(
        image_paths=image_paths,
        sizes_wh=sizes_wh,
        w2c_opencv=cams.w2c,
        intrinsics=cams.K,
        records=records,
        depth=cams.depth,
        confidence=pred.confidence,
        points_xyz=cloud.xyz,
        points_rgb=cloud.rgb,
        points_conf=cloud.conf,
        points_source=cloud.source,
        view_confidence=view_conf,
        intrinsics_source=cams.sources,
        pairs=pair_diagnostics(cams.w2c, cams.K, sizes_wh, pretrained_w2c),
        pretrained_w2c_opencv=pretrained_w2c,
        chunk_residuals=residuals,
        provenance={
            "backbone": backbone.name,
            "network_priors": {n: priors.views_with(n) for n in priors.names()} if priors is not None else {},
            "options": {k: str(v) for k, v in vars(options).items()},
            "skipped_images": [{"file": s.path.name, "path": str(s.path), "reason": s.reason} for s in skipped],
            "world_frame": world_frame,
        },
        timings=timings,
        world_source=cams.world_source,
        warnings=notes,
        input_w2c_opencv=input_w2c,
        input_intrinsics=input_K,
        refinement=refinement,
        sfm_points=sfm,
        masks=masks,
        normals=pred.normals,
        gaussians=None if pred.gaussians is None else pred.gaussians.scaled(cams.depth_scale),
    )
