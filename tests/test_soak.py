"""Soak: pose + write a dataset 200 times in one process with the tiny model; resident memory must not grow.

The reliability bar: no growth in memory beyond 5 % over many runs in one process (a
leak per run shows up here long before it hurts someone posing a few hundred photos, or a notebook / the
extreme3d dataparser re-posing in one ns-train process). Each iteration runs the whole pipeline: image
screening and loading, preprocessing, inference, points, and the atomic dataset writer (images, depth PNGs,
PLY, COLMAP via pycolmap, JSON, staging folder published over the previous output).

Resident memory is read from /proc/self/statm after ``gc.collect()``; the baseline is the median of the first
10 iterations after a 10-iteration warm-up, compared with the median of the last 10. The loop stops early (with
at least 60 measured iterations) if the machine is too busy to do 200 in about 50 s.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ITERATIONS = 200
WARMUP = 10
WINDOW = 10
TIME_BUDGET_S = 50.0
MIN_MEASURED = 60
MAX_GROWTH = 0.05


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_pose_and_write_200_times_without_memory_growth(tmp_path: Path) -> None:
    from ns_extreme.io.dataset import write_dataset
    from ns_extreme.posing import PoseModelOptions, load_backbone
    from ns_extreme.posing.options import PosingOptions
    from ns_extreme.posing.pipeline import pose_images
    from ns_extreme.posing.refine import RefineOptions

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = tmp_path / "images"
        images.mkdir()
        paths = []
        for i in range(4):
            rgb = (np.random.default_rng(i).random((48, 64, 3)) * 255).astype(np.uint8)
            paths.append(images / f"{i}.jpg")
            Image.fromarray(rgb).save(paths[-1])
        (images / "notes.txt").write_text("skipped")  # not passed: the CLI filters by extension
        backbone, _, _ = load_backbone(
            PoseModelOptions(model_size="tiny", weights="random", device="cpu", dtype="fp32"), say=lambda s: None
        )
        options = PosingOptions(max_points=5000, refinement=RefineOptions(refine=False))
        out = tmp_path / "dataset"

        samples: list[float] = []
        t0 = None
        for i in range(ITERATIONS):
            recon = pose_images(paths, backbone, options, progress=False)
            write_dataset(recon, out, overwrite=True, depth_format="png")
            del recon
            if i < WARMUP:
                continue
            if t0 is None:
                t0 = time.perf_counter()
            gc.collect()
            samples.append(rss_mb())
            if len(samples) >= MIN_MEASURED and time.perf_counter() - t0 > TIME_BUDGET_S:
                break
        assert sorted(os.listdir(tmp_path)) == ["dataset", "images"]  # no staging / replaced folders left
        base = float(np.median(samples[:WINDOW]))
        last = float(np.median(samples[-WINDOW:]))
        growth = last / base - 1.0
        print(
            f"\nsoak: {len(samples) + WARMUP} pose+write runs in {time.perf_counter() - t0:.0f} s after warm-up; "
            f"RSS {base:.1f} MB -> {last:.1f} MB ({100 * growth:+.2f} %), peak {max(samples):.1f} MB"
        )
        assert growth < MAX_GROWTH, (base, last, samples[::10])
    finally:
        torch.set_num_threads(threads)
