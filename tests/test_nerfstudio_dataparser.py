"""The `extreme3d` dataparser: registration, outputs, frames, splits, on-the-fly posing, ns-train CLI spellings."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ns_extreme.cli.process import ExtremePoses, PoseModelOptions
from ns_extreme.io.ply import read_ply
from ns_extreme.nerfstudio.dataparser_spec import extreme3d_option_names, normalise_ns_train_argv
from ns_extreme.nerfstudio.extreme3d_dataparser import Extreme3DDataParser, Extreme3DDataParserConfig
from ns_extreme.posing.options import PosingOptions

BIN = Path(sys.executable).parent
SCENE = "strecha_Herz-Jesus-P8"  # 8 images, 768x512
TINY = PoseModelOptions(model_size="tiny", weights="random", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, dev_small, one_thread) -> Path:
    root = tmp_path_factory.mktemp("dp")
    out = root / "dataset"
    ExtremePoses(data=dev_small / SCENE / "images", output_dir=out, backbone=TINY).main()
    return out


def parse(data: Path, split: str = "train", **kw):
    config = Extreme3DDataParserConfig(data=data, **kw)
    parser = config.setup()
    assert isinstance(parser, Extreme3DDataParser)
    return parser.get_dataparser_outputs(split=split)


def saved_c2w(dataset: Path) -> dict:
    meta = json.loads((dataset / "transforms.json").read_text())
    return {Path(f["file_path"]).name: np.asarray(f["transform_matrix"], dtype=np.float32) for f in meta["frames"]}


# ------------------------------------------------------------------------------------------ registration


def test_registered_as_extreme3d():
    from nerfstudio.plugins.registry_dataparser import discover_dataparsers

    configs, _ = discover_dataparsers()
    assert "extreme3d" in configs
    assert isinstance(configs["extreme3d"], Extreme3DDataParserConfig)


def test_spec_module_imports_no_nerfstudio_configs():
    """Import-order trap: the entry-point module must not pull nerfstudio's method configs (or torchvision)."""
    script = (
        "import sys, ns_extreme.nerfstudio.dataparser_spec\n"
        "bad = [m for m in ('nerfstudio.configs.method_configs', 'nerfstudio.configs.dataparser_configs', "
        "'nerfstudio.engine.trainer', 'torchvision') if m in sys.modules]\n"
        "print('BAD', bad) if bad else print('CLEAN')"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "CLEAN", proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ outputs


def test_outputs_cameras_images_points(dataset):
    out = parse(dataset)
    n = len(list((dataset / "images").iterdir()))
    assert n == 8 and len(out.image_filenames) == n and out.cameras.shape == (n,)
    assert all(p.is_file() and p.parent == dataset / "images" for p in out.image_filenames)
    assert out.cameras.camera_to_worlds.shape == (n, 3, 4)
    assert out.cameras.camera_type.unique().tolist() == [1]  # CameraType.PERSPECTIVE
    # Original image resolution.
    from PIL import Image

    for i, path in enumerate(out.image_filenames):
        with Image.open(path) as im:
            assert (int(out.cameras.width[i]), int(out.cameras.height[i])) == im.size
    meta = json.loads((dataset / "transforms.json").read_text())
    by_name = {Path(f["file_path"]).name: f for f in meta["frames"]}
    for i, path in enumerate(out.image_filenames):
        f = by_name[path.name]
        assert float(out.cameras.fx[i]) == pytest.approx(f["fl_x"], rel=1e-6)
        assert float(out.cameras.cy[i]) == pytest.approx(f["cy"], rel=1e-6)
    xyz, rgb = out.metadata["points3D_xyz"], out.metadata["points3D_rgb"]
    assert xyz.dtype == torch.float32 and rgb.dtype == torch.uint8
    assert xyz.ndim == 2 and xyz.shape[1] == 3 and rgb.shape == xyz.shape and len(xyz) > 100
    assert torch.isfinite(xyz).all()
    # Depth maps are handed on with the millimetre unit of the PNGs.
    assert [p.name for p in out.metadata["depth_filenames"]] == [p.stem + ".png" for p in out.image_filenames]
    assert out.metadata["depth_unit_scale_factor"] == pytest.approx(1e-3)
    assert out.dataparser_transform.shape == (3, 4)
    # Default normalisation: cameras within the unit box, like nerfstudio's parsers.
    assert float(out.cameras.camera_to_worlds[:, :, 3].abs().max()) == pytest.approx(1.0, abs=1e-5)


def test_identity_frame_reproduces_transforms_json_exactly(dataset):
    out = parse(dataset, orientation_method="none", center_method="none", auto_scale_poses=False)
    c2w = saved_c2w(dataset)
    for i, path in enumerate(out.image_filenames):
        assert torch.equal(out.cameras.camera_to_worlds[i], torch.from_numpy(c2w[path.name][:3]))
    assert out.dataparser_scale == 1.0
    applied = np.asarray(json.loads((dataset / "transforms.json").read_text())["applied_transform"])
    np.testing.assert_allclose(out.dataparser_transform.numpy(), applied, atol=1e-7)
    xyz, rgb, _ = read_ply(dataset / "sparse_pc.ply")
    assert torch.equal(out.metadata["points3D_xyz"], torch.from_numpy(xyz.astype(np.float32)))
    assert torch.equal(out.metadata["points3D_rgb"], torch.from_numpy(rgb))


def test_cameras_and_points_share_the_output_frame(dataset):
    out = parse(dataset, scale_factor=2.0)
    ident = parse(dataset, orientation_method="none", center_method="none", auto_scale_poses=False)
    s = out.dataparser_scale
    # T = dataparser_transform @ inv(applied): the saved world -> output map before scaling.
    applied = np.vstack(
        [np.asarray(json.loads((dataset / "transforms.json").read_text())["applied_transform"]), [0, 0, 0, 1]]
    )
    T = np.vstack([out.dataparser_transform.numpy(), [0, 0, 0, 1]]) @ np.linalg.inv(applied)
    assert np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-5)
    c_saved = ident.cameras.camera_to_worlds.double().numpy()
    c_out = out.cameras.camera_to_worlds.double().numpy()
    np.testing.assert_allclose(c_out[:, :, :3], T[:3, :3] @ c_saved[:, :, :3], atol=1e-5)
    t_expected = s * (c_saved[:, :, 3] @ T[:3, :3].T + T[:3, 3])
    np.testing.assert_allclose(c_out[:, :, 3], t_expected, rtol=1e-4, atol=1e-5 * np.abs(t_expected).max())
    p_saved = ident.metadata["points3D_xyz"].double().numpy()
    p_expected = s * (p_saved @ T[:3, :3].T + T[:3, 3])
    np.testing.assert_allclose(
        out.metadata["points3D_xyz"].double().numpy(), p_expected, rtol=1e-4, atol=1e-4 * np.abs(p_expected).max()
    )
    assert float(out.cameras.camera_to_worlds[:, :, 3].abs().max()) == pytest.approx(2.0, abs=1e-4)


