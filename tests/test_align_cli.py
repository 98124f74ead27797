"""``ns-extreme-align``: help texts, one-line errors with exit code 2, presets, and pairs -> train -> eval
end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

from ns_extreme.align.evaluate import EvalConfig
from ns_extreme.align.pairs import PairList
from ns_extreme.align.train import TrainConfig
from ns_extreme.cli import align as cli
from ns_extreme.cli.presets import load_preset, preset_default

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "align_vggt_paper.yaml"
CASTLE = "strecha_castle-P19_odd9"


def script() -> list[str]:
    exe = Path(sys.executable).parent / "ns-extreme-align"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "ns_extreme.cli.align"]


def run_many(commands: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Start all commands at once (imports dominate their run time), then collect them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="120")
    env.pop("NS_EXTREME_TRACEBACK", None)
    procs = {
        k: subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k, c in commands.items()
    }
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        out[k] = subprocess.CompletedProcess(commands[k], p.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def pickled_npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    view = {
        "path": "scenes/a/0/images/x.jpg",
        "qw": 1.0,
        "qx": 0.0,
        "qy": 0.0,
        "qz": 0.0,
        "fx": 500.0,
        "fy": 500.0,
        "width": 640,
        "height": 480,
    }
    data = {
        0: {"img1": view, "img2": dict(view, path="scenes/a/0/images/y.jpg"), "overlap_amount": "large", "scene": "a"}
    }
    path = tmp_path_factory.mktemp("npy") / "UnScenePairs.npy"
    np.save(path, np.array(data, dtype=object), allow_pickle=True)
    return path


def assert_one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_console_script_help_and_user_errors(tmp_path: Path, pickled_npy: Path) -> None:
    exe = script()
    res = run_many(
        {
            "help": exe + ["--help"],
            # the module is runnable too (python -m), with the same error handling
            "missing_pairs": [
                sys.executable,
                "-m",
                "ns_extreme.cli.align",
                "train",
                "--pairs",
                str(tmp_path / "missing.json"),
            ],
            "pickle": exe + ["pairs", "--sources", str(pickled_npy), "--output", str(tmp_path / "p.json")],
        },
        cwd=tmp_path,
    )
    assert res["help"].returncode == 0
    for word in ("pairs", "train", "eval"):
        assert word in res["help"].stdout
    assert_one_line_error(res["missing_pairs"], "missing.json", "not found")
    assert_one_line_error(res["pickle"], "--allow-pickle")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(
    "sub, options",
    [
        (
            "pairs",
            [
                "--sources",
                "--output",
                "--strategy",
                "--k",
                "--balance",
                "--max-pairs-per-scene",
                "--allow-pickle",
                "--root",
            ],
        ),
        (
            "train",
            [
                "--pairs",
                "--images-root",
                "--model",
                "--weights",
                "--init-alignment",
                "--bias-set",
                "--epochs",
                "--batch-size",
                "--lr",
                "--weight-decay",
                "--warmup-steps",
                "--grad-clip",
                "--dtype",
                "--gradient-checkpointing",
                "--image-size",
                "--color-jitter",
                "--swap-prob",
                "--seed",
                "--output-dir",
                "--checkpoint-every",
                "--resume",
                "--max-steps",
                "--device",
                "--num-workers",
                "--log-every",
                "--preset",
            ],
        ),
        (
            "eval",
            [
                "--pairs",
                "--models",
                "--weights",
                "--image-size",
                "--device",
                "--dtype",
                "--output-dir",
                "--batch-size",
                "--max-pairs",
                "--images-root",
                "--preset",
            ],
        ),
    ],
)
def test_subcommand_help(sub: str, options: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([sub, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in options:
        assert opt in text, opt


def test_in_process_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], dev_small: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "ns_extreme.pairs", "root": ".", "pairs": [{"scene": 1}]}')
    cases = [
        (["pairs", "--sources", str(tmp_path / "nowhere")], "source not found"),
        (["eval", "--pairs", str(broken), "--models", "pretrained"], "pair 0: field 'scene'"),
        (["train", "--pairs", str(broken)], "broken.json"),
        (["pairs", "--sources", str(dev_small / CASTLE), "--k", "0"], "--k"),
        (["eval", "--pairs", str(tmp_path / "x.json"), "--models", "mine=/no/such.pth"], "not found"),
        (["train", "--pairs", str(tmp_path / "x.json"), "--lr", "-1"], "--lr"),
        (["train", "--preset", str(tmp_path / "nopreset.yaml"), "--pairs", "x.json"], "preset file not found"),
    ]
    for argv, fragment in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], (argv, err)


@pytest.mark.parametrize("command", ["pairs", "train", "eval"])
def test_model_choices_come_from_the_registry(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from ns_extreme.models import MODELS

    args = ["--sources", "x"] if command == "pairs" else ["--pairs", "x.json"]
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, *args, "--model", "nosuchmodel"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "nosuchmodel" in err and all(repr(name) in err for name in MODELS), err


def parse_with_preset(argv: list[str]) -> object:
    """What `ns-extreme-align` does: the preset becomes the subcommand's default config, then tyro parses."""
    return tyro.cli(cli.command_type(cli.preset_defaults(argv)), args=argv)


