"""One bias-tuning (alignment) step on a 2-image pair: time, peak memory, and what holds gradients / state.

    python benchmarks/bench_align_step.py [--device cpu|cuda] [--no-checkpointing-too]
    python benchmarks/bench_align_step.py --nproc 2 [--device cpu|cuda] [--config tiny|full] [--global-batch 8]

``--nproc N``: data-parallel scaling instead. The real ``Trainer`` (``ns_extreme.align.train``) runs
``train_step`` on a synthetic pair list under ``torchrun`` with 1 and with N ranks (gloo on CPU, NCCL on CUDA,
one GPU per rank), the same global batch; step time and samples/s of each, results in
benchmarks/results/align_step_dist_<device>.{json,md}. On CPU the machine's cores are shared out between the
ranks (1 rank: all of them), so the comparison is at equal hardware.

Mirrors the training step of ``ns_extreme.align.train`` (which has no separate step function): a float32
model with every parameter frozen except the paper's 32 bias tensors (73,728 values for VGGT-1B), gradient
checkpointing on, camera head only, the rotation geodesic loss of ``ns_extreme.align.loss``, gradient
clipping and one AdamW step. Runs in a fresh process per configuration. Results:
benchmarks/results/align_step_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    Memory,
    Stopwatch,
    default_cache_dir,
    environment,
    example_frames,
    md_table,
    model_config,
    run_worker,
    weights_file,
    worker_main,
    write_results,
)

HEIGHT, WIDTH = 392, 518


def _random_rotations(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=g)
    q = q / q.norm(dim=-1, keepdim=True)
    x, y, z, w = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - z * w),
            2 * (x * z + y * w),
            2 * (x * y + z * w),
            1 - 2 * (x * x + z * z),
            2 * (y * z - x * w),
            2 * (x * z - y * w),
            2 * (y * z + x * w),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(n, 3, 3)


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    from ns_extreme.align.loss import rotation_loss
    from ns_extreme.models import get_spec, load_model

    device = torch.device(spec["device"])
    mem = Memory(device)
    model_spec = get_spec("vggt")
    with Stopwatch(device) as load:
        model = load_model(
            "vggt",
            weights=spec["weights"],
            alignment="pretrained",
            device=device,
            dtype=torch.float32,
            config=model_config(spec["config"]),
        )
    load_peak = mem.peak_mb()

    names = model_spec.paper_bias_set.select(model)
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    trainable = [params[n] for n in names]
    model.eval()
    model.set_gradient_checkpointing(spec["checkpointing"])
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

    images = example_frames(2, HEIGHT, WIDTH).to(device)[None]  # one pair: [B=1, S=2, 3, H, W]
    R_gt = torch.stack([torch.eye(3), _random_rotations(1, 0)[0]])[None].to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.get("bf16", False))

    resident = mem.now_mb()
    mem.reset()
    with Stopwatch(device) as total:
        with Stopwatch(device) as fwd:
            with autocast:
                out = model(images, heads=("camera",))
            loss = rotation_loss(model_spec.w2c_rotations(out), R_gt, model_spec.reference_frame, "last")
        forward_peak = mem.peak_mb()
        with Stopwatch(device) as bwd:
            optimizer.zero_grad(set_to_none=True)
            loss.loss.backward()
        with Stopwatch(device) as opt:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, 1.0))
            optimizer.step()
    step_peak = mem.peak_mb()

    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    state_values = sum(
        t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0
    )
    return {
        "checkpointing": spec["checkpointing"],
        "bf16_autocast": spec.get("bf16", False),
        "frames": 2,
        "load_s": load.wall,
        "forward_s": fwd.wall,
        "backward_s": bwd.wall,
        "optimizer_s": opt.wall,
        "step_s": total.wall,
        "step_cpu_s": total.cpu,
        "loss": float(loss.loss.detach()),
        "grad_norm": grad_norm,
        "load_peak_mb": load_peak,
        "forward_peak_mb": forward_peak,
        "step_peak_mb": step_peak,
        "process_peak_mb": max(load_peak, step_peak),
        "resident_before_step_mb": resident,
        "step_extra_mb": step_peak - resident,
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "tensors_with_grad": len(with_grad),
        "values_with_grad": sum(params[n].numel() for n in with_grad),
        "grads_are_exactly_the_bias_set": sorted(with_grad) == sorted(names),
        "optimizer_state_values": state_values,
        "trainable_tensors": len(names),
        "trainable_values": sum(p.numel() for p in trainable),
    }


def run(device: torch.device, configs: list[dict[str, Any]], cache_dir: Path, config: str = "full") -> dict[str, Any]:
    weights = weights_file(cache_dir, config)
    runs = []
    for c in configs:
        spec = dict(device=str(device), config=config, weights=str(weights), **c)
        print(f"align step: {c} ...", flush=True)
        res = run_worker(Path(__file__), spec)
        res.update({k: v for k, v in c.items() if k not in res})
        if "error" in res:
            print("   " + res["error"].splitlines()[0], flush=True)
        else:
            print(
                f"   step {res['step_s']:.1f} s (fwd {res['forward_s']:.1f}, bwd {res['backward_s']:.1f}), peak "
                f"{res['step_peak_mb']:.0f} MB, "
                f"{res['values_with_grad']:,} values with grad, "
                f"{res['optimizer_state_values']:,} optimizer-state values",
                flush=True,
            )
        runs.append(res)
    return {"device": str(device), "config": config, "image_hw": [HEIGHT, WIDTH], "runs": runs}


def markdown(data: dict[str, Any], env: dict[str, Any]) -> str:
    rows = []
    for r in data["runs"]:
        if "error" in r:
            rows.append([r.get("checkpointing"), "error: " + r["error"].splitlines()[0][:80]] + [None] * 10)
            continue
        rows.append(
            [
                r["checkpointing"],
                r["bf16_autocast"],
                r["forward_s"],
                r["backward_s"],
                r["optimizer_s"],
                r["step_s"],
                r["weights_mb"],
                r["resident_before_step_mb"],
                r["forward_peak_mb"],
                r["step_peak_mb"],
                r["step_extra_mb"],
                f"{r['values_with_grad']:,} in {r['tensors_with_grad']} tensors",
                f"{r['optimizer_state_values']:,}",
            ]
        )
    header = [
        "checkpointing",
        "bf16 autocast",
        "forward s",
        "backward s",
        "optimizer s",
        "step s",
        "weights MB",
        "resident before step MB",
        "forward peak MB",
        "step peak MB",
        "step peak − resident MB",
        "values holding .grad",
        "optimizer state values",
    ]
    return (
        f"# One bias-tuning step ({data['config']} VGGT-1B, random weights, 2 images "
        f"{data['image_hw'][1]}x{data['image_hw'][0]}, {env['device']})\n\n"
        f"{env.get('cpu_model') or ''} ({env['cpu_capability']}, {env['threads']} threads), torch {env['torch']}\n\n"
        + md_table(header, rows)
        + "\n\nPeaks are resident memory of a fresh process after loading (CPU) or allocated tensors (CUDA); "
        "optimizer state = AdamW exp_avg + exp_avg_sq (2 × the tuned values).\n"
    )


# ------------------------------------------------------------------------------------------------ --nproc N


def _synthetic_pairs(folder: Path, n_pairs: int, size: tuple[int, int]) -> Path:
    """``n_pairs`` pairs over ``n_pairs + 1`` example photos with random GT rotations (timing only)."""
    from _common import write_image_folder

    from ns_extreme.align.pairs import PairList, PairRecord, PairView

    width, height = size
    paths = write_image_folder(folder / "images", n_pairs + 1, width, height)
    g = torch.Generator().manual_seed(0)
    views = []
    for p in paths:
        q = torch.randn(4, generator=g)
        q = (q / q.norm()).tolist()
        views.append(PairView(p.name, width, height, 0.8 * width, 0.8 * width, width / 2, height / 2, tuple(q)))
    records = [PairRecord("synthetic", views[i], views[i + 1], 0.0, "large") for i in range(n_pairs)]
    out = folder / "pairs.json"
    PairList(str(folder / "images"), records).save_json(out)
    return out


def _dist_worker(spec: dict[str, Any]) -> None:
    """One rank of a torchrun job: the Trainer's own train_step, timed; rank 0 prints the RESULT line."""
    import json
    import os
    import statistics

    from ns_extreme import distributed
    from ns_extreme.align.train import TrainConfig, Trainer
    from ns_extreme.runtime import resolve_device

    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = TrainConfig(
        pairs=Path(spec["pairs"]),
        output_dir=Path(spec["out"]) / f"nproc{nproc}_threads{spec.get('threads')}",
        weights="random",
        model_size=spec["config"],
        init_alignment="pretrained",
        image_size=spec["image_size"],
        batch_size=spec["global_batch"],
        epochs=1,
        max_steps=spec["warmup"] + spec["steps"],
        warmup_steps=0,
        cache_images=True,
        gradient_checkpointing=spec["config"] == "full",
        device=spec["device"],
        progress=False,
        checkpoint_every=10**6,
        log_every=10**6,
    )
    cfg.validate()
    device = resolve_device(cfg.device)
    with distributed.process_group(device):
        trainer = Trainer(cfg, device)
        trainer.setup()
        times = []
        for batch in trainer._loader(0, 0):
            distributed.barrier()
            t0 = time.perf_counter()
            trainer.train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            distributed.barrier()
            times.append(time.perf_counter() - t0)
            if len(times) == spec["warmup"] + spec["steps"]:
                break
        measured = times[spec["warmup"] :]
        if distributed.is_main_process():
            step = statistics.median(measured)
            result = {
                "nproc": nproc,
                "threads_per_rank": torch.get_num_threads(),
                "step_s_median": step,
                "step_s_all": measured,
                "samples_per_s": spec["global_batch"] / step,
                "global_batch": spec["global_batch"],
            }
            print("RESULT " + json.dumps(result), flush=True)