def test_json_file_as_data(dataset):
    out = parse(dataset / "transforms.json")
    assert len(out.image_filenames) == 8


def test_transforms_json_is_read_once_and_the_display_frame_is_explicit(dataset, monkeypatch):
    """nerfstudio asks for each split; the file is parsed once per parser, and the viewer's frame is a value
    that does not depend on which split was parsed first (or whether any was)."""
    import ns_extreme.io.transforms_json as tj

    reads = []
    real = tj.read_transforms_json
    monkeypatch.setattr(tj, "read_transforms_json", lambda *a, **k: reads.append(a) or real(*a, **k))
    parser = Extreme3DDataParserConfig(data=dataset, scale_factor=1.5).setup()
    frame = parser.display_frame()
    train, val = parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("val")
    assert len(reads) == 1
    assert frame.transforms_json == dataset / "transforms.json" and frame.scale == pytest.approx(train.dataparser_scale)
    np.testing.assert_array_equal(frame.transform, train.dataparser_transform.numpy())
    assert torch.equal(train.dataparser_transform, val.dataparser_transform)


def test_eval_modes(dataset):
    auto_train, auto_eval = parse(dataset, split="train"), parse(dataset, split="val")
    assert len(auto_train.image_filenames) == len(auto_eval.image_filenames) == 8  # sparse: all views train
    interval = dict(eval_mode="interval", eval_interval=4)
    train, ev = parse(dataset, split="train", **interval), parse(dataset, split="test", **interval)
    assert len(train.image_filenames) == 6 and [p.name for p in ev.image_filenames] == ["0000.jpg", "0004.jpg"]
    dense = parse(dataset, split="val", sparse_max_views=4, train_split_fraction=0.75)  # auto -> fraction
    assert len(dense.image_filenames) == 2


