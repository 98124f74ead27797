"""Opt-in (`-m slow`): the full-size VGGT-1B architecture with random weights on this machine.

Writes time and peak memory to tests/artifacts/full_size_forward.json and full_size_extreme_poses.json.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest
import torch

from ns_extreme.models import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_full_size_forward_on_two_images():
    t0 = time.perf_counter()
    model = load_model("vggt", weights="random", alignment="aligned")
    build_s = time.perf_counter() - t0
    assert model.load_report.alignment.parameters == 73_728
    images = torch.rand(2, 3, 392, 518, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(images)
    forward_s = time.perf_counter() - t0
    assert out["pose_enc"].shape == (1, 2, 9)
    assert out["depth"].shape == (1, 2, 392, 518, 1) and out["world_points"].shape == (1, 2, 392, 518, 3)
    assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    record = {
        "build_s": round(build_s, 1),
        "forward_s": round(forward_s, 1),
        "peak_rss_gb": round(peak_gb, 2),
        "threads": torch.get_num_threads(),
    }
    (REPO_ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
    (REPO_ROOT / "tests" / "artifacts" / "full_size_forward.json").write_text(json.dumps(record, indent=2))
    print(record)


def test_full_size_extreme_poses_on_the_example_scene(tmp_path):
    """The whole `ns-process-data extreme-poses` command with the full-size VGGT-1B architecture (random weights,
    the released alignment applied) on the README's example scene; time and peak memory to
    tests/artifacts/full_size_extreme_poses.json."""
    import subprocess
    import sys

    import pycolmap
    from PIL import Image

    images = REPO_ROOT / "examples" / "sacre_coeur" / "images"
    photos = sorted(images.glob("*.jpg"))
    out = tmp_path / "sacre_coeur"
    cmd = [str(Path(sys.executable).parent / "ns-process-data"), "extreme-poses", "--data", str(images),
           "--output-dir", str(out), "--weights", "random", "--device", "cpu"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall_s = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6

    transforms = json.loads((out / "transforms.json").read_text())
    assert len(transforms["frames"]) == len(photos) == 10
    for frame in transforms["frames"]:  # original resolution, per frame
        w, h = Image.open(out / frame["file_path"]).size
        assert (frame["w"], frame["h"]) == (w, h) and frame["fl_x"] > 0
    provenance = json.loads((out / "extreme_poses.json").read_text())
    assert provenance["model"]["model"] == "vggt" and provenance["model"]["alignment"]["parameters"] == 73_728
    reconstruction = pycolmap.Reconstruction(str(out / "colmap" / "sparse" / "0"))
    assert reconstruction.num_reg_images() == 10 and reconstruction.num_points3D() > 1000
    record = {
        "images": len(photos),
        "wall_s": round(wall_s, 1),
        "peak_rss_gb": round(peak_gb, 2),
        "timings_s": provenance["timings_s"],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    (REPO_ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
    (REPO_ROOT / "tests" / "artifacts" / "full_size_extreme_poses.json").write_text(json.dumps(record, indent=2))
    print(record)
