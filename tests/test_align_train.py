"""Bias-alignment training: loss, pair dataset, trainer (overfit, frozen parameters, resume, signals, export).

Real pairs from dev_small (Strecha castle, a courtyard seen from all sides; Sacré-Cœur with portrait and
landscape photos) on the tiny VGGT (`VGGTConfig.tiny()`, random weights) at image size 56.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from ns_extreme.align import train as train_mod
from ns_extreme.align.data import AugmentConfig, EpochBatchSampler, PairDataset, collate_pairs, load_pair_list
from ns_extreme.align.loss import pair_rotation_loss, rotation_loss
from ns_extreme.align.pairs import PairFileError, PairList, mine_pairs, views_from_colmap
from ns_extreme.align.train import TrainConfig, find_checkpoints, lr_factor, read_train_checkpoint, train
from ns_extreme.geometry.pose_encoding import w2c_intrinsics_from_pose_encoding
from ns_extreme.models import get_spec, load_model
from ns_extreme.models.registry import VGGT_SPEC
from ns_extreme.models.rotation_readers import w2c_rotations_from_pose_encoding
from ns_extreme.models.vggt import VGGT, VGGTConfig

CASTLE = "strecha_castle-P19_odd9"
SACRE = "hloc_sacre_coeur"


pytestmark = pytest.mark.usefixtures("one_thread")


def rot(axis: str, deg: float) -> torch.Tensor:
    return torch.tensor(Rotation.from_euler(axis, deg, degrees=True).as_matrix(), dtype=torch.float32)


def scene_pairs(dev_small: Path, scene: str) -> PairList:
    views = views_from_colmap(dev_small / scene / "sparse" / "0", dev_small / scene / "images", root=dev_small)
    return PairList(root=str(dev_small), records=mine_pairs(views, scene, strategy="all", balance=False))


@pytest.fixture(scope="module")
def castle_list(dev_small: Path) -> PairList:
    return scene_pairs(dev_small, CASTLE)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory: pytest.TempPathFactory, castle_list: PairList) -> Path:
    """6 castle pairs, 2 of each overlap class."""
    recs = []
    for c in ("large", "small", "none"):
        recs += [r for r in castle_list.records if r.overlap == c][:2]
    path = tmp_path_factory.mktemp("pairs") / "castle6.json"
    PairList(castle_list.root, recs).save_json(path)
    return path


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random VGGT weights whose camera head responds to its input.

    ``weights="random"`` damps the last camera-head layer 100x so that random models predict near-identity
    poses; undoing that gives a model whose rotations depend on the (bias-shifted) camera tokens, so a few
    optimizer steps visibly change the loss.
    """
    model = load_model("vggt", weights="random", alignment="pretrained", config=VGGTConfig.tiny(), seed=0)
    state = model.state_dict()
    state["camera_head.pose_branch.fc2.weight"] = state["camera_head.pose_branch.fc2.weight"] * 100.0
    path = tmp_path_factory.mktemp("weights") / "tiny_vggt.pth"
    torch.save(state, path)
    return path


WEIGHTS: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def _weights(tiny_weights: Path) -> None:
    WEIGHTS["tiny"] = tiny_weights


def load_tiny(alignment: str | Path = "pretrained"):
    return load_model("vggt", weights=WEIGHTS["tiny"], alignment=alignment, config=VGGTConfig.tiny())


