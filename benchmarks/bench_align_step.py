"""One bias-tuning (alignment) step on a 2-image pair: time, peak memory, and what holds gradients / state.

    python benchmarks/bench_align_step.py [--device cpu|cuda] [--no-checkpointing-too]

Mirrors the training step of ``ns_extreme.align.train`` (which has no separate step function): a float32
model with every parameter frozen except the paper's 32 bias tensors (73,728 values for VGGT-1B), gradient
checkpointing on, camera head only, the rotation geodesic loss of ``ns_extreme.align.loss``, gradient
clipping and one AdamW step. Runs in a fresh process per configuration. Results:
benchmarks/results/align_step_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
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


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default="full", choices=["full", "small", "tiny"])
    ap.add_argument(
        "--no-checkpointing-too", action="store_true", help="also measure the step without gradient checkpointing"
    )
    ap.add_argument(
        "--bf16", action="store_true", help="bf16 autocast for the forward (as --bf16 of ns-extreme-align train)"
    )
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = ap.parse_args(argv)
    device = torch.device(args.device)
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
    if not worker_main(_worker):
        main()