def test_preset_file_gives_defaults_and_cli_overrides(tmp_path: Path) -> None:
    values = load_preset(PRESET, "train")
    assert values["bias_set"] == ["paper"] and values["epochs"] == 2 and values["init_alignment"] == "pretrained"
    cfg = parse_with_preset(["train", "--preset", str(PRESET), "--pairs", "p.json", "--lr", "0.5", "--dtype", "fp32"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.lr == 0.5 and cfg.dtype == "fp32"  # command line wins
    assert cfg.epochs == 2 and cfg.bias_set == ("paper",) and cfg.weights == "facebook/VGGT-1B"  # from the preset
    assert cfg.image_size == 518 and cfg.gradient_checkpointing is True and cfg.preset == PRESET
    ev = parse_with_preset(["eval", "--pairs", "t.json", "--preset", str(PRESET)])
    assert isinstance(ev, EvalConfig) and ev.models == ("pretrained", "aligned") and ev.batch_size == 1
    # every option of the preset is a real option, with a value of its type
    for section, cls in (("train", TrainConfig), ("eval", EvalConfig)):
        preset_default(cls, load_preset(PRESET, section))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        cli.preset_defaults(["train", "--preset", str(bad), "--pairs", "p.json"])
    bad.write_text("train:\n  epochs: two\n")
    with pytest.raises(ValueError, match="option 'epochs': expected int, got 'two'"):
        cli.preset_defaults(["train", "--preset", str(bad), "--pairs", "p.json"])


def test_a_flag_overrides_the_preset_wherever_it_stands(tmp_path: Path) -> None:
    """Preset values are defaults, not arguments: a flag before or after --preset wins, the rest comes from the
    file with its own types (YAML reads `1e-3` as a string), and required options stay required."""
    preset = tmp_path / "mine.yaml"
    preset.write_text("train:\n  epochs: 5\n  lr: 1e-3\n  output-dir: runs/x\n  bias_set: paper\n")
    before = ["train", "--epochs", "7", "--preset", str(preset), "--pairs", "p.json"]
    after = ["train", "--preset", str(preset), "--pairs", "p.json", "--epochs", "7"]
    for argv in (before, after):
        cfg = parse_with_preset(argv)
        assert isinstance(cfg, TrainConfig) and cfg.epochs == 7, argv
        assert (
            cfg.lr == 1e-3
            and cfg.output_dir == Path("runs/x")
            and cfg.bias_set == ("paper",)
            and cfg.pairs == Path("p.json")
        )
    with pytest.raises(SystemExit):
        parse_with_preset(["train", "--preset", str(preset)])  # --pairs is still required


def test_pairs_train_eval_end_to_end(
    tmp_path: Path, dev_small: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ns_extreme.viewer.pairs_browser as pairs_browser

    served = []
    monkeypatch.setattr(pairs_browser, "serve_pairs_browser", lambda path, **kw: served.append((Path(path), kw)))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pairs = tmp_path / "pairs.json"
        assert (
            cli.main(
                [
                    "pairs",
                    "--sources",
                    str(dev_small / CASTLE),
                    "--strategy",
                    "all",
                    "--max-pairs-per-scene",
                    "6",
                    "--output",
                    str(pairs),
                ]
            )
            == 0
        )
        pl = PairList.load_json(pairs)
        assert len(pl) == 6 and pl.counts() == {"large": 2, "small": 2, "none": 2}
        assert Path(pl.root) == (dev_small / CASTLE / "images").absolute()
        run = tmp_path / "run"
        common = [
            "--weights",
            "random",
            "--model-size",
            "tiny",
            "--image-size",
            "56",
            "--device",
            "cpu",
            "--no-progress",
        ]
        assert (
            cli.main(
                [
                    "train",
                    "--pairs",
                    str(pairs),
                    "--output-dir",
                    str(run),
                    "--max-steps",
                    "2",
                    "--batch-size",
                    "3",
                    "--lr",
                    "1e-2",
                    *common,
                ]
            )
            == 0
        )
        assert (run / "biases.pth").is_file() and (run / "checkpoints" / "step-000002.ckpt").is_file()
        assert cli.main(["train", "--pairs", str(pairs), "--output-dir", str(run), "--max-steps", "3", *common]) == 2
        assert "--resume" in capsys.readouterr().err
        assert (
            cli.main(
                [
                    "train",
                    "--pairs",
                    str(pairs),
                    "--output-dir",
                    str(run),
                    "--max-steps",
                    "3",
                    "--batch-size",
                    "3",
                    "--lr",
                    "1e-2",
                    "--resume",
                    *common,
                ]
            )
            == 0
        )
        ev = tmp_path / "ev"
        assert (
            cli.main(
                [
                    "eval",
                    "--pairs",
                    str(pairs),
                    "--output-dir",
                    str(ev),
                    "--models",
                    "pretrained",
                    f"tuned={run / 'biases.pth'}",
                    "--dtype",
                    "fp32",
                    "--batch-size",
                    "2",
                    "--view",
                    *common,
                ]
            )
            == 0
        )
        assert [(p, kw["host"]) for p, kw in served] == [(ev / "report.json", "127.0.0.1")]
        out = capsys.readouterr().out
        assert "tuned MRE°" in out and "pretrained MRE°" in out
        report = json.loads((ev / "report.json").read_text())
        assert set(report["models"]) == {"pretrained", "tuned"} and report["num_pairs"] == 6
        assert (ev / "errors_hist.png").is_file() and (ev / "errors_cdf.png").is_file()
    finally:
        torch.set_num_threads(torch_threads)


def test_pairs_from_several_sources_and_npy_import(
    tmp_path: Path, dev_small: Path, pickled_npy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "multi.json"
    fountain = dev_small / "strecha_fountain-P11" / "transforms.json"
    assert (
        cli.main(
            [
                "pairs",
                "--sources",
                str(dev_small / CASTLE),
                str(fountain),
                "--strategy",
                "knn-direction",
                "--k",
                "3",
                "--no-balance",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    pl = PairList.load_json(out)
    assert Path(pl.root) == dev_small.absolute()  # the common parent of both image folders
    scenes = {r.scene for r in pl.records}
    assert scenes == {CASTLE, "strecha_fountain-P11"}
    for r in pl.records:
        assert (Path(pl.root) / r.view1.path).is_file() and (Path(pl.root) / r.view2.path).is_file()
    imported = tmp_path / "imported.json"
    assert cli.main(["pairs", "--sources", str(pickled_npy), "--allow-pickle", "--output", str(imported)]) == 0
    pl2 = PairList.load_json(imported)
    assert len(pl2) == 1 and pl2.root == "" and pl2.records[0].overlap_reference == "large"
    capsys.readouterr()
    assert cli.main(["train", "--pairs", str(imported), "--weights", "random", "--model-size", "tiny"]) == 2
    assert "--images-root" in capsys.readouterr().err
