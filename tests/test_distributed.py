"""Data parallel under torchrun (CPU, gloo, the tiny VGGT): N ranks reproduce one process.

Multi-rank runs start the real commands the way users do, ``python -m torch.distributed.run --standalone
--nproc_per_node 2 -m ns_extreme.cli.align train ...`` (the killed-rank test starts its two ranks itself, with
torchrun's environment variables, because torchrun would stop the survivor before our collective timeout does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_align_train import castle_list, pair_file, tiny_weights  # noqa: F401 (fixtures)

from ns_extreme import distributed
from ns_extreme.align import train as train_mod
from ns_extreme.align.data import EpochBatchSampler, collate_pairs
from ns_extreme.align.evaluate import EvalConfig, evaluate
from ns_extreme.align.train import TrainConfig, find_checkpoints, read_train_checkpoint, train
from ns_extreme.cli import align as align_cli
from ns_extreme.runtime import resolve_device

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_KW = dict(
    model_size="tiny",
    image_size=56,
    device="cpu",
    cache_images=True,
    seed=3,
    batch_size=4,  # 6 pairs: batches of 4 and 2 (rank slices 2+2, then 1+1), 2 per epoch
    epochs=3,
    lr=1e-3,  # Adam turns gradient round-off into update differences in proportion to lr
    warmup_steps=1,
    swap_prob=0.5,
    color_jitter=0.1,
    log_every=1,
    checkpoint_every=1,
    keep_checkpoints=0,
)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(module: str, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", module, *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_args(pairs: Path, weights: Path, out: Path, **kw) -> list[str]:
    cfg = {**TRAIN_KW, **kw}
    args = ["train", "--pairs", str(pairs), "--output-dir", str(out), "--weights", str(weights), "--no-progress"]
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return args


def train_cfg(pairs: Path, weights: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(pairs=pairs, output_dir=out, weights=str(weights), progress=False, **{**TRAIN_KW, **kw})


def loss_curve(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def biases(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["bias_state_dict"]


def assert_same_biases(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    worst = 0.0
    for n in a:
        rel = float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12))
        worst = max(worst, rel)
        assert rel <= 1e-6, (n, rel)
    return worst


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pair_file, tiny_weights):  # noqa: F811
    """The reference: 6 steps (3 epochs) in one process, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("dist") / "one"
    return out, train(train_cfg(pair_file, tiny_weights, out))


def _resume_from(src: Path, dst: Path, step: int) -> None:
    """A copy of run ``src`` as it was after ``step`` (later checkpoints and the export removed)."""
    shutil.copytree(src, dst)
    for s, path in find_checkpoints(dst):
        if s > step:
            path.unlink()
    (dst / "biases.pth").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, one_process, pair_file, tiny_weights):  # noqa: F811
    """Steps 2-5 on 2 ranks (torchrun), resumed from the one-process checkpoint of step 1."""
    out = tmp_path_factory.mktemp("dist") / "two"
    _resume_from(one_process[0], out, 1)
    proc = torchrun("ns_extreme.cli.align", *train_args(pair_file, tiny_weights, out, max_steps=5), "--resume")
    return out, proc


# ------------------------------------------------------------------------------------------------ helpers


