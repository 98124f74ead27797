"""nerfacto trains on CPU for a few iterations on an extreme3d dataset (end to end through ns-train).

Offline recipe (docs nerfstudio_integration.md §1.3, §6.2): a wrapper script with an ``if __name__ ==
"__main__"`` guard (nerfstudio's datamanager spawns worker processes) that makes LPIPS build AlexNet without
downloading pretrained weights (test-only: LPIPS numbers become meaningless), then runs ns-train's entry point.
Marked slow (over a minute here): run with `pytest -m slow tests/test_nerfacto_cpu.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCENE = "strecha_Herz-Jesus-P8"

WRAPPER = textwrap.dedent(
    """
    import sys


    def _offline_lpips():
        import torchmetrics.functional.image.lpips as lpips

        original = lpips._get_tv_model_features

        def no_download(net, pretrained=False):
            return original(net, pretrained=False)

        lpips._get_tv_model_features = no_download


    if __name__ == "__main__":
        _offline_lpips()
        sys.argv[0] = "ns-train"
        from nerfstudio.scripts.train import entrypoint

        entrypoint()
    """
)

CPU_RECIPE = [
    "--machine.device-type", "cpu", "--max-num-iterations", "4", "--vis", "tensorboard",
    "--viewer.quit-on-train-completion", "True", "--mixed-precision", "False",
    "--pipeline.model.implementation", "torch",
    "--pipeline.datamanager.train-num-rays-per-batch", "256", "--pipeline.datamanager.eval-num-rays-per-batch", "256",
    "--steps-per-eval-batch", "1000", "--steps-per-eval-image", "1000", "--steps-per-eval-all-images", "100000",
]  # fmt: skip


@pytest.mark.slow  # 53-80 s on the shared 2-core box (mostly nerfstudio imports in the trainer and its worker)
def test_nerfacto_trains_on_an_extreme3d_dataset(tmp_path, dev_small):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "120"}
    dataset = tmp_path / "dataset"
    posed = subprocess.run(
        [sys.executable, "-m", "ns_extreme.cli.process", "--data", str(dev_small / SCENE / "images"),
         "--output-dir", str(dataset), "--model-size", "tiny", "--weights", "random"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert posed.returncode == 0, posed.stderr[-3000:]

    script = tmp_path / "ns_train_offline.py"
    script.write_text(WRAPPER)
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(script), "nerfacto", *CPU_RECIPE, "--output-dir", str(runs),
         "extreme3d", "--data", str(dataset)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    checkpoints = list(runs.glob("*/nerfacto/*/nerfstudio_models/step-*.ckpt"))
    assert checkpoints, list(runs.rglob("*"))
    run_dir = checkpoints[0].parents[1]
    assert (run_dir / "dataparser_transforms.json").is_file()
    config = (run_dir / "config.yml").read_text()
    assert "Extreme3DDataParserConfig" in config
