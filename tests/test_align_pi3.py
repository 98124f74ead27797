"""``ns-extreme-align`` with ``--model pi3``: the rotation adapter (R_w2c = R_c2wᵀ, no anchor term), training
through the CLI on a fixed castle pair (the loss goes down, only the selected biases move), bias export in the
released format, and evaluation checked against an independent computation. Tiny π³, CPU, image size 56."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colmap_w2c_rotations
from scipy.spatial.transform import Rotation

import ns_extreme.align.train as train_mod
from ns_extreme.align.loss import rotation_loss
from ns_extreme.align.pairs import PairList
from ns_extreme.cli import align as cli
from ns_extreme.io.images import preprocess_images
from ns_extreme.models import get_spec, load_model
from ns_extreme.models.pi3 import Pi3, Pi3Config

CASTLE = "strecha_castle-P19_odd9"
STEPS = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def rot(axis: str, deg: float) -> torch.Tensor:
    return torch.tensor(Rotation.from_euler(axis, deg, degrees=True).as_matrix(), dtype=torch.float32)


def c2w_poses(R_c2w: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] rotations -> [..., 4, 4] camera-to-world poses with an arbitrary translation."""
    T = torch.zeros(*R_c2w.shape[:-2], 4, 4)
    T[..., :3, :3] = R_c2w
    T[..., :3, 3] = torch.tensor([0.3, -1.0, 2.0])
    T[..., 3, 3] = 1.0
    return T


# ------------------------------------------------------------------------------------------------ adapter, loss


def test_pi3_reader_gives_transposed_c2w_rotations() -> None:
    spec = get_spec("pi3")
    R_c2w = torch.tensor(Rotation.random(6, random_state=3).as_matrix(), dtype=torch.float32).reshape(3, 2, 3, 3)
    poses = c2w_poses(R_c2w).requires_grad_(True)
    estimates = spec.w2c_rotations({"camera_poses": poses})
    assert len(estimates) == 1  # π³: one camera estimate, no refinement iterations
    R_w2c = estimates[0]
    assert R_w2c.shape == (3, 2, 3, 3) and R_w2c.dtype == torch.float32
    assert torch.equal(R_w2c, R_c2w.transpose(-1, -2))
    R_w2c.sum().backward()  # differentiable: the biases upstream get gradients through it
    assert torch.equal(poses.grad[..., :3, :3], torch.ones(3, 2, 3, 3)) and not poses.grad[..., :3, 3:].any()


def test_pi3_loss_has_no_anchor_term() -> None:
    spec = get_spec("pi3")
    assert spec.reference_frame is False and get_spec("vggt").reference_frame is True
    R_gt = torch.stack([torch.eye(3), rot("y", 70) @ rot("x", 20)])[None]  # w2c
    W = rot("z", 40) @ rot("x", -25)  # a predicted world rotated against the GT one
    poses = c2w_poses(W @ R_gt.transpose(-1, -2))  # c2w of the GT cameras in the rotated world
    estimates = spec.w2c_rotations({"camera_poses": poses})
    out = rotation_loss(estimates, R_gt, spec.reference_frame)
    assert out.loss.item() == pytest.approx(0.0, abs=3e-3)  # the clamp (1 - 1e-6) leaves ~1.4e-3 rad at exactly 0
    assert math.degrees(out.anchor_error.item()) == pytest.approx(
        math.degrees(math.acos((W.trace().item() - 1) / 2)), abs=0.2
    )
    assert rotation_loss(estimates, R_gt, True).loss.item() == pytest.approx(out.anchor_error.item(), abs=3e-3)
    # a wrong relative rotation is penalised by its angle
    wrong = c2w_poses(W @ torch.stack([R_gt[0, 0], rot("y", 30) @ R_gt[0, 1]]).transpose(-1, -2))[None]
    assert rotation_loss(spec.w2c_rotations({"camera_poses": wrong}), R_gt, False).loss.item() == pytest.approx(
        math.radians(30), abs=3e-3
    )


def test_paper_bias_names_match_released_pi3_checkpoint(bias_ckpts: Path) -> None:
    with torch.device("meta"):
        full = Pi3()
    names = train_mod.select_bias_names(full, "pi3", ("paper",))
    released = torch.load(bias_ckpts / "PI3_changed_bias.pth", map_location="cpu", weights_only=True)["bias_state_dict"]
    assert names == list(released) and len(names) == 36  # same names, same order as the released file
    params = dict(full.named_parameters())
    assert all(tuple(params[n].shape) == tuple(released[n].shape) for n in names)
    assert sum(params[n].numel() for n in names) == 82_944
    assert (
        train_mod.model_config_for("pi3", "tiny") == Pi3Config.tiny()
        and train_mod.model_config_for("pi3", "full") == Pi3Config()
    )


# ------------------------------------------------------------------------------------------------ CLI: pairs, train


@pytest.fixture(scope="module")
def castle_pairs(tmp_path_factory: pytest.TempPathFactory, dev_small: Path) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
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
                str(path),
            ]
        )
        == 0
    )
    return path