def run_dist(device: torch.device, nprocs: list[int], args: argparse.Namespace) -> dict[str, Any]:
    import json
    import subprocess
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench_align_dist_"))
    pairs = _synthetic_pairs(work, args.global_batch * (args.warmup + args.steps), (WIDTH, HEIGHT))
    spec = dict(
        device=str(device),
        config=args.config,
        pairs=str(pairs),
        out=str(work / "runs"),
        image_size=args.image_size,
        global_batch=args.global_batch,
        warmup=args.warmup,
        steps=args.steps,
    )
    runs = []
    cores = os.cpu_count() or 1
    # CPU: 1 rank on all cores, 1 rank on one rank's share, N ranks on their shares (equal hardware overall)
    layouts = [(1, cores), (1, max(1, cores // nprocs[-1])), (nprocs[-1], max(1, cores // nprocs[-1]))]
    if device.type == "cuda":
        layouts = [(n, None) for n in nprocs]
    for n, threads in dict.fromkeys(layouts):
        print(f"align step on {n} rank(s) x {threads or 'default'} threads, global batch {args.global_batch} ...")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        cmd += [str(Path(__file__).resolve()), "--dist-worker", json.dumps({**spec, "threads": threads})]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
            runs.append({"nproc": n, "error": f"exit {proc.returncode}: {tail}"})
            print("   " + runs[-1]["error"], flush=True)
            continue
        res = json.loads(lines[-1][len("RESULT ") :])
        print(f"   step {res['step_s_median']:.3f} s, {res['samples_per_s']:.2f} samples/s", flush=True)
        runs.append(res)
    singles = [r for r in runs if r.get("nproc") == 1 and "error" not in r]
    base = max(singles, key=lambda r: r["samples_per_s"]) if singles else None  # the best 1-rank layout
    for r in runs:
        if base is not None and "error" not in r:
            r["speedup_vs_1"] = r["samples_per_s"] / base["samples_per_s"]
    return {"device": str(device), "config": args.config, "image_size": args.image_size, "runs": runs}


def markdown_dist(data: dict[str, Any], env: dict[str, Any]) -> str:
    rows = [
        [r["nproc"], "error: " + r["error"].splitlines()[0][:80], None, None, None]
        if "error" in r
        else [r["nproc"], r["threads_per_rank"], r["step_s_median"], r["samples_per_s"], r.get("speedup_vs_1")]
        for r in data["runs"]
    ]
    where = env.get("gpu") or f"{env.get('cpu_model') or ''} ({env['cpu_capability']}, {env['cpu_count']} cores)"
    return (
        f"# Data-parallel bias tuning: {data['config']} VGGT, global batch {data['runs'][0].get('global_batch')}, "
        f"image size {data['image_size']} ({env['device']})\n\n"
        f"{where}, torch {env['torch']}, load average {env.get('load_average_1_5_15')}\n\n"
        + md_table(["ranks", "threads per rank", "step s (median)", "samples/s", "speed-up vs best 1 rank"], rows)
        + "\n\nThe Trainer's own train_step under torchrun (gloo on CPU, NCCL on CUDA), the same global batch split "
        "over the ranks; on CPU the cores are shared out between the ranks. A load average above the core count "
        "means other processes shared the cores: OpenMP threads of one process then wait on each other, separate "
        "ranks do not, which flatters the ranks.\n"
    )


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default="full", choices=["full", "small", "tiny"])
    ap.add_argument("--nproc", type=int, default=0, help="measure data-parallel training on 1 and N ranks instead")
    ap.add_argument("--global-batch", type=int, default=4, help="--nproc: pairs per step, all ranks together")
    ap.add_argument("--image-size", type=int, default=224, help="--nproc: training image size (multiple of 14)")
    ap.add_argument("--steps", type=int, default=5, help="--nproc: measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="--nproc: unmeasured first steps")
    ap.add_argument(
        "--no-checkpointing-too", action="store_true", help="also measure the step without gradient checkpointing"
    )
    ap.add_argument(
        "--bf16", action="store_true", help="bf16 autocast for the forward (as --dtype bf16 of ns-extreme-align train)"
    )
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.nproc:
        if args.config == "small":
            ap.error("--nproc runs ns-extreme-align's Trainer, whose model sizes are tiny and full")
        env = environment(device)
        data = run_dist(device, sorted({1, args.nproc}), args)
        data["environment"] = env
        j, m = write_results("align_step_dist", device, data, markdown_dist(data, env))
        print(f"wrote {j} and {m}")
        return data
    configs = [dict(checkpointing=True, bf16=args.bf16)]
    if args.no_checkpointing_too:
        configs.append(dict(checkpointing=False, bf16=args.bf16))
    env = environment(device)
    data = run(device, configs, args.cache_dir, args.config)
    data["environment"] = env
    j, m = write_results("align_step", device, data, markdown(data, env))
    print(f"wrote {j} and {m}")
    return data


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--dist-worker":
        import json

        _dist_worker(json.loads(sys.argv[2]))
    elif not worker_main(_worker):
        main()
