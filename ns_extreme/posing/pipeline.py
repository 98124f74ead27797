"""pose_images: the posing pipeline from image files to a Reconstruction."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from ns_extreme.geometry.sim3 import sim3_from_camera_pairs, transform_w2c_opencv
from ns_extreme.io.images import PreprocessedBatch, SkippedImage, preprocess_images, screen_images
from ns_extreme.posing.backbone import PosingBackbone
from ns_extreme.posing.chunking import predict_in_chunks
from ns_extreme.posing.diagnostics import pair_diagnostics
from ns_extreme.posing.intrinsics import choose_intrinsics
from ns_extreme.posing.known_poses import match_known, read_known_poses, sim3_to_known
from ns_extreme.posing.options import PosingOptions
from ns_extreme.posing.points import PointCloud, limit_points, view_points, voxel_downsample
from ns_extreme.posing.reconstruction import Reconstruction


def _run_backbone(backbone: PosingBackbone, batch: PreprocessedBatch, options: PosingOptions, progress: bool):
    bar = tqdm(total=1, desc=f"inference ({backbone.name})", unit="pass", disable=not progress)

    def on_chunk(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    valid = np.stack([r.valid_mask_preprocessed() for r in batch.records])
    try:  # close the bar on errors too, so an error message starts on a line of its own
        pred, residuals = predict_in_chunks(
            backbone.predict, batch.images, options.max_frames_per_pass, options.chunk_overlap, on_chunk, options.seed, valid
        )
    finally:
        bar.close()
    if pred.intrinsics is None:
        # Backbones without an intrinsics head recover them inside predict() (Pi3Backbone: focal.recover_focal),
        # because chunked inference needs them per pass to join chunks.
        raise NotImplementedError(
            f"{backbone.name} returned no intrinsics; a backbone without an intrinsics head must fill them in predict(), "
            "e.g. with ns_extreme.posing.focal.recover_focal as Pi3Backbone does"
        )
    return pred, residuals


def _skipped_summary(skipped: list[SkippedImage], limit: int = 5) -> str:
    shown = "; ".join(s.describe() for s in skipped[:limit])
    return shown + (f"; ... ({len(skipped) - limit} more)" if len(skipped) > limit else "")


def _need_two(usable: int, total: int, skipped: list[SkippedImage]) -> None:
    if usable < 2:
        raise ValueError(
            f"only {usable} of {total} images can be used, posing needs at least 2 (skipped: {_skipped_summary(skipped)}); "
            "replace or remove the unreadable files, or add more photos"
        )


def pose_images(
    image_paths: list[Path],
    backbone: PosingBackbone,
    options: Optional[PosingOptions] = None,
    compare_backbone: Optional[PosingBackbone] = None,
    progress: bool = True,
    skip_bad_images: bool = True,
) -> Reconstruction:
    """Pose ``image_paths`` (at least 2) with ``backbone``; ``compare_backbone`` adds a second pose set.

    ``skip_bad_images`` (the documented fallback): files that cannot be read (empty, corrupt, truncated,
    unreadable, too large) and byte-identical copies of an earlier file are left out with a warning in
    ``recon.warnings`` and listed in ``recon.provenance["skipped_images"]``; a ValueError only if fewer than 2
    usable images remain. ``recon.image_paths`` holds the posed images. ``False``: the first bad file raises
    ``ImageReadError`` and duplicates are posed as given.
    """
    options = options or PosingOptions()
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

    t = time.perf_counter()
    pred, residuals = _run_backbone(backbone, batch, options, progress)
    timings["inference_s"] = time.perf_counter() - t

    t = time.perf_counter()
    K_predicted = np.stack([r.intrinsics_to_original(k) for r, k in zip(records, pred.intrinsics)])
    K, sources = choose_intrinsics(options.intrinsics, K_predicted, sizes_wh, image_paths)
    w2c = pred.w2c_opencv.copy()
    depth = pred.depth.copy()
    world_source = "model"
    notes: list[str] = []
    if skipped:
        notes.append(f"skipped {len(skipped)} of {total} image(s) that cannot be posed: {_skipped_summary(skipped)}")
    if options.poses_from is not None:
        known = read_known_poses(options.poses_from)
        matches = match_known(image_paths, known)
        if not matches:
            raise ValueError(f"--poses-from {options.poses_from}: none of its {len(known.names)} image names matches an input image")
        views, rows = list(matches), list(matches.values())
        if len(matches) == 1:
            notes.append("only one view has a known pose: the other views keep the model's scale, not the known world's")
        distorted = [known.names[k] for k in rows if known.names[k] in known.distorted]
        if distorted:
            notes.append(
                f"{len(distorted)} known cameras have lens distortion that the export drops (pinhole intrinsics only), "
                f"e.g. {distorted[0]}; undistort the images first for exact geometry"
            )
        sim = sim3_to_known(w2c[views], known.w2c_opencv[rows])
        w2c = transform_w2c_opencv(w2c, sim)
        depth *= np.float32(sim.scale)
        for i, k in matches.items():
            w2c[i] = known.w2c_opencv[k]
            if options.intrinsics == "auto":
                scale = sizes_wh[i] / known.sizes_wh[k]
                K[i] = np.diag([scale[0], scale[1], 1.0]) @ known.intrinsics[k]
                sources[i] = "known-pose"
        world_source = "transforms" if known.source.startswith("transforms") else "colmap"

    valid = np.stack([r.valid_mask_preprocessed() for r in records])
    depth[~valid] = 0.0
    K_pre = np.stack([r.intrinsics_to_preprocessed(k) for r, k in zip(records, K)])
    rgb = (batch.images.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    with tqdm(range(len(image_paths)), desc="points", unit="view", disable=not progress) as views:
        clouds = [
            view_points(depth[i], pred.confidence[i], K_pre[i], w2c[i], rgb[i], valid[i], options.conf_percentile, options.edge_threshold)
            for i in views
        ]
    cloud = PointCloud.concatenate(clouds)
    if options.voxel_size > 0 and len(cloud.xyz):
        typical = float(np.median(depth[depth > 0]))
        cloud = voxel_downsample(cloud, options.voxel_size * typical)
    cloud = limit_points(cloud, options.max_points, options.seed)
    view_conf = np.array([float(pred.confidence[i][valid[i]].mean()) for i in range(len(image_paths))])
    timings["points_s"] = time.perf_counter() - t

    pretrained_w2c = None
    if compare_backbone is not None:
        t = time.perf_counter()
        other, _ = _run_backbone(compare_backbone, batch, options, progress)
        # Express the pretrained poses in the same world, so that both sets can be drawn together.
        pretrained_w2c = transform_w2c_opencv(other.w2c_opencv, sim3_from_camera_pairs(other.w2c_opencv, w2c))
        timings["compare_inference_s"] = time.perf_counter() - t

    return Reconstruction(
        image_paths=image_paths,
        sizes_wh=sizes_wh,
        w2c_opencv=w2c,
        intrinsics=K,
        records=records,
        depth=depth,
        confidence=pred.confidence,
        points_xyz=cloud.xyz,
        points_rgb=cloud.rgb,
        points_conf=cloud.conf,
        view_confidence=view_conf,
        intrinsics_source=sources,
        pairs=pair_diagnostics(w2c, K, sizes_wh, pretrained_w2c),
        pretrained_w2c_opencv=pretrained_w2c,
        chunk_residuals=residuals,
        provenance={
            "backbone": backbone.name,
            "options": {k: str(v) for k, v in vars(options).items()},
            "skipped_images": [{"file": s.path.name, "path": str(s.path), "reason": s.reason} for s in skipped],
        },
        timings=timings,
        world_source=world_source,
        warnings=notes,
    )