@pytest.fixture(scope="module")
def responsive_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random π³ weights whose camera output responds to the decoder biases: ``weights="random"`` damps
    the rotation layer 100x (near-identity rotations) and LayerScale starts at 0.01; both undone here so a few
    steps visibly move the relative rotation."""
    state = load_model("pi3", weights="random", alignment="pretrained", config=Pi3Config.tiny(), seed=0).state_dict()
    state["camera_head.fc_rot.weight"] = state["camera_head.fc_rot.weight"] * 100.0
    for k in [k for k in state if k.startswith("decoder.") and k.endswith(".gamma")]:
        state[k] = state[k] * 100.0
    path = tmp_path_factory.mktemp("weights") / "tiny_pi3.pth"
    torch.save(state, path)
    return path


def common_args(weights: Path) -> list[str]:
    return [
        "--model",
        "pi3",
        "--model-size",
        "tiny",
        "--weights",
        str(weights),
        "--image-size",
        "56",
        "--device",
        "cpu",
        "--no-progress",
    ]


def train_through_cli(argv: list[str]) -> train_mod.TrainResult:
    """Run ``ns-extreme-align train`` in-process and keep the TrainResult (model, optimizer, history) it returns."""
    results: list[train_mod.TrainResult] = []
    real = train_mod.train

    def keep(cfg, **kw):
        results.append(real(cfg, **kw))
        return results[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "train", keep)  # cli.run imports train at call time
        assert cli.main(["train", *argv]) == 0
    assert len(results) == 1
    return results[0]


def fixed_pair_args(pairs: Path, weights: Path, out: Path, steps: int) -> list[str]:
    """The first castle pair, same order and pixels at every step."""
    return [
        "--pairs",
        str(pairs),
        "--max-pairs",
        "1",
        "--output-dir",
        str(out),
        "--batch-size",
        "1",
        "--epochs",
        str(STEPS),
        "--max-steps",
        str(steps),
        "--lr",
        "1e-2",
        "--warmup-steps",
        "0",
        "--schedule",
        "constant",
        "--grad-clip",
        "0",
        "--swap-prob",
        "0",
        "--cache-images",
        "--checkpoint-every",
        "3",
        "--keep-checkpoints",
        "0",
        "--log-every",
        "1",
        *common_args(weights),
    ]


@pytest.fixture(scope="module")
def pi3_run(tmp_path_factory: pytest.TempPathFactory, castle_pairs: Path, responsive_weights: Path):
    out = tmp_path_factory.mktemp("run") / "pi3"
    return out, train_through_cli(fixed_pair_args(castle_pairs, responsive_weights, out, STEPS))


def load_tiny(weights: Path, alignment: str | Path = "pretrained") -> torch.nn.Module:
    return load_model("pi3", weights=weights, alignment=alignment, config=Pi3Config.tiny())


def test_training_reduces_the_loss_without_anchor_term(pi3_run) -> None:
    out, result = pi3_run
    assert result.completed and result.step == STEPS and json.loads((out / "config.json").read_text())["model"] == "pi3"
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(x) for x in losses) and all(
        math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in result.history
    )
    for h in result.history:  # the loss is the relative error alone (batch of one pair)
        assert h["loss"] == pytest.approx(math.radians(h["rel_error_deg"]), rel=1e-5)
        assert h["anchor_error_deg"] > 1.0  # π³'s arbitrary world: camera 1 is far from identity, and not penalised
    assert losses[-1] < losses[0] - math.radians(0.5), [math.degrees(x) for x in losses]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= STEPS - 3  # mostly monotone on the fixed pair


def test_only_the_paper_biases_change_and_get_gradients(pi3_run, responsive_weights: Path) -> None:
    _, result = pi3_run
    model, opt = result.model, result.optimizer
    names = set(result.bias_names)
    assert result.bias_names == get_spec("pi3").paper_bias_set.select(model) and len(names) == 36
    before, after = load_tiny(responsive_weights).state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        if k not in names:
            assert torch.equal(before[k], after[k]), f"frozen tensor {k} changed"
    assert sorted(n for n in names if not torch.equal(before[n], after[n])) == sorted(names)
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in names), n
        assert (p.grad is not None) == (n in names), n
        if n in names:
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    params = dict(model.named_parameters())
    assert {id(p) for p in opt.state} == {id(params[n]) for n in names}
    assert sum(params[n].numel() for n in names) == 2_592  # tiny: 9 blocks x (96 + 32 + 128 + 32)


def test_export_has_the_released_format_and_loads_back(pi3_run, responsive_weights: Path, bias_ckpts: Path) -> None:
    out, result = pi3_run
    path = out / "biases.pth"
    obj = torch.load(path, map_location="cpu", weights_only=True)
    released = torch.load(bias_ckpts / "PI3_changed_bias.pth", map_location="cpu", weights_only=True)
    assert list(obj) == list(released) == ["bias_state_dict"]
    assert list(obj["bias_state_dict"]) == list(released["bias_state_dict"]) == result.bias_names
    assert all(t.dtype == torch.float32 for t in obj["bias_state_dict"].values())
    loaded, base = load_tiny(responsive_weights, path), load_tiny(responsive_weights)
    assert loaded.load_report.alignment.parameters == 2_592
    lp, bp = loaded.state_dict(), base.state_dict()
    assert {k for k in lp if not torch.equal(lp[k], bp[k])} == set(result.bias_names)
    assert all(torch.equal(lp[n], result.biases[n]) for n in result.bias_names)


def test_gradient_checkpointing_gives_the_same_steps(
    pi3_run, castle_pairs: Path, responsive_weights: Path, tmp_path: Path
) -> None:
    out, result = pi3_run
    ckpt = train_through_cli(
        fixed_pair_args(castle_pairs, responsive_weights, tmp_path / "ckpt", 3) + ["--gradient-checkpointing"]
    )
    assert [h["loss"] for h in ckpt.history] == pytest.approx([h["loss"] for h in result.history[:3]], abs=1e-6)
    at_3 = train_mod.read_train_checkpoint(out / "checkpoints" / "step-000003.ckpt")["biases"]
    for n in ckpt.bias_names:
        assert torch.allclose(ckpt.biases[n], at_3[n], atol=1e-6, rtol=0), n


# ------------------------------------------------------------------------------------------------ CLI: eval


def angle_deg(R: np.ndarray) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(R) - 1.0) / 2.0))))


def test_eval_report_matches_independent_computation(
    pi3_run,
    castle_pairs: Path,
    responsive_weights: Path,
    dev_small: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, _ = pi3_run
    ev = tmp_path / "ev"
    assert (
        cli.main(
            [
                "eval",
                "--pairs",
                str(castle_pairs),
                "--output-dir",
                str(ev),
                "--models",
                "pretrained",
                f"tuned={run / 'biases.pth'}",
                "--dtype",
                "fp32",
                "--batch-size",
                "2",
                "--no-plots",
                *common_args(responsive_weights),
            ]
        )
        == 0
    )
    assert "tuned MRE°" in capsys.readouterr().out
    report = json.loads((ev / "report.json").read_text())
    assert report["model"] == "pi3" and set(report["models"]) == {"pretrained", "tuned"}
    pairs = PairList.load_json(castle_pairs)
    assert report["num_pairs"] == len(pairs) == 6
    gt = colmap_w2c_rotations(dev_small / CASTLE / "sparse" / "0" / "images.txt")
    root = Path(pairs.root)
    for label, alignment in (("pretrained", "pretrained"), ("tuned", run / "biases.pth")):
        model = load_tiny(responsive_weights, alignment)
        for rec, row in zip(pairs.records, report["pairs"]):
            batch = preprocess_images([root / rec.view1.path, root / rec.view2.path], mode="crop", target_size=56)
            with torch.no_grad():
                c2w = model(batch.images[None], heads=("camera",))["camera_poses"][0].double().numpy()
            R1, R2 = c2w[0, :3, :3].T, c2w[1, :3, :3].T  # w2c
            G1, G2 = gt[Path(rec.view1.path).name], gt[Path(rec.view2.path).name]
            pred_rel, gt_rel = R2 @ R1.T, G2 @ G1.T
            assert row["errors_deg"][label] == pytest.approx(angle_deg(pred_rel @ gt_rel.T), abs=2e-3)
            np.testing.assert_allclose(np.asarray(row["pred_rel_rotation"][label]), pred_rel, atol=1e-4)
            np.testing.assert_allclose(np.asarray(row["gt_rel_rotation"]), gt_rel, atol=1e-9)
    errors = {k: [p["errors_deg"][k] for p in report["pairs"]] for k in ("pretrained", "tuned")}
    assert errors["pretrained"] != errors["tuned"]  # the tuned biases are really applied


def test_pairs_accepts_pi3_and_writes_the_same_list(tmp_path: Path, dev_small: Path) -> None:
    sources = ["--sources", str(dev_small / CASTLE), "--strategy", "all", "--no-balance"]
    assert cli.main(["pairs", *sources, "--output", str(tmp_path / "vggt.json")]) == 0
    assert cli.main(["pairs", *sources, "--model", "pi3", "--output", str(tmp_path / "pi3.json")]) == 0
    assert (tmp_path / "pi3.json").read_bytes() == (tmp_path / "vggt.json").read_bytes()
    assert len(json.loads((tmp_path / "pi3.json").read_text())["pairs"]) == 36  # 9 views, all pairs


def test_help_names_pi3(capsys: pytest.CaptureFixture[str]) -> None:
    for sub in ("pairs", "train", "eval"):
        with pytest.raises(SystemExit) as exc:
            cli.main([sub, "--help"])
        assert exc.value.code == 0
        assert "pi3" in capsys.readouterr().out
