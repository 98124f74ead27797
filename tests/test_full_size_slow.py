"""Opt-in (`-m slow`): the full-size VGGT-1B architecture with random weights on this machine.

Writes time and peak memory to tests/artifacts/full_size_forward.json.
"""

from __future__ import annotations

import json
import resource
import time

import pytest
import torch

from ns_extreme.models import load_model
from pathlib import Path

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
    record = {"build_s": round(build_s, 1), "forward_s": round(forward_s, 1), "peak_rss_gb": round(peak_gb, 2), "threads": torch.get_num_threads()}
    (REPO_ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
    (REPO_ROOT / "tests" / "artifacts" / "full_size_forward.json").write_text(json.dumps(record, indent=2))
    print(record)