def tiny_cfg(pairs: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        pairs=pairs,
        output_dir=out,
        weights=str(WEIGHTS["tiny"]),
        model_size="tiny",
        image_size=56,
        device="cpu",
        progress=False,
        cache_images=True,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------ loss


def test_loss_ninety_degree_relative_error_is_half_pi() -> None:
    eye = torch.eye(3)
    R_gt = torch.stack([eye, eye])[None]
    R_pred = torch.stack([eye, rot("z", 90)])[None]
    out = pair_rotation_loss(R_pred, R_gt, reference_frame=False)
    assert out.loss.item() == pytest.approx(math.pi / 2, abs=1e-5)
    assert math.degrees(out.rel_error.item()) == pytest.approx(90.0, abs=1e-3)


def test_anchor_term_only_with_reference_frame() -> None:
    # The predicted world is rotated by 30° (w2c: R_i W): the relative rotation is exact, camera 1 is not identity.
    R_gt = torch.stack([torch.eye(3), rot("y", 50)])[None]
    R_pred = torch.stack([R_gt[0, 0] @ rot("x", 30), R_gt[0, 1] @ rot("x", 30)])[None]
    with_anchor = pair_rotation_loss(R_pred, R_gt, reference_frame=True).loss.item()
    without = pair_rotation_loss(R_pred, R_gt, reference_frame=False).loss.item()
    assert without == pytest.approx(0.0, abs=3e-3)  # clamp (1 - 1e-6) leaves ~1.4e-3 rad at exactly 0
    assert with_anchor == pytest.approx(math.pi / 6, abs=3e-3)
    assert get_spec("vggt").reference_frame is True


def test_loss_is_batch_mean_and_gradients_finite_at_0_and_180() -> None:
    eye = torch.eye(3)
    R_gt = torch.stack([torch.stack([eye, eye]), torch.stack([eye, eye]), torch.stack([eye, eye])])
    q = torch.tensor(
        [
            [[0, 0, 0, 1.0], [0, 0, 0, 1.0]],
            [[0, 0, 0, 1.0], [0, 0, math.sin(math.pi / 4), math.cos(math.pi / 4)]],
            [[0, 0, 0, 1.0], [0, 0, 1.0, 0.0]],
        ],
        requires_grad=True,
    )  # errors 0°, 90°, 180°
    enc = torch.cat([torch.zeros(3, 2, 3), q, torch.ones(3, 2, 2)], dim=-1)
    out = rotation_loss(VGGT_SPEC.w2c_rotations({"pose_enc_list": [enc]}), R_gt, reference_frame=True)
    assert out.loss.item() == pytest.approx((0 + math.pi / 2 + math.pi) / 3, abs=3e-3)
    out.loss.backward()
    assert torch.isfinite(q.grad).all()


def test_rotations_from_pose_encoding_match_decoder_and_iteration_weights() -> None:
    torch.manual_seed(0)
    enc = torch.randn(4, 2, 9)
    R_ref, _ = w2c_intrinsics_from_pose_encoding(enc, (42, 56))
    assert torch.allclose(w2c_rotations_from_pose_encoding(enc), R_ref[..., :3, :3], atol=1e-5)
    R_gt = w2c_rotations_from_pose_encoding(torch.randn(4, 2, 9))
    encs = [torch.randn(4, 2, 9) for _ in range(4)]
    last = rotation_loss(VGGT_SPEC.w2c_rotations({"pose_enc_list": encs}), R_gt, True, "last").loss
    assert last.item() == pytest.approx(
        pair_rotation_loss(w2c_rotations_from_pose_encoding(encs[-1]), R_gt, True).loss.item()
    )
    per_iter = [pair_rotation_loss(w2c_rotations_from_pose_encoding(e), R_gt, True).loss.item() for e in encs]
    w = [0.6**3, 0.6**2, 0.6, 1.0]
    assert rotation_loss(
        VGGT_SPEC.w2c_rotations({"pose_enc_list": encs}), R_gt, True, "all"
    ).loss.item() == pytest.approx(sum(a * b for a, b in zip(w, per_iter)) / sum(w), rel=1e-5)


# ------------------------------------------------------------------------------------------------ data


def test_dataset_items_swap_and_jitter(dev_small: Path, castle_list: PairList) -> None:
    plain = PairDataset(castle_list, dev_small, image_size=56)
    item = plain[0]
    assert item["images"].shape == (2, 3, 42, 56)  # 768x512 -> 56 wide, round(37.3/14)*14 = 42 high
    rec = castle_list.records[0]
    assert torch.allclose(item["R_gt"][0], torch.tensor(rec.view1.rotation()), atol=1e-12)
    assert item["overlap"] == rec.overlap and not item["swapped"]

    swap = PairDataset(castle_list, dev_small, image_size=56, augment=AugmentConfig(swap_prob=1.0))
    s = swap[0]
    assert s["swapped"]
    assert torch.equal(s["images"][0], item["images"][1]) and torch.equal(s["R_gt"][1], item["R_gt"][0])

    jit = PairDataset(castle_list, dev_small, image_size=56, augment=AugmentConfig(color_jitter=0.3), seed=1)
    a, b, c = jit[(0, 0)]["images"], jit[(0, 0)]["images"], jit[(1, 0)]["images"]
    assert torch.equal(a, b)  # a pure function of (seed, epoch, index)
    assert not torch.equal(a, c) and not torch.equal(a, item["images"])
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_mixed_shapes_padded_white_and_centred(dev_small: Path) -> None:
    sacre = scene_pairs(dev_small, SACRE)
    by_name = {Path(v.path).name: v for r in sacre.records for v in (r.view1, r.view2)}
    portrait = next(r for r in sacre.records if r.view1.height > r.view1.width and r.view2.width > r.view2.height)
    ds = PairDataset(
        PairList(sacre.root, [portrait]), dev_small, image_size=56, augment=AugmentConfig(color_jitter=0.5)
    )
    img = ds[0]["images"]
    # portrait -> 56 x 56 after the centre crop; landscape 640x4xx -> 56 wide, 28/42 high: padded to 56 rows.
    assert img.shape == (2, 3, 56, 56)
    land = img[1]
    h = ds.expected_shape(0)
    assert h == (56, 56)
    assert torch.all(land[:, :7] == 1.0) and torch.all(land[:, -7:] == 1.0)  # white bands stay white under jitter
    assert len(by_name) == 10
    # collate pads a batch of different pair shapes the same way
    castle_item = PairDataset(scene_pairs(dev_small, CASTLE), dev_small, image_size=56)[0]
    batch = collate_pairs([castle_item, ds[0]])
    assert batch["images"].shape == (2, 2, 3, 56, 56)
    assert torch.all(batch["images"][0, :, :, :7] == 1.0)
    assert torch.equal(batch["images"][0, :, :, 7:49], castle_item["images"])


def test_missing_images_and_bad_pair_file(tmp_path: Path, castle_list: PairList, pair_file: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        PairDataset(castle_list, tmp_path, image_size=56)
    with pytest.raises(PairFileError, match="not found"):
        load_pair_list(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="images-root"):
        train(tiny_cfg(pair_file, tmp_path / "o", images_root=tmp_path / "no_such_dir"))


def test_epoch_sampler_is_deterministic_and_resumable() -> None:
    full = list(EpochBatchSampler(10, 3, epoch=2, seed=5))
    assert [len(b) for b in full] == [3, 3, 3, 1]
    assert sorted(i for b in full for _, i in b) == list(range(10))
    assert list(EpochBatchSampler(10, 3, epoch=2, seed=5, start=2)) == full[2:]
    assert full != list(EpochBatchSampler(10, 3, epoch=3, seed=5))


def test_lr_schedule() -> None:
    assert lr_factor(0, 4, 20, "cosine", 0.0) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(15, 4, 20, "constant", 0.0) == 1.0


# ------------------------------------------------------------------------------------------------ trainer


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory: pytest.TempPathFactory, pair_file: Path, castle_list: PairList, tiny_weights: Path):
    """4 pairs, batch 4: every step sees the same batch (augmentation off)."""
    four = tmp_path_factory.mktemp("four") / "four.json"
    recs = [r for r in load_pair_list(pair_file).records][:4]
    PairList(castle_list.root, recs).save_json(four)
    WEIGHTS["tiny"] = tiny_weights
    cfg = tiny_cfg(
        four,
        tmp_path_factory.mktemp("run") / "overfit",
        batch_size=4,
        epochs=20,
        max_steps=20,
        lr=1e-2,
        warmup_steps=0,
        schedule="constant",
        grad_clip=0.0,
        swap_prob=0.0,
        log_every=5,
        checkpoint_every=100,
    )
    return cfg, train(cfg)


def test_overfit_loss_goes_down(overfit_run) -> None:
    cfg, result = overfit_run
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 20 and result.completed and result.step == 20
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.6 * first, (first, last)
    assert all(math.isfinite(x) for x in losses)
    # not only the anchor term: the relative-rotation error itself went down on the fixed batch
    rel = [h["rel_error_deg"] for h in result.history]
    assert np.mean(rel[-3:]) < 0.9 * np.mean(rel[:3]), rel


def test_only_biases_change_and_hold_grads_and_optimizer_state(overfit_run) -> None:
    cfg, result = overfit_run
    model, opt = result.model, result.optimizer
    names = set(result.bias_names)
    assert names == set(get_spec("vggt").paper_bias_set.select(model)) and len(names) == 32
    fresh = load_tiny()
    before, after = fresh.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        if k in names:
            continue
        assert torch.equal(before[k], after[k]), f"frozen tensor {k} changed"
    changed = [n for n in names if not torch.equal(before[n], after[n])]
    assert sorted(changed) == sorted(names)
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names), n
        assert p.requires_grad == (n in names)
    state_ids = {id(p) for p in opt.state}
    params = dict(model.named_parameters())
    assert state_ids == {id(params[n]) for n in names}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(params[n].numel() for n in names)