def test_depth_and_points_can_be_switched_off(dataset):
    out = parse(dataset, load_3D_points=False, load_depth=False)
    assert "points3D_xyz" not in out.metadata and out.metadata["depth_filenames"] is None


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a transforms.json nor images"):
        parse(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ on the fly


def test_raw_image_folder_is_posed_once_and_cached(tmp_path, dev_small, one_thread, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    for name in ("0000.jpg", "0002.jpg", "0004.jpg", "0006.jpg"):
        shutil.copy(dev_small / SCENE / "images" / name, images)
    out = parse(images, backbone=TINY)
    cache = images / ".extreme3d"
    assert (cache / "transforms.json").is_file() and (cache / "extreme_poses.json").is_file()
    assert [p.name for p in out.image_filenames] == ["0000.jpg", "0002.jpg", "0004.jpg", "0006.jpg"]
    assert all(p.parent == cache / "images" for p in out.image_filenames)
    stamp = (cache / "transforms.json").stat().st_mtime_ns

    capsys.readouterr()
    parse(images, split="val", backbone=TINY)  # same images and options: reuse
    assert "reusing cached poses" in capsys.readouterr().out
    assert (cache / "transforms.json").stat().st_mtime_ns == stamp

    parse(images, backbone=TINY, posing=PosingOptions(conf_percentile=10.0))  # options changed: pose again
    assert "posing again" in capsys.readouterr().out
    assert (cache / "transforms.json").stat().st_mtime_ns != stamp

    elsewhere = tmp_path / "cache"
    parse(images, backbone=TINY, cache_dir=elsewhere)
    assert (elsewhere / "transforms.json").is_file()


def test_raw_image_folder_with_a_known_lens_is_undistorted_before_posing(tmp_path, dev_small, one_thread, capsys):
    """--camera-model / --camera-params in the extreme3d parser: the cached dataset holds the undistorted pinhole
    photos and cameras (as ns-process-data extreme-poses writes them), and the lens is part of the cache key."""
    from ns_extreme.io.undistort import parse_lens, undistort_photo
    from ns_extreme.posing.lens import LensOptions

    images = tmp_path / "photos"
    images.mkdir()
    for name in ("0000.jpg", "0002.jpg", "0004.jpg"):
        shutil.copy(dev_small / SCENE / "images" / name, images)
    params = "700,700,384,256,-0.12,0.03,0.001,-0.001"  # the 768 x 512 photos
    lens = LensOptions(camera_model="OPENCV", camera_params=params)
    out = parse(images, backbone=TINY, lens=lens)
    cache = images / ".extreme3d"
    prov = json.loads((cache / "extreme_poses.json").read_text())
    K = np.asarray(prov["lens_distortion"]["undistorted_K"])
    expected_K = undistort_photo(images / "0000.jpg", tmp_path / "u.jpg", parse_lens("OPENCV", params))
    np.testing.assert_allclose(K, expected_K)
    assert K[0, 0] != 700.0  # alpha 0: the pinhole camera that sees no border differs from the lens's
    np.testing.assert_allclose(out.cameras.fx.squeeze(-1).numpy(), K[0, 0], rtol=1e-5)
    np.testing.assert_allclose(out.cameras.cx.squeeze(-1).numpy(), K[0, 2], rtol=1e-5)
    cached = np.asarray(Image.open(cache / "images" / "0000.jpg"), dtype=np.float64)
    assert np.abs(cached - np.asarray(Image.open(images / "0000.jpg"), dtype=np.float64)).mean() > 5  # remapped
    assert np.abs(cached - np.asarray(Image.open(tmp_path / "u.jpg"), dtype=np.float64)).mean() < 2  # the same maps

    capsys.readouterr()
    parse(images, backbone=TINY, lens=lens)
    assert "reusing cached poses" in capsys.readouterr().out
    parse(images, backbone=TINY)  # no lens now: pose again
    assert "posing again" in capsys.readouterr().out
    assert json.loads((cache / "extreme_poses.json").read_text())["lens_distortion"] is None


def test_foreign_cache_folder_is_not_replaced(tmp_path, dev_small):
    images = tmp_path / "photos"
    shutil.copytree(dev_small / SCENE / "images", images)
    (images / ".extreme3d").mkdir()
    (images / ".extreme3d" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not an extreme3d cache"):
        parse(images, backbone=TINY)
    assert (images / ".extreme3d" / "mine.txt").is_file()


# ------------------------------------------------------------------------------------------ ns-train CLI


def test_tyro_builds_a_config_with_our_dataparser(dataset):
    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    config = tyro.cli(
        AnnotatedBaseConfigUnion,
        args=["splatfacto", "--max-num-iterations", "7", "extreme3d", "--data", str(dataset),
              "--orientation-method", "none", "--conf-percentile", "20", "--auto-scale-poses", "False"],
    )  # fmt: skip
    dp = config.pipeline.datamanager.dataparser
    assert isinstance(dp, Extreme3DDataParserConfig)
    assert dp.data == dataset and dp.orientation_method == "none" and dp.posing.conf_percentile == 20.0
    assert dp.auto_scale_poses is False and config.max_num_iterations == 7
    assert config.method_name == "splatfacto"


def test_extreme3d_options_do_not_collide_with_trainer_options():
    from nerfstudio.engine.trainer import TrainerConfig

    trainer = {f.name.lower().replace("_", "-") for f in dataclasses.fields(TrainerConfig)}
    assert not extreme3d_option_names() & trainer
    assert {"orientation-method", "conf-percentile", "weights", "load-3d-points"} <= extreme3d_option_names()


P = "--pipeline.datamanager.dataparser"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["ns-train", "splatfacto", P, "extreme3d", "--data", "D"],
            ["ns-train", "splatfacto", "--data", "D", "extreme3d"],
        ),
        (
            ["ns-train", "splatfacto", f"{P}=extreme3d", "--data", "D"],
            ["ns-train", "splatfacto", "--data", "D", "extreme3d"],
        ),
        (
            [
                "ns-train",
                "splatfacto",
                "--max-num-iterations",
                "5",
                P,
                "extreme3d",
                "--orientation-method",
                "none",
                "--pipeline.model.background-color",
                "1",
                "1",
                "1",
                "--data",
                "D",
                "--conf_percentile=10",
                "--help",
            ],
            [
                "ns-train",
                "splatfacto",
                "--max-num-iterations",
                "5",
                "--pipeline.model.background-color",
                "1",
                "1",
                "1",
                "--data",
                "D",
                "extreme3d",
                "--orientation-method",
                "none",
                "--conf_percentile=10",
                "--help",
            ],
        ),
        (
            ["ns-train", "nerfacto", P, "extreme3d", f"{P}.scale-factor", "2", f"{P}.data=D", "--vis", "viewer"],
            ["ns-train", "nerfacto", "--vis", "viewer", "extreme3d", "--scale-factor", "2", "--data=D"],
        ),
        (["ns-train", "splatfacto", "--data", "D"], None),  # nothing to do
        (["ns-train", "splatfacto", P, "colmap", "--data", "D"], None),  # other dataparsers: left to tyro
        (["ns-train", "splatfacto", P, "extreme3d", "extreme3d", "--data", "D"], None),  # also positional
        (["ns-train", "splatfacto", P, "extreme3d", "nerfstudio-data"], None),
        (["ns-train", "splatfacto", P, "extreme3d", P, "extreme3d"], None),  # twice
        (["ns-train", P, "extreme3d", "splatfacto"], None),  # method not first
        (["ns-train", "splatfacto", "stray", P, "extreme3d"], None),  # positional after the method
        (["ns-train", "splatfacto", P], None),
    ],
)
def test_normalise_ns_train_argv(argv, expected):
    assert normalise_ns_train_argv(argv) == expected


