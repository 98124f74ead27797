"""Bounded-memory posing of large collections: overlapping chunks joined by robust Sim(3) on shared frames."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from ns_extreme import distributed
from ns_extreme.geometry.projection import unproject_depth
from ns_extreme.geometry.sim3 import robust_sim3, transform_w2c_opencv
from ns_extreme.posing.backbone import FramePredictions

SAMPLES_PER_SHARED_FRAME = 4000


def chunk_ranges(num_frames: int, max_frames: int, overlap: int) -> list[list[int]]:
    """Consecutive windows of at most ``max_frames`` sharing ``overlap`` frames with the previous one."""
    if not max_frames or num_frames <= max_frames:
        return [list(range(num_frames))]
    ranges, start = [], 0
    while True:
        end = min(start + max_frames, num_frames)
        ranges.append(list(range(start, end)))
        if end == num_frames:
            return ranges
        start = end - overlap


def _shared_points(
    pred: FramePredictions, local: int, other: FramePredictions, other_local: int, rng: np.random.Generator,
    valid: np.ndarray | None = None,
):  # fmt: skip
    """Matching 3D points of one frame as seen by two passes (same pixel, each pass's depth and camera).

    ``valid`` [H, W] marks real pixels: padding depth is arbitrary and differs between passes, and when it
    covers most of the frame (wide images, mixed batches) a confidence median over all pixels lets it in."""
    conf = np.minimum(pred.confidence[local], other.confidence[other_local])
    ok = (pred.depth[local] > 0) & (other.depth[other_local] > 0)
    if valid is not None:
        ok &= valid
    good = np.flatnonzero(ok & (conf >= (np.median(conf[ok]) if ok.any() else np.inf)))
    pick = rng.choice(good, size=min(SAMPLES_PER_SHARED_FRAME, len(good)), replace=False)
    src = unproject_depth(pred.depth[local], pred.intrinsics[local], pred.w2c_opencv[local]).reshape(-1, 3)[pick]
    dst = unproject_depth(
        other.depth[other_local], other.intrinsics[other_local], other.w2c_opencv[other_local]
    ).reshape(-1, 3)[pick]
    return src, dst, conf.ravel()[pick]


def predict_in_chunks(
    predict: Callable[[torch.Tensor], FramePredictions],
    images: torch.Tensor,
    max_frames: int,
    overlap: int,
    on_chunk: Callable[[int, int], None] = lambda done, total: None,
    seed: int = 0,
    valid: np.ndarray | None = None,
    distribute: bool = False,
    priors: Optional[Any] = None,
) -> tuple[FramePredictions | None, list[dict[str, float]]]:
    """Predictions for all frames in the world of the first chunk, and per-join residual statistics.

    ``valid`` [N, H, W] (optional) marks real pixels; only those are used to join chunks. ``distribute`` (under
    torchrun): the chunks are spread over the ranks (round-robin) and gathered on rank 0, which joins them exactly
    as one process would; the other ranks get ``(None, [])``. ``priors`` (``FramePriors``, optional): each pass
    gets those of its frames, ``predict(images, priors=...)``."""
    ranges = chunk_ranges(images.shape[0], max_frames, overlap)

    def run(frames: list[int]) -> FramePredictions:
        return predict(images[frames]) if priors is None else predict(images[frames], priors=priors.subset(frames))

    if not distribute:
        preds = []
        for c, frames in enumerate(ranges):
            preds.append(run(frames))
            on_chunk(c + 1, len(ranges))
        return join_chunks(ranges, preds, seed, valid)
    mine = distributed.shard(range(len(ranges)))
    preds: dict[int, FramePredictions] = {}
    for done, c in enumerate(mine, start=1):
        preds[c] = run(ranges[c])
        on_chunk(done, len(mine))
    gathered = distributed.gather_object(preds)
    if gathered is None:
        return None, []
    for part in gathered:
        preds.update(part)
    return join_chunks(ranges, [preds[c] for c in range(len(ranges))], seed, valid)


def join_chunks(
    ranges: list[list[int]], preds: list[FramePredictions], seed: int = 0, valid: np.ndarray | None = None
) -> tuple[FramePredictions, list[dict[str, float]]]:
    """Join the predictions of the chunks ``ranges`` (in order) into the world of the first one, each by a robust
    Sim(3) on the 3D points of the frames it shares with the chunks before it."""
    rng = np.random.default_rng(seed)
    merged = preds[0]
    residuals = []
    for c, (frames, pred) in enumerate(zip(ranges[1:], preds[1:]), start=1):
        shared = [f for f in frames if f < merged.w2c_opencv.shape[0]]
        pairs = [
            _shared_points(pred, frames.index(f), merged, f, rng, None if valid is None else valid[f]) for f in shared
        ]
        src, dst, weight = (np.concatenate(x) for x in zip(*pairs))
        sim, res = robust_sim3(src, dst, weights=weight)
        scale = float(np.median(np.linalg.norm(dst - dst.mean(0), axis=1)))
        residuals.append(
            {
                "chunk": c,
                "shared_frames": len(shared),
                "median": float(np.median(res)) / scale,
                "p90": float(np.percentile(res, 90)) / scale,
            }
        )
        new = [frames.index(f) for f in frames if f not in shared]
        merged = FramePredictions(
            w2c_opencv=np.concatenate([merged.w2c_opencv, transform_w2c_opencv(pred.w2c_opencv[new], sim)]),
            intrinsics=np.concatenate([merged.intrinsics, pred.intrinsics[new]]),
            depth=np.concatenate([merged.depth, pred.depth[new] * np.float32(sim.scale)]),
            confidence=np.concatenate([merged.confidence, pred.confidence[new]]),
            **_joined_extras(merged, pred, new, sim.scale),
        )
    return merged, residuals


def _joined_extras(merged: FramePredictions, pred: FramePredictions, new: list[int], scale: float) -> dict[str, Any]:
    """Optional outputs of the joined passes: camera-frame normals as they are, Gaussians scaled like depth."""
    out: dict[str, Any] = {}
    for name in ("normals", "normals_confidence"):
        if getattr(merged, name) is not None:
            out[name] = np.concatenate([getattr(merged, name), getattr(pred, name)[new]])
    if merged.gaussians is not None:
        out["gaussians"] = type(merged.gaussians).concatenate(
            [merged.gaussians, pred.gaussians.subset(new).scaled(scale)]
        )
    return out
