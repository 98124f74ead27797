"""Relative-rotation evaluation on real dev_small pairs (castle: all sides of a courtyard; Sacré-Cœur: mixed
portrait / landscape photos), with the tiny random VGGT, checked against an independent re-computation."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colmap_w2c_rotations

from ns_extreme.align.evaluate import EvalConfig, evaluate, parse_alignment_arg, parse_alignment_args
from ns_extreme.align.pairs import PairList, mine_pairs, views_from_colmap
from ns_extreme.geometry.pose_encoding import w2c_intrinsics_from_pose_encoding
from ns_extreme.io.images import preprocess_images
from ns_extreme.models import get_spec, load_model
from ns_extreme.models.bias import bias_state_dict, write_bias_checkpoint
from ns_extreme.models.vggt import VGGTConfig

CASTLE = "strecha_castle-P19_odd9"
SACRE = "hloc_sacre_coeur"
SEED = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eval_pairs(tmp_path_factory: pytest.TempPathFactory, dev_small: Path) -> Path:
    def scene_records(scene: str, limit: int | None) -> list:
        views = views_from_colmap(dev_small / scene / "sparse" / "0", dev_small / scene / "images", root=dev_small)
        return mine_pairs(views, scene, strategy="all", balance=False, max_pairs=limit, seed=1)

    castle = scene_records(CASTLE, None)  # 2 large, 7 small, 27 none: keep the first 8 none
    recs = [r for r in castle if r.overlap != "none"] + [r for r in castle if r.overlap == "none"][:8]
    recs += scene_records(SACRE, 12)  # portrait and landscape photos: pairs of mixed shapes
    path = tmp_path_factory.mktemp("eval") / "pairs.json"
    PairList(str(dev_small), recs).save_json(path)
    return path


def cfg_for(pairs: Path, out: Path, **kw) -> EvalConfig:
    base = dict(
        pairs=pairs,
        output_dir=out,
        models=("pretrained",),
        weights="random",
        model_size="tiny",
        image_size=56,
        device="cpu",
        dtype="fp32",
        progress=False,
        seed=SEED,
        batch_size=4,
    )
    base.update(kw)
    return EvalConfig(**base)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, eval_pairs: Path):
    cfg = cfg_for(eval_pairs, tmp_path_factory.mktemp("out") / "ev")
    return cfg, evaluate(cfg)


def independent_errors(pairs: PairList, dev_small: Path) -> np.ndarray:
    """Each pair alone through the tiny model, decoded with the pose-encoding decoder, GT from images.txt."""
    model = load_model("vggt", weights="random", alignment="pretrained", config=VGGTConfig.tiny(), seed=SEED)
    gt_by_scene = {s: colmap_w2c_rotations(dev_small / s / "sparse" / "0" / "images.txt") for s in (CASTLE, SACRE)}
    errs = []
    for rec in pairs.records:
        batch = preprocess_images([dev_small / rec.view1.path, dev_small / rec.view2.path], mode="crop", target_size=56)
        with torch.no_grad():
            enc = model(batch.images[None], heads=("camera",))["pose_enc"][0].double()
        w2c, _ = w2c_intrinsics_from_pose_encoding(enc, batch.images.shape[-2:])
        R = w2c[:, :3, :3].numpy()
        gt = gt_by_scene[rec.scene]
        G1, G2 = gt[Path(rec.view1.path).name], gt[Path(rec.view2.path).name]
        d = (R[1] @ R[0].T) @ (G2 @ G1.T).T
        errs.append(math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(d) - 1) / 2)))))
    return np.array(errs)


def test_report_counts_and_metrics_match_independent_computation(tiny_run, eval_pairs: Path, dev_small: Path) -> None:
    cfg, result = tiny_run
    pairs = PairList.load_json(eval_pairs)
    report = json.loads((cfg.output_dir / "report.json").read_text())
    assert report["format"] == "ns_extreme.align_eval" and report["num_pairs"] == len(pairs) == 29
    counts = Counter(r.overlap for r in pairs.records)
    summary = report["models"]["pretrained"]["summary"]
    for c in ("large", "small", "none"):
        assert summary[c]["count"] == counts[c] == report["counts"][c]
    assert summary["all"]["count"] == len(pairs)
    assert min(counts.values()) > 0  # every class is exercised
    mixed = [r for r in pairs.records if (r.view1.height > r.view1.width) != (r.view2.height > r.view2.width)]
    assert len(mixed) >= 2  # pairs whose two images are padded to a common shape

    mine = independent_errors(pairs, dev_small)
    reported = np.array([p["errors_deg"]["pretrained"] for p in report["pairs"]])
    np.testing.assert_allclose(reported, mine, atol=2e-3)
    labels = np.array([r.overlap for r in pairs.records])
    for c in ("large", "small", "none"):
        assert summary[c]["mre"] == pytest.approx(float(np.median(reported[labels == c])), abs=1e-9)
        assert summary[c]["mre"] == pytest.approx(float(np.median(mine[labels == c])), abs=2e-3)
        assert summary[c]["ra30"] == pytest.approx(100.0 * float(np.mean(reported[labels == c] <= 30.0)))
    assert summary["all"]["mre"] == pytest.approx(float(np.median(reported)), abs=1e-9)
    # per-pair GT angle is the pair list's
    assert [p["gt_angle_deg"] for p in report["pairs"]] == pytest.approx(
        [r.rel_angle_deg for r in pairs.records], abs=1e-6
    )
    # the random model is no oracle: errors spread over the GT angles
    assert summary["none"]["mre"] > 30.0


def test_plots_and_table(tiny_run) -> None:
    cfg, result = tiny_run
    for name in ("errors_hist.png", "errors_cdf.png"):
        data = (cfg.output_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert result.table.splitlines()[0].split()[:3] == ["class", "pairs", "pretrained"]
    assert not list(cfg.output_dir.glob(".*tmp*"))


def test_batching_does_not_change_results(tiny_run, eval_pairs: Path, tmp_path: Path) -> None:
    cfg, result = tiny_run
    single = evaluate(cfg_for(eval_pairs, tmp_path / "bs1", batch_size=1, plots=False))
    np.testing.assert_allclose(single.errors["pretrained"], result.errors["pretrained"], atol=1e-3)


def test_oracle_predictor_gives_zero_error(eval_pairs: Path, tmp_path: Path) -> None:
    result = evaluate(cfg_for(eval_pairs, tmp_path / "oracle"), predictors={"oracle": lambda batch: batch["R_gt"]})
    s = result.summaries["oracle"]
    for c in ("large", "small", "none", "all"):
        assert s[c]["mre"] == pytest.approx(0.0, abs=1e-4)
        assert s[c]["ra15"] == 100.0 and s[c]["ra30"] == 100.0
    # and an oracle that swaps the two cameras' rotations is wrong by exactly the GT angle
    swapped = evaluate(
        cfg_for(eval_pairs, tmp_path / "swapped", plots=False), predictors={"inv": lambda b: b["R_gt"].flip(1)}
    )
    pairs = PairList.load_json(eval_pairs)
    # R1 R2ᵀ vs R2 R1ᵀ differ by twice the relative angle (mod 360)
    expect = [min(2 * r.rel_angle_deg, 360 - 2 * r.rel_angle_deg) for r in pairs.records]
    np.testing.assert_allclose(swapped.errors["inv"], expect, atol=1e-4)
    # the report keeps both relative rotations per pair: the swapped one is the transpose of the GT one
    for rec, row in zip(pairs.records, swapped.report["pairs"]):
        gt = np.asarray(row["gt_rel_rotation"])
        np.testing.assert_allclose(gt, rec.gt_relative_rotation(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(row["pred_rel_rotation"]["inv"]), gt.T, atol=1e-6)


def test_bias_checkpoint_models_side_by_side(eval_pairs: Path, tmp_path: Path) -> None:
    model = load_model("vggt", weights="random", alignment="pretrained", config=VGGTConfig.tiny(), seed=SEED)
    names = get_spec("vggt").paper_bias_set.select(model)
    same = bias_state_dict(model, names)
    write_bias_checkpoint(tmp_path / "same.pth", same)
    g = torch.Generator().manual_seed(0)
    changed = {n: t + 2.0 * torch.randn(t.shape, generator=g) for n, t in same.items()}
    write_bias_checkpoint(tmp_path / "run1" / "biases.pth", changed)
    cfg = cfg_for(
        eval_pairs,
        tmp_path / "side",
        models=("pretrained", f"same={tmp_path / 'same.pth'}", str(tmp_path / "run1" / "biases.pth")),
        max_pairs=10,
    )
    result = evaluate(cfg)
    assert list(result.errors) == ["pretrained", "same", "run1"]
    assert len(result.errors["run1"]) == 10
    np.testing.assert_allclose(result.errors["same"], result.errors["pretrained"], atol=1e-9)
    assert np.abs(result.errors["run1"] - result.errors["pretrained"]).max() > 0.01
    report = json.loads(result.report_path.read_text())
    assert report["models"]["run1"]["load_report"]["alignment_parameters"] == 2304
    assert "run1 MRE°" in result.table and "same MRE°" in result.table


def test_alignment_arg_parsing(tmp_path: Path) -> None:
    assert parse_alignment_arg("pretrained").label == "pretrained"
    assert parse_alignment_arg("aligned").alignment == "aligned"
    (tmp_path / "exp").mkdir()
    ck = tmp_path / "exp" / "biases.pth"
    ck.write_bytes(b"x")
    assert parse_alignment_arg(str(ck)).label == "exp"
    assert parse_alignment_arg(f"mine={ck}").label == "mine"
    with pytest.raises(FileNotFoundError, match="not found"):
        parse_alignment_arg("mine=/no/such/file.pth")
    with pytest.raises(ValueError, match="unique"):
        parse_alignment_args(["pretrained", "pretrained"])
    with pytest.raises(ValueError, match="label"):
        parse_alignment_arg("bad label=pretrained")