def test_helpers_do_nothing_in_one_process(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.is_initialized() and distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.is_main_process()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert distributed.gather_object({"a": 1}) == [{"a": 1}] and distributed.all_gather_object(3) == [3]
    assert distributed.broadcast_object("x") == "x"
    distributed.barrier()
    distributed.check_same_on_all_ranks("options", {"lr": 1})
    with distributed.process_group(torch.device("cpu")) as up:
        assert up is False
    assert distributed.shard(range(7), 1, 3) == [1, 4]


def test_sampler_slices_cover_the_global_batches() -> None:
    one = list(EpochBatchSampler(7, 4, epoch=1, seed=2))
    r0 = list(EpochBatchSampler(7, 4, epoch=1, seed=2, rank=0, world_size=2))
    r1 = list(EpochBatchSampler(7, 4, epoch=1, seed=2, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == one
    assert [len(b) for b in r0] == [2, 2] and [len(b) for b in r1] == [2, 1]
    four = [list(EpochBatchSampler(6, 4, epoch=0, seed=0, rank=r, world_size=4)) for r in range(4)]
    assert [len(b[1]) for b in four] == [1, 1, 0, 0]  # last batch of 2 over 4 ranks: two empty slices
    empty = collate_pairs([], pad_shapes={-1: (56, 56, 2)})
    assert len(empty["index"]) == 0 and empty["global_size"] == 2


def test_local_rank_picks_the_gpu_and_refuses_too_few(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1) and resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="local rank 2 needs GPU 2, but torch sees 2 CUDA device"):
        resolve_device("cuda")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == torch.device("cuda")


# ------------------------------------------------------------------------------------------------ training


def test_two_ranks_equal_one_process_and_resume_across_world_sizes(one_process, two_ranks) -> None:
    one_dir, one = one_process
    two_dir, proc = two_ranks
    assert one.completed and one.step == 6
    curve1, curve2 = loss_curve(one_dir), loss_curve(two_dir)
    assert sorted(curve2) == [1, 2, 3, 4, 5]  # step 1 from the one-process run, 2-5 on two ranks
    assert curve2[1] == curve1[1]
    for step in (2, 3, 4, 5):
        assert curve2[step] == pytest.approx(curve1[step], rel=1e-6), step
    assert len({round(v, 4) for v in curve1.values()}) == 6  # the curve moves: the comparison means something
    worst = 0.0
    for step in (2, 3, 4, 5):  # a one-process checkpoint continued on 2 ranks: the same biases after each step
        a = read_train_checkpoint(two_dir / "checkpoints" / f"step-{step:06d}.ckpt")
        b = read_train_checkpoint(one_dir / "checkpoints" / f"step-{step:06d}.ckpt")
        worst = max(worst, assert_same_biases(a["biases"], b["biases"]))
    print(f"2 ranks vs 1 process, steps 2-5: max relative bias difference {worst:.2e}")
    assert json.loads((two_dir / "config.json").read_text())["world_size"] == 2
    assert json.loads((one_dir / "config.json").read_text())["world_size"] == 1
    assert proc.stdout.count("interrupted") == 0 and proc.stdout.count("resuming at step 1") == 1  # rank 0 speaks
    assert "2 ranks, 2 pairs each per step" in proc.stdout


def test_resume_two_rank_checkpoint_in_one_process(one_process, two_ranks, pair_file, tiny_weights, tmp_path) -> None:  # noqa: F811
    one_dir, one = one_process
    _resume_from(two_ranks[0], tmp_path / "r", 5)
    resumed = train(train_cfg(pair_file, tiny_weights, tmp_path / "r", resume=True))
    assert [h["step"] for h in resumed.history] == [6] and resumed.completed
    assert resumed.history[0]["loss"] == pytest.approx(one.history[5]["loss"], rel=1e-6)
    assert_same_biases(biases(tmp_path / "r" / "biases.pth"), biases(one_dir / "biases.pth"))


def test_batch_that_does_not_divide_is_refused_before_work(
    pair_file,  # noqa: F811
    tiny_weights,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
) -> None:
    # torchrun's environment for rank 0 of 2, but no second rank: the check must come before the process group
    # (which would wait for the other rank) and before any model or data is loaded
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    args = train_args(pair_file, tiny_weights, tmp_path / "out", batch_size=3)
    t0 = time.perf_counter()
    assert align_cli.main(args) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert "--batch-size 3 (the global batch) does not divide over 2 ranks" in err
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_rank(rank: int, port: int, args: list[str]) -> subprocess.Popen:
    env = {
        **_env(),
        "WORLD_SIZE": "2",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    cmd = [sys.executable, "-m", "ns_extreme.cli.align", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_killed_rank_stops_the_other_within_the_timeout(pair_file, tiny_weights, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "killed"
    args = train_args(pair_file, tiny_weights, out, epochs=200, checkpoint_every=1000)
    args += ["--collective-timeout", "15"]
    port = _free_port()
    r0, r1 = _start_rank(0, port, args), _start_rank(1, port, args)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists():  # both ranks are past set-up
            assert r0.poll() is None and r1.poll() is None, (r0.communicate(), r1.communicate())
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r1.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = r0.communicate(timeout=60)
        stopped_after = time.monotonic() - killed_at
    finally:
        for p in (r0, r1):
            if p.poll() is None:
                p.kill()
            p.communicate()
    print(f"rank 0 stopped {stopped_after:.1f} s after rank 1 was killed (timeout 15 s)")
    assert r0.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[")]
    assert lines[-1].startswith("error: rank 0:") and "another rank has stopped" in lines[-1], err
    assert "Traceback" not in err
    assert stopped_after < 15 + 20
    assert not (out / "biases.pth").exists()


@pytest.mark.slow
def test_ranks_with_different_options_are_refused(pair_file, tiny_weights, tmp_path) -> None:  # noqa: F811
    port = _free_port()
    base = train_args(pair_file, tiny_weights, tmp_path / "o") + ["--collective-timeout", "30"]
    ranks = [_start_rank(0, port, base + ["--lr", "0.01"]), _start_rank(1, port, base + ["--lr", "0.02"])]
    errs = [p.communicate(timeout=120)[1] for p in ranks]
    for p, err in zip(ranks, errs):
        assert p.returncode == 2, err
        assert "the ranks were started with different options or pair lists" in err, err
    assert not (tmp_path / "o" / "config.json").exists()


def test_wandb_logger_is_optional(pair_file, tiny_weights, tmp_path, monkeypatch) -> None:  # noqa: F811
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="--logger wandb needs the wandb package"):
        train_cfg(pair_file, tiny_weights, tmp_path / "w", logger="wandb").validate()


@pytest.mark.slow
def test_wandb_logger_offline(pair_file, tiny_weights, tmp_path, monkeypatch) -> None:  # noqa: F811
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(train_cfg(pair_file, tiny_weights, tmp_path / "w", logger="wandb", max_steps=2))
    assert result.step == 2
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert not list((tmp_path / "w").glob("events.out.tfevents*"))


# ------------------------------------------------------------------------------------------------ evaluation


def test_two_rank_eval_equals_one_process(one_process, pair_file, tiny_weights, tmp_path) -> None:  # noqa: F811
    tuned = one_process[0] / "biases.pth"
    common = dict(pairs=pair_file, weights=str(tiny_weights), model_size="tiny", image_size=56, device="cpu")
    models = (f"tuned={tuned}",)
    ref = evaluate(EvalConfig(models=models, output_dir=tmp_path / "one", progress=False, plots=False, **common))
    args = ["eval", "--pairs", str(pair_file), "--weights", str(tiny_weights), "--model-size", "tiny"]
    args += ["--image-size", "56", "--device", "cpu", "--no-progress", "--no-plots", "--output-dir"]
    args += [str(tmp_path / "two"), "--models", *models]
    torchrun("ns_extreme.cli.align", *args)
    one = json.loads(ref.report_path.read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    for report in (one, two):
        for entry in report["models"].values():
            entry.pop("seconds")
    assert two == one
    assert one["num_pairs"] == 6 and len(one["pairs"]) == 6
    assert all(p["errors_deg"]["tuned"] is not None for p in two["pairs"])
    assert len({p["errors_deg"]["tuned"] for p in two["pairs"]}) == 6  # real, distinct numbers per pair


# ------------------------------------------------------------------------------------------------ posing


def _without(value, keys: set[str]):
    """``value`` with the entries named ``keys`` left out at every depth (timings, command lines)."""
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def test_two_rank_chunked_posing_equals_one_process(dev_small, tmp_path) -> None:
    images = tmp_path / "photos"
    shutil.copytree(dev_small / "strecha_Herz-Jesus-P8" / "images", images)
    args = ["--model-size", "tiny", "--weights", "random", "--no-refine", "--device", "cpu"]
    args += ["--max-frames-per-pass", "4", "--chunk-overlap", "2", "--depth-format", "npy"]
    a, b = tmp_path / "one", tmp_path / "two"
    # one process in a subprocess too: the same thread settings (numpy's BLAS threads change the join's round-off)
    one = [sys.executable, "-m", "ns_extreme.cli.process", "--data", str(images), "--output-dir", str(a), *args]
    proc = subprocess.run(one, env=_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    torchrun("ns_extreme.cli.process", "--data", str(images), "--output-dir", str(b), *args)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "extreme_poses.json":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ea, eb = (json.loads((d / "extreme_poses.json").read_text()) for d in (a, b))
    assert len(ea["chunk_joins"]) == 2  # 8 images in chunks of 4 sharing 2: three chunks, two joins
    volatile = {"timings_s", "argv", "peak_memory_mb"}
    assert _without(ea, volatile) == _without(eb, volatile)