def _env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}


def test_ns_train_accepts_the_flag_spelling(dataset):
    """As ns-train does: the entry points load while nerfstudio imports, then tyro parses sys.argv."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.argv = ["ns-train", "nerfacto", "--max-num-iterations", "3",
                    "{P}", "extreme3d", "--data", {str(dataset)!r}, "--orientation-method", "none",
                    "{P}.conf-percentile", "10"]
        import tyro
        from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
        c = tyro.cli(AnnotatedBaseConfigUnion)
        dp = c.pipeline.datamanager.dataparser
        print("RESULT", type(dp).__name__, c.data, dp.orientation_method, dp.posing.conf_percentile,
              c.max_num_iterations)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"RESULT Extreme3DDataParserConfig {dataset} none 10.0 3" in proc.stdout
    assert "reading '--pipeline.datamanager.dataparser extreme3d' as the dataparser subcommand" in proc.stderr


def test_splatfacto_help_lists_extreme3d(capsys):
    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    with pytest.raises(SystemExit) as e:
        tyro.cli(AnnotatedBaseConfigUnion, args=["splatfacto", "--help"])
    assert e.value.code == 0
    assert "extreme3d" in capsys.readouterr().out


def test_real_ns_train_help_with_the_flag_spelling():
    proc = subprocess.run(
        [str(BIN / "ns-train"), "splatfacto", P, "extreme3d", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "splatfacto extreme3d [-h]" in proc.stdout.splitlines()[0]
    assert "--conf-percentile" in proc.stdout and "--orientation-method" in proc.stdout
