"""benchmarks/gpu_check.sh --dry-run: the prepared GPU check runs end to end on CPU with tiny models and writes
one results file naming its machine (the real run needs a CUDA GPU; see the script's header)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check_dry-run.json").read_text())
    sections = data["sections"]
    assert {k: s["status"] for k, s in sections.items()} == dict.fromkeys(
        ("forward", "accuracy", "train_step", "posing"), "ok"
    )
    forward = sections["forward"]["result"]["rows"]
    assert [(r["model"], r["frames"]) for r in forward] == [("vggt", 2), ("vggt", 3), ("pi3", 2), ("pi3", 3)]
    assert all(r["finite"] and r["forward_s"] > 0 and r["precision"] == "fp32" for r in forward)  # auto on AVX2
    accuracy = {r["model"]: r for r in sections["accuracy"]["result"]["rows"]}
    assert all(r["outputs_float32"] for r in accuracy.values())
    # bf16 backbone, float32 heads: small but nonzero differences (tiny models: ~1e-4 and ~0.01-0.04 degrees)
    assert 0 < accuracy["vggt"]["pose_enc_max_abs_diff"] < 1e-2
    assert all(0 <= r["relative_rotation_deg_max"] < 1.0 for r in accuracy.values())
    steps = sections["train_step"]["result"]["rows"]
    assert all(r["loss_finite"] and r["trained_tensors"] > 0 for r in steps)
    assert sections["posing"]["result"]["frames_posed"] == 3  # the dry run poses 3 of the example's photos
    assert data["environment"]["machine_label"]
    md = (tmp_path / "gpu_check_dry-run.md").read_text()
    assert "Machine: " in md and "## forward: ok" in md
