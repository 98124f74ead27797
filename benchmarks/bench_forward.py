"""Backbone forward: time, peak memory and output differences, optimised path vs a plain float32 baseline.

    python benchmarks/bench_forward.py [--device cpu|cuda] [--frames 2,4,8] [--variants auto]

Every (frames, variant) runs in a fresh process: load the full-size VGGT-1B architecture (random weights from
a cached safetensors file), run one forward on the example scene resized to 518x392, save the outputs; the
parent then compares each variant's pose encodings, depth and points with the baseline of the same run.
Results: benchmarks/results/forward_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
    results_path,
    run_worker,
    sync,
    weights_file,
    worker_main,
    write_results,
)

HEIGHT, WIDTH = 392, 518
POSING_HEADS = ["camera", "depth"]
ALL_HEADS = ["camera", "depth", "points"]

# name -> how it runs. "plain": the straightforward formulation and loader (benchmarks/_plain.py).
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": dict(
        plain=True,
        precision="fp32",
        heads=ALL_HEADS,
        dpt_chunk=None,
        note="plain fp32 eager, all heads, load_file loader",
    ),
    "fp32": dict(
        plain=False,
        precision="fp32",
        heads=POSING_HEADS,
        dpt_chunk=2,
        note="optimised code, fp32 weights and math (bit-exact)",
    ),
    "bf16-weights": dict(
        plain=False, precision="bf16-weights", heads=POSING_HEADS, dpt_chunk=2, note="bf16 linear weights, fp32 math"
    ),
    "bf16": dict(
        plain=False, precision="bf16", heads=POSING_HEADS, dpt_chunk=2, note="bf16 linear weights + bf16 autocast"
    ),
    "fp16": dict(
        plain=False, precision="fp16", heads=POSING_HEADS, dpt_chunk=2, note="fp16 linear weights + fp16 autocast"
    ),
    "bf16-pure": dict(
        plain=False, precision="bf16-pure", heads=POSING_HEADS, dpt_chunk=2, note="every parameter and activation bf16"
    ),
}


def optimised_variant(device: torch.device) -> str:
    """The fastest correct low-memory path for this machine."""
    from ns_extreme.runtime import cpu_has_fast_bf16

    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "bf16-weights"


# ------------------------------------------------------------------------------------------------ worker


def _point_head_from_file(path: Path, cfg, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The point head alone, for comparing points with the baseline after the measured (camera + depth) pass."""
    from ns_extreme.models.vggt import VGGT
    from ns_extreme.models.weights import WeightsReader

    with torch.device("meta"):
        head = VGGT(cfg).point_head
    with WeightsReader(path) as reader:
        state = {k: reader.read("point_head." + k, dtype).to(device) for k in head.state_dict()}
    head.load_state_dict(state, assign=True)
    return head.eval()


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    from ns_extreme.models import load_model
    from ns_extreme.runtime import resolve_precision

    device = torch.device(spec["device"])
    mem = Memory(device)
    variant = VARIANTS[spec["variant"]]
    cfg = model_config(spec["config"])
    path = Path(spec["weights"])
    with Stopwatch(device) as load:
        if variant["plain"]:
            import _plain

            _plain.apply()
            model = _plain.load_plain(path, cfg, device)
            autocast_dtype, input_dtype = None, torch.float32
        elif variant["precision"] == "bf16-pure":
            model = load_model(
                "vggt",
                weights=path,
                alignment="pretrained",
                device=device,
                dtype=torch.bfloat16,
                config=cfg,
                heads=variant["heads"],
            )
            autocast_dtype, input_dtype = None, torch.bfloat16
        else:
            prec = resolve_precision(variant["precision"], device)
            model = load_model(
                "vggt",
                weights=path,
                alignment="pretrained",
                device=device,
                dtype=prec.params,
                config=cfg,
                storage_dtype=prec.weights,
                narrow_heads=prec.narrow_heads,
                heads=variant["heads"],
            )
            autocast_dtype, input_dtype = prec.autocast, prec.params
    load_peak = mem.peak_mb()
    resident = mem.now_mb()
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    images = example_frames(spec["frames"], HEIGHT, WIDTH).to(device, input_dtype)[None]
    heads = tuple(variant["heads"])

    def forward():
        ctx = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype
            else torch.autocast(device.type, enabled=False)
        )
        with torch.no_grad(), ctx:
            return model(images, heads=heads, dpt_frames_chunk=variant["dpt_chunk"])

    # Stage times (hooks) and the aggregator's kept layers (to run the point head afterwards for the comparison).
    stages: dict[str, float] = {}
    captured: dict[str, Any] = {}
    starts: dict[str, float] = {}
    import time

    def pre(name):
        def hook(module, args):
            sync(device)
            starts[name] = time.perf_counter()

        return hook

    def post(name):
        def hook(module, args, output):
            sync(device)
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - starts[name]
            if name == "aggregator":
                captured["layers"] = output

        return hook

    for name in ("aggregator", "camera_head", "depth_head", "point_head"):
        module = getattr(model, name)
        if module is None:  # head not built (optimised variants build only what posing uses)
            continue
        module.register_forward_pre_hook(pre(name))
        module.register_forward_hook(post(name))

    for _ in range(spec.get("warmup", 0)):
        forward()
        captured.clear()
    windowed = mem.reset()
    times, cpu_times = [], []
    for _ in range(max(1, spec.get("repeats", 1))):
        stages.clear()
        captured.clear()
        with Stopwatch(device) as sw:
            out = forward()
        times.append(sw.wall)
        cpu_times.append(sw.cpu)
    forward_peak = mem.peak_mb()
    rss_peak = Memory.rss_peak_mb()

    saved = {
        "pose_enc": out["pose_enc"][0].float().cpu(),
        "depth": out["depth"][0, ..., 0].float().cpu(),
        "depth_conf": out["depth_conf"][0].float().cpu(),
    }
    if "world_points" in out:
        saved["world_points"] = out["world_points"][0].float().cpu()
    elif spec.get("points_for_diff") and "layers" in captured:
        # Not part of the timed posing forward: only so that points can be compared with the baseline.
        ctx = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype
            else torch.autocast(device.type, enabled=False)
        )
        head = (
            model.point_head if model.point_head is not None else _point_head_from_file(path, cfg, device, input_dtype)
        )
        with torch.no_grad(), ctx:
            pts, _ = head(captured["layers"], model.aggregator.patch_start_idx, (HEIGHT, WIDTH), variant["dpt_chunk"])
        saved["world_points"] = pts[0].float().cpu()
    torch.save(saved, spec["out"])
    times_sorted = sorted(times)
    return {
        "variant": spec["variant"],
        "frames": spec["frames"],
        "heads": list(heads),
        "precision": variant["precision"],
        "plain": variant["plain"],
        "dpt_chunk": variant["dpt_chunk"],
        "load_s": load.wall,
        "forward_s": times_sorted[len(times_sorted) // 2],
        "forward_all_s": times,
        "forward_cpu_s": cpu_times[-1],
        "stages_s": stages,
        "weights_mb": weight_mb,
        "resident_after_load_mb": resident,
        "load_peak_mb": load_peak,
        "forward_peak_mb": forward_peak,
        "process_peak_mb": max(load_peak, forward_peak) if windowed else forward_peak,
        "process_rss_peak_mb": rss_peak,
        "peak_window_reset": windowed,
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------ comparison


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Optional[float]]:
    """Differences of outputs ``a`` against baseline outputs ``b`` (float64)."""
    res: dict[str, Optional[float]] = {}
    pa, pb = a["pose_enc"].double(), b["pose_enc"].double()
    res["pose_enc_max_abs"] = float((pa - pb).abs().max())
    res["pose_T_max_abs"] = float((pa[:, :3] - pb[:, :3]).abs().max())
    res["pose_quat_max_abs"] = float((pa[:, 3:7] - pb[:, 3:7]).abs().max())
    res["pose_fov_max_abs"] = float((pa[:, 7:] - pb[:, 7:]).abs().max())
    res["pose_enc_bit_exact"] = bool(torch.equal(a["pose_enc"], b["pose_enc"]))
    da, db = a["depth"].double(), b["depth"].double()
    rel = (da - db).abs() / db.abs().clamp_min(1e-12)
    res["depth_max_rel"] = float(rel.max())
    res["depth_p99_rel"] = float(torch.quantile(rel.flatten()[:: max(1, rel.numel() // 1_000_000)], 0.99))
    res["depth_mean_rel"] = float(rel.mean())
    res["depth_bit_exact"] = bool(torch.equal(a["depth"], b["depth"]))
    ca, cb = a["depth_conf"].double(), b["depth_conf"].double()
    res["depth_conf_max_rel"] = float(((ca - cb).abs() / cb.abs()).max())
    if "world_points" in a and "world_points" in b:
        wa, wb = a["world_points"].double(), b["world_points"].double()
        err = (wa - wb).norm(dim=-1)
        norm = wb.norm(dim=-1)
        res["points_max_abs_over_scale"] = float(err.max() / norm.max())
        res["points_median_rel"] = float((err / norm.clamp_min(1e-12)).median())
        res["points_bit_exact"] = bool(torch.equal(a["world_points"], b["world_points"]))
    else:
        res["points_max_abs_over_scale"] = res["points_median_rel"] = None
    return res


def slope_mb_per_frame(points: list[tuple[int, float]]) -> Optional[float]:
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else None


# ------------------------------------------------------------------------------------------------ main


def run(
    device: torch.device,
    frames: list[int],
    variants: list[str],
    exact_frames: list[int],
    cache_dir: Path,
    config: str = "full",
    repeats: Optional[int] = None,
    threads: Optional[int] = None,
    timeout: Optional[float] = None,
) -> dict[str, Any]:
    weights = weights_file(cache_dir, config)
    cuda = device.type == "cuda"
    repeats = repeats or (3 if cuda else 1)
    tmp = Path(tempfile.mkdtemp(prefix="ns_extreme_fwd_"))
    runs: list[dict[str, Any]] = []
    for S in frames:
        names = ["baseline"] + [v for v in variants if v != "baseline"]
        if S in exact_frames and "fp32" not in names:
            names.append("fp32")
        outs: dict[str, Path] = {}
        for name in names:
            out = tmp / f"{name}_{S}.pt"
            spec = dict(
                variant=name,
                plain=VARIANTS[name]["plain"],
                frames=S,
                device=str(device),
                config=config,
                weights=str(weights),
                out=str(out),
                repeats=repeats,
                warmup=1 if cuda else 0,
                points_for_diff=True,
                threads=threads,
            )
            print(f"forward: S={S} {name} ...", flush=True)
            res = run_worker(
                Path(__file__), spec, timeout=timeout, min_available_mb=9000 if device.type == "cpu" else 0
            )
            res.setdefault("variant", name)
            res.setdefault("frames", S)
            res["note"] = VARIANTS[name]["note"]
            res["load_average_after"] = list(__import__("os").getloadavg())
            if "error" not in res:
                outs[name] = out
                print(
                    f"   forward {res['forward_s']:.1f} s (cpu {res['forward_cpu_s']:.1f} s), peak "
                    f"{res['process_peak_mb']:.0f} MB "
                    f"(forward window {res['forward_peak_mb']:.0f} MB), load {res['load_s']:.1f} s",
                    flush=True,
                )
            else:
                print("   " + res["error"].splitlines()[0], flush=True)
            runs.append(res)
        if "baseline" in outs:
            base = torch.load(outs["baseline"])
            for res in runs:
                if res["frames"] == S and res["variant"] in outs and res["variant"] != "baseline":
                    res["diff_vs_baseline"] = compare(torch.load(outs[res["variant"]]), base)
        for p in outs.values():
            p.unlink(missing_ok=True)

    return finalize({"device": str(device), "config": config, "image_hw": [HEIGHT, WIDTH], "runs": runs})


def finalize(data: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the baseline of the same frame count, memory growth per extra frame."""
    runs = data["runs"]
    base_by_s = {r["frames"]: r for r in runs if r["variant"] == "baseline" and "error" not in r}
    for r in runs:
        b = base_by_s.get(r["frames"])
        if b and "error" not in r:
            r["speedup_vs_baseline"] = b["forward_s"] / r["forward_s"]
            r["speedup_cpu_s_vs_baseline"] = b["forward_cpu_s"] / r["forward_cpu_s"]
            r["peak_ratio_vs_baseline"] = r["process_peak_mb"] / b["process_peak_mb"]
            r["forward_peak_ratio_vs_baseline"] = r["forward_peak_mb"] / b["forward_peak_mb"]
    growth = {}
    for name in sorted({r["variant"] for r in runs}):
        pts = [(r["frames"], r["forward_peak_mb"]) for r in runs if r["variant"] == name and "error" not in r]
        growth[name] = slope_mb_per_frame(pts)
    data["mb_per_extra_frame"] = growth
    return data


def markdown(data: dict[str, Any], env: dict[str, Any]) -> str:
    rows = []
    for r in data["runs"]:
        if "error" in r:
            rows.append([r["frames"], r["variant"], "error: " + r["error"].splitlines()[0][:80]] + [None] * 15)
            continue
        d = r.get("diff_vs_baseline", {})
        st = r.get("stages_s", {})
        rows.append(
            [
                r["frames"],
                r["variant"],
                "+".join(h[0] for h in r["heads"]),
                r["forward_s"],
                r["forward_cpu_s"],
                st.get("aggregator"),
                st.get("depth_head"),
                st.get("point_head"),
                r.get("speedup_vs_baseline"),
                r.get("speedup_cpu_s_vs_baseline"),
                r["weights_mb"],
                r["load_peak_mb"],
                r["forward_peak_mb"],
                r["process_peak_mb"],
                r.get("peak_ratio_vs_baseline"),
                d.get("pose_enc_max_abs"),
                d.get("depth_max_rel"),
                d.get("points_max_abs_over_scale"),
            ]
        )
    header = [
        "S",
        "variant",
        "heads",
        "forward s",
        "cpu s",
        "aggregator s",
        "depth head s",
        "point head s",
        "speed-up",
        "speed-up (cpu s)",
        "weights MB",
        "load peak MB",
        "forward peak MB",
        "process peak MB",
        "peak ratio",
        "pose max abs",
        "depth max rel",
        "points err/scale",
    ]
    growth = ", ".join(f"{k}: {v:.0f} MB/frame" for k, v in data["mb_per_extra_frame"].items() if v is not None)
    notes = "\n".join(
        f"- `{k}`: {v['note']}" for k, v in VARIANTS.items() if any(r["variant"] == k for r in data["runs"])
    )
    return (
        f"# Backbone forward ({data['config']} VGGT-1B architecture, random weights, "
        f"{data['image_hw'][1]}x{data['image_hw'][0]}, {env['device']})\n\n"
        f"{env.get('cpu_model') or ''} ({env['cpu_capability']}, {env['threads']} threads), torch "
        f"{env['torch']}, load average at start "
        f"{env.get('load_average_1_5_15')}\n\n"
        + md_table(header, rows)
        + f"\n\nForward-window peak growth: {growth}.\n\nheads: c = camera, d = depth, p = "
        "points. Speed-up and peak ratio are "
        "against the baseline of the same S in the same run; output differences are against the baseline's outputs "
        "(points of optimised variants come from an extra, untimed point-head pass).\n\n" + notes + "\n"
    )


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--frames", default="2,4,8", help="comma-separated frame counts (add 16 where it fits)")
    ap.add_argument(
        "--variants",
        default="auto",
        help="comma-separated: auto (the machine's optimised path) or names: " + ", ".join(VARIANTS),
    )
    ap.add_argument(
        "--exact-frames", default="2", help="frame counts at which the bit-exact fp32 optimised path also runs"
    )
    ap.add_argument("--config", default="full", choices=["full", "small", "tiny"])
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed forwards per configuration (default: 1 on CPU, 3 on CUDA)"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument(
        "--append", action="store_true", help="merge into the existing results file (replacing the same frame counts)"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    variants = [optimised_variant(device) if v == "auto" else v for v in args.variants.split(",")]
    env = environment(device)
    data = run(
        device,
        [int(s) for s in args.frames.split(",")],
        variants,
        [int(s) for s in args.exact_frames.split(",") if s],
        args.cache_dir,
        args.config,
        args.repeats,
        args.threads,
    )
    data["environment"] = env
    data["optimised_variant"] = optimised_variant(device)
    previous = results_path("forward", device, "json")
    if args.append and previous.is_file():
        old = json.loads(previous.read_text())
        new_frames = {r["frames"] for r in data["runs"]}
        data["runs"] = sorted(
            [r for r in old["runs"] if r["frames"] not in new_frames] + data["runs"],
            key=lambda r: (r["frames"], r["variant"] != "baseline"),
        )
        data["environment_earlier_runs"] = old.get("environment")
        finalize(data)
    j, m = write_results("forward", device, data, markdown(data, env))
    print(f"wrote {j} and {m}")
    return data


if __name__ == "__main__":
    if not worker_main(_worker):
        main()