def test_tensorboard_and_config_written(overfit_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, result = overfit_run
    acc = EventAccumulator(str(cfg.output_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/rel_error_deg"} <= tags
    loss_events = acc.Scalars("train/loss")
    assert [e.step for e in loss_events] == [5, 10, 15, 20]
    assert loss_events[-1].value == pytest.approx(result.history[-1]["loss"], rel=1e-5)
    assert (cfg.output_dir / "config.json").is_file()


def test_export_round_trip(overfit_run, bias_ckpts: Path) -> None:
    cfg, result = overfit_run
    path = cfg.output_dir / "biases.pth"
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert list(obj) == ["bias_state_dict"]
    assert list(obj["bias_state_dict"]) == result.bias_names
    for n, t in obj["bias_state_dict"].items():
        assert t.dtype == torch.float32 and torch.equal(t, result.biases[n])
    loaded = load_tiny(alignment=path)
    base = load_tiny()
    lp, bp = loaded.state_dict(), base.state_dict()
    differing = {k for k in lp if not torch.equal(lp[k], bp[k])}
    assert differing == set(result.bias_names)
    assert all(torch.equal(lp[n], result.biases[n]) for n in result.bias_names)
    assert loaded.load_report.alignment.parameters == 2304  # tiny: 8 blocks x (96 + 32 + 128 + 32)


def test_default_bias_set_names_match_released_checkpoint(bias_ckpts: Path) -> None:
    with torch.device("meta"):
        full = VGGT()
    names = get_spec("vggt").paper_bias_set.select(full)
    released = torch.load(bias_ckpts / "VGGT_changed_bias.pth", map_location="cpu", weights_only=True)[
        "bias_state_dict"
    ]
    assert set(names) == set(released) and len(names) == 32
    params = dict(full.named_parameters())
    assert sum(params[n].numel() for n in names) == 73_728
    assert all(tuple(params[n].shape) == tuple(released[n].shape) for n in names)
    assert train_mod.select_bias_names(full, "vggt", ("paper",)) == names


def test_regex_bias_set(tmp_path: Path, pair_file: Path) -> None:
    cfg = tiny_cfg(
        pair_file,
        tmp_path / "re",
        bias_set=(r"aggregator\.global_blocks\.23\.mlp\.fc2\.bias",),
        max_steps=1,
        batch_size=2,
    )
    result = train(cfg)
    assert result.bias_names == ["aggregator.global_blocks.23.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="selects no parameter"):
        train(tiny_cfg(pair_file, tmp_path / "re2", bias_set=("nothing\\.here",), max_steps=1))
    with pytest.raises(ValueError, match="invalid regular expression"):
        train(tiny_cfg(pair_file, tmp_path / "re3", bias_set=("(",), max_steps=1))


def test_resume_equals_uninterrupted_run(tmp_path: Path, pair_file: Path) -> None:
    # 6 pairs, batch 2 -> 3 steps / epoch; 3 epochs = 9 scheduled steps. Interrupt at 4 (mid epoch 1), resume to 8.
    kw = dict(batch_size=2, epochs=3, lr=5e-3, warmup_steps=2, swap_prob=0.5, color_jitter=0.2, checkpoint_every=3)
    straight = train(tiny_cfg(pair_file, tmp_path / "straight", max_steps=8, **kw))
    first = train(tiny_cfg(pair_file, tmp_path / "resumed", max_steps=4, **kw))
    assert first.step == 4 and [s for s, _ in find_checkpoints(tmp_path / "resumed")] == [3, 4]
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_cfg(pair_file, tmp_path / "resumed", max_steps=8, **kw))
    second = train(tiny_cfg(pair_file, tmp_path / "resumed", max_steps=8, resume=True, **kw))
    assert second.step == 8 and [h["step"] for h in second.history] == [5, 6, 7, 8]
    for n in straight.bias_names:
        assert torch.allclose(second.biases[n], straight.biases[n], atol=1e-6, rtol=0), n
    assert [h["loss"] for h in second.history] == pytest.approx([h["loss"] for h in straight.history[4:]], abs=1e-6)
    # the run really trained: the biases moved away from the initial ones
    assert any(not torch.allclose(first.biases[n], second.biases[n]) for n in first.bias_names)
    ckpt = read_train_checkpoint(find_checkpoints(tmp_path / "resumed")[-1][1])
    assert ckpt["step"] == 8 and ckpt["total_steps"] == 9 and ckpt["bias_names"] == straight.bias_names
    assert set(ckpt) >= {"biases", "optimizer", "scheduler", "rng", "config", "step", "epoch"}


def test_sigterm_writes_checkpoint_and_stops(tmp_path: Path, pair_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = train_mod.rotation_loss

    def loss_then_signal(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step finishes, then we stop
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "rotation_loss", loss_then_signal)
    old_handler = signal.getsignal(signal.SIGTERM)
    result = train(tiny_cfg(pair_file, tmp_path / "sig", batch_size=2, epochs=50, checkpoint_every=1000))
    assert signal.getsignal(signal.SIGTERM) == old_handler  # handlers restored
    assert not result.completed and result.stop_signal == signal.SIGTERM and result.step == 2
    assert [s for s, _ in find_checkpoints(tmp_path / "sig")] == [2]
    assert result.export is None and not (tmp_path / "sig" / "biases.pth").exists()
    ckpt = read_train_checkpoint(result.checkpoint)
    assert all(torch.equal(ckpt["biases"][n], result.biases[n]) for n in result.bias_names)


def test_failed_checkpoint_write_leaves_previous_intact(
    tmp_path: Path, pair_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(pair_file, tmp_path / "atomic", batch_size=2, epochs=2, max_steps=2, checkpoint_every=1)
    train(cfg)
    good = find_checkpoints(cfg.output_dir)[-1][1]
    good_bytes = good.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(
            tiny_cfg(
                pair_file, tmp_path / "atomic", batch_size=2, epochs=2, max_steps=3, checkpoint_every=1, resume=True
            )
        )
    monkeypatch.setattr(torch, "save", real_save)
    assert good.read_bytes() == good_bytes
    assert [s for s, _ in find_checkpoints(cfg.output_dir)] == [1, 2]
    assert not [p for p in (cfg.output_dir / "checkpoints").iterdir() if "tmp" in p.name]
    read_train_checkpoint(good)


def test_gradient_checkpointing_and_workers_do_not_change_results_bf16_runs(tmp_path: Path, pair_file: Path) -> None:
    kw = dict(
        batch_size=3,
        epochs=1,
        max_steps=2,
        lr=1e-2,
        warmup_steps=0,
        swap_prob=0.5,
        color_jitter=0.1,
        cache_images=False,
    )
    plain = train(tiny_cfg(pair_file, tmp_path / "plain", **kw))
    ckpt = train(tiny_cfg(pair_file, tmp_path / "ckpt", gradient_checkpointing=True, num_workers=2, **kw))
    for n in plain.bias_names:
        assert torch.allclose(plain.biases[n], ckpt.biases[n], atol=1e-6, rtol=0), n
    bf16 = train(tiny_cfg(pair_file, tmp_path / "bf16", dtype="bf16", **kw))
    assert all(math.isfinite(h["loss"]) for h in bf16.history)
    assert bf16.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], abs=0.05)
