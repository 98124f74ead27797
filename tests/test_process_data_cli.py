"""`ns-process-data` (stock subcommands + extreme-poses) and the `extreme-poses` command, end to end.

The real pipeline runs with the tiny random wiring-test model (`--model-size tiny --weights random`): its poses
mean nothing, but every stage (scan, load, preprocess, inference, points, dataset writer) runs for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
SCENE = "strecha_Herz-Jesus-P8"  # 8 images, 768x512
TINY = ["--model-size", "tiny", "--weights", "random"]
FEED_FORWARD = [*TINY, "--no-refine"]
"""For tests of the command itself: refinement has its own tests (test_refine.py) and the end-to-end run keeps it."""


def _env() -> dict:
    # One BLAS/OpenMP thread: on a busy 2-core machine oversubscription makes the tiny model 20x slower.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "120"}


def run(cmd: list, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def ns_process_data(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run([str(BIN / "ns-process-data"), *args], cwd=cwd)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory, dev_small) -> Path:
    """A copy of a dev_small image folder plus one non-image file (which must be skipped)."""
    folder = tmp_path_factory.mktemp("cli") / "photos"
    shutil.copytree(dev_small / SCENE / "images", folder)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def processed(images) -> tuple[Path, subprocess.CompletedProcess]:
    out = images.parent / "dataset"
    proc = ns_process_data("extreme-poses", "--data", str(images), "--output-dir", str(out), *TINY)
    return out, proc


def test_scripts_are_installed():
    for name in ("ns-process-data", "ns-extreme-process-data", "ns-train"):
        assert (BIN / name).is_file(), f"{name} missing: pip install -e . in this venv"


def test_help_lists_stock_subcommands_and_extreme_poses():
    proc = ns_process_data("--help")
    assert proc.returncode == 0, proc.stderr
    usage = proc.stdout.splitlines()[0]
    for name in ("images", "video", "polycam", "metashape", "realitycapture", "record3d", "odm", "extreme-poses"):
        assert name in usage, usage


def test_stock_images_help_is_unchanged():
    ours = ns_process_data("images", "--help")
    script = (
        "import sys; sys.argv[0] = 'ns-process-data'; "
        "from nerfstudio.scripts.process_data import entrypoint; entrypoint()"
    )
    stock = run([sys.executable, "-c", script, "images", "--help"])
    assert ours.returncode == stock.returncode == 0, ours.stderr + stock.stderr
    assert ours.stdout == stock.stdout
    assert "--matching-method" in ours.stdout


def test_extreme_poses_help_explains_options():
    proc = ns_process_data("extreme-poses", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in (
        "--data", "--output-dir", "--model", "--weights", "--alignment", "--intrinsics", "--poses-from",
        "--conf-percentile", "--max-points", "--voxel-size", "--max-frames-per-pass", "--chunk-overlap",
        "--preprocess", "--device", "--dtype", "--compare-pretrained", "--depth-format", "--overwrite", "--verbose",
    ):  # fmt: skip
        assert flag in proc.stdout, flag
    assert "facebook/VGGT-1B" in proc.stdout
    # Flat flags, no group prefixes.
    assert "--posing." not in proc.stdout and "--backbone." not in proc.stdout


def test_alias_offers_extreme_poses():
    proc = run([str(BIN / "ns-extreme-process-data"), "extreme-poses", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "usage: ns-extreme-process-data extreme-poses" in proc.stdout


def test_end_to_end_writes_a_dataset(processed, images):
    out, proc = processed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rel in ("transforms.json", "sparse_pc.ply", "extreme_poses.json", "colmap/sparse/0/cameras.bin",
                "colmap/sparse/0/images.bin", "colmap/sparse/0/points3D.bin"):  # fmt: skip
        assert (out / rel).is_file(), rel
    n = len(list((images).glob("*.jpg")))
    assert len(list((out / "images").iterdir())) == n
    assert len(list((out / "depth").glob("*.png"))) == n
    meta = json.loads((out / "transforms.json").read_text())
    assert len(meta["frames"]) == n and meta["ply_file_path"] == "sparse_pc.ply"
    assert {(f["w"], f["h"]) for f in meta["frames"]} == {(768, 512)}
    prov = json.loads((out / "extreme_poses.json").read_text())
    assert prov["input"]["skipped_files"] == ["notes.txt"]
    assert prov["model_size"] == "tiny"
    # User-facing output: warning about the skipped file, licence line, summary table.
    assert "notes.txt" in proc.stdout and proc.stdout.count("licence:") == 1
    assert "views posed" in proc.stdout and "peak memory" in proc.stdout
    # Refinement ran on the real photos; the tiny random model's poses are far off, so whatever it kept says why.
    provenance = json.loads((out / "extreme_poses.json").read_text())
    assert provenance["refinement"]["status"] in ("refined", "failed")
    assert "refinement" in proc.stdout and "colmap" not in proc.stderr.lower()
    for view in provenance["views"]:
        record = view["refinement"]
        assert record["status"] == "refined" or record["reason"]
    # Nothing staged is left behind.
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".dataset")]


def test_rerun_refuses_existing_output_then_overwrites(processed, images):
    out, first = processed
    assert first.returncode == 0
    before = (out / "transforms.json").stat().st_mtime_ns
    proc = ns_process_data("extreme-poses", "--data", str(images), "--output-dir", str(out), *FEED_FORWARD)
    assert_one_line_error(proc, "already exists", "--overwrite")
    assert (out / "transforms.json").stat().st_mtime_ns == before
    proc = ns_process_data(
        "extreme-poses", "--data", str(images), "--output-dir", str(out), *FEED_FORWARD, "--overwrite"
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "transforms.json").is_file()


@pytest.mark.parametrize("case", ["empty", "one", "missing", "file"])
def test_bad_inputs_give_one_line_errors(tmp_path, dev_small, case):
    data = tmp_path / "in"
    if case == "empty":
        data.mkdir()
        expected = "found 0 image"
    elif case == "one":
        data.mkdir()
        shutil.copy(dev_small / SCENE / "images" / "0000.jpg", data)
        expected = "found 1 image"
    elif case == "missing":
        expected = "not found"
    else:
        data = dev_small / SCENE / "images" / "0000.jpg"
        expected = "must be a folder"
    proc = ns_process_data("extreme-poses", "--data", str(data), "--output-dir", str(tmp_path / "out"), *TINY)
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "out").exists()


def test_missing_weights_file_is_a_user_error(tmp_path, images):
    proc = ns_process_data(
        "extreme-poses",
        "--data",
        str(images),
        "--output-dir",
        str(tmp_path / "o"),
        "--weights",
        str(tmp_path / "nope.safetensors"),
    )
    assert_one_line_error(proc, "nope.safetensors")


def test_ctrl_c_leaves_nothing_half_written(tmp_path, images):
    """A KeyboardInterrupt in the middle of writing (after images and depth are staged) -> exit 130, no output."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        """
        import sys
        import ns_extreme.io.dataset as ds
        def interrupt(*a, **k):
            raise KeyboardInterrupt
        ds.write_ply = interrupt
        sys.argv[0] = "ns-process-data"
        from ns_extreme.nerfstudio.process_data import entrypoint
        entrypoint()
        """
    )
    proc = run(
        [sys.executable, "-c", script, "extreme-poses", "--data", str(images), "--output-dir", str(out), *FEED_FORWARD]
    )
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging folder


def test_run_guarded_maps_errors():
    from ns_extreme.cli.runtime import run_guarded
    from ns_extreme.models import ModelLoadError
    from ns_extreme.posing import NonFiniteOutputError

    def raiser(exc):
        def f():
            raise exc

        return f

    assert run_guarded(lambda: None) == 0
    assert run_guarded(raiser(ValueError("bad"))) == 2
    assert run_guarded(raiser(FileExistsError("x"))) == 2
    assert run_guarded(raiser(ModelLoadError("x"))) == 2
    assert run_guarded(raiser(NonFiniteOutputError("x"))) == 2
    assert run_guarded(raiser(KeyboardInterrupt())) == 130
    with pytest.raises(RuntimeError):
        run_guarded(raiser(RuntimeError("a bug keeps its traceback")))
    with pytest.raises(SystemExit):
        run_guarded(raiser(SystemExit(0)))


def test_run_guarded_prints_one_line(capsys):
    from ns_extreme.cli.runtime import run_guarded

    def f():
        raise ValueError("first line\nsecond line " + "x" * 200)

    assert run_guarded(f) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: first line second line")


def test_fallback_when_nerfstudio_process_data_is_broken(monkeypatch, capsys):
    """If nerfstudio's process-data module cannot be imported (e.g. open3d without libusb), only
    extreme-poses is offered, with or without its subcommand name."""
    from ns_extreme.nerfstudio import process_data

    monkeypatch.setitem(sys.modules, "nerfstudio.scripts.process_data", None)  # import -> ImportError
    assert process_data.build_commands(warn=False) is None
    for args, warned in ((["extreme-poses", "--help"], False), (["--help"], True)):
        with pytest.raises(SystemExit) as e:
            process_data.entrypoint(args)
        assert e.value.code == 0
        captured = capsys.readouterr()
        assert "--conf-percentile" in captured.out
        assert ("only extreme-poses is offered" in captured.err) == warned


def test_extreme_poses_does_not_import_nerfstudio_process_data():
    script = (
        "import sys; from ns_extreme.nerfstudio.process_data import entrypoint\n"
        "try:\n    entrypoint(['extreme-poses', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED' if 'nerfstudio.scripts.process_data' in sys.modules else 'CLEAN')"
    )
    proc = run([sys.executable, "-c", script])
    assert proc.stdout.strip().endswith("CLEAN"), proc.stdout + proc.stderr


@pytest.mark.parametrize("entry", ["ns_extreme.cli.runtime:run_cli", "ns_extreme.nerfstudio.process_data:entrypoint"])
def test_path_mistakes_are_reported_before_torch_loads(tmp_path, entry):
    """A mistyped --data must not wait seconds for torch (or nerfstudio) to import before it is reported."""
    module, fn = entry.split(":")
    call = "run_cli(ExtremePoses, args)" if fn == "run_cli" else "entrypoint(['extreme-poses', *args])"
    script = textwrap.dedent(
        f"""
        import sys
        from {module} import {fn}
        from ns_extreme.cli.process import ExtremePoses
        args = ["--data", sys.argv[1], "--output-dir", sys.argv[2]]
        try:
            code = {call}
        except SystemExit as e:
            code = e.code
        print("LOADED", sorted(m for m in ("torch", "nerfstudio", "pycolmap") if m in sys.modules), "CODE", code)
        """
    )
    proc = run([sys.executable, "-c", script, str(tmp_path / "no such folder"), str(tmp_path / "out")])
    assert "LOADED [] CODE 2" in proc.stdout, proc.stdout + proc.stderr
    assert "image folder not found" in proc.stderr and "Traceback" not in proc.stderr


def test_low_memory_precision_builds_only_the_posing_heads():
    """--dtype bf16-weights: linear weights stored in bfloat16 (no float32 copy), float32 arithmetic, no point head;
    the cameras stay within bfloat16 rounding of the float32 ones."""
    import numpy as np
    import torch

    from ns_extreme.models.layers import Linear
    from ns_extreme.posing import PoseModelOptions, load_backbone

    def backbone_for(dtype: str):
        opts = PoseModelOptions(model_size="tiny", weights="random", device="cpu", dtype=dtype)
        return load_backbone(opts, say=lambda s: None)

    (full, _, _), (lean, _, report) = backbone_for("fp32"), backbone_for("bf16-weights")
    assert full.model.point_head is None and lean.model.point_head is None  # posing never runs it
    assert "bfloat16 linear weights" in report.dtype
    linears = [m for m in lean.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert lean.dtype == torch.float32  # arithmetic stays float32: no autocast
    params = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert params(lean.model) < 0.6 * params(full.model)
    images = torch.rand(3, 3, 98, full.target_size, generator=torch.Generator().manual_seed(0))
    a, b = full.predict(images), lean.predict(images)
    np.testing.assert_allclose(b.w2c_opencv, a.w2c_opencv, atol=2e-2)
    np.testing.assert_allclose(b.intrinsics, a.intrinsics, rtol=2e-2)
    assert 0 < np.abs(b.depth - a.depth).max() < 0.02 * np.abs(a.depth).max()  # differs (really narrowed), slightly


def test_tiny_wiring_model_gives_finite_sane_cameras():
    import numpy as np
    import torch

    from ns_extreme.posing import PoseModelOptions, load_backbone

    backbone, _, report = load_backbone(
        PoseModelOptions(model_size="tiny", weights="random", device="cpu", dtype="fp32"), say=lambda s: None
    )
    assert report.alignment is None  # the released alignment does not fit the tiny model
    pred = backbone.predict(torch.rand(3, 3, 98, backbone.target_size))
    fx = pred.intrinsics[:, 0, 0]
    assert np.all(np.isfinite(fx)) and np.all(fx > 0)


def test_command_runs_without_nerfstudio(tmp_path, images):
    """ns_extreme.cli.process is the nerfstudio-free implementation of extreme-poses."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["nerfstudio"] = None  # any nerfstudio import now fails
        from ns_extreme.cli.process import ExtremePoses
        from ns_extreme.cli.runtime import run_cli
        code = run_cli(ExtremePoses, sys.argv[1:])
        print("NERFSTUDIO", [m for m in sys.modules if m.startswith("nerfstudio")])
        sys.exit(code)
        """
    )
    out = tmp_path / "out"
    proc = run(
        [
            sys.executable,
            "-c",
            script,
            "--data",
            str(images),
            "--output-dir",
            str(out),
            *FEED_FORWARD,
            "--depth-format",
            "npy",
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NERFSTUDIO ['nerfstudio']" in proc.stdout
    assert len(list((out / "depth").glob("*.npy"))) == 8


def test_extreme_poses_with_pi3(images):
    """--model pi3: reference-free model, focal lengths recovered from its point maps, same dataset format."""
    out = images.parent / "dataset_pi3"
    proc = ns_process_data(
        "extreme-poses", "--data", str(images), "--output-dir", str(out), "--model", "pi3", *FEED_FORWARD
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    transforms = json.loads((out / "transforms.json").read_text())
    n = len(list(images.glob("*.jpg")))
    assert len(transforms["frames"]) == n
    assert all(f["fl_x"] > 0 and f["fl_y"] > 0 and (f["w"], f["h"]) == (768, 512) for f in transforms["frames"])
    prov = json.loads((out / "extreme_poses.json").read_text())
    assert prov["backbone"] == "pi3" and prov["model"]["model"] == "pi3"
    assert "yyfz233/Pi3" not in prov["model"]["weights"]  # random weights were asked for
