"""Run every benchmark and summarise: forward (S = 2, 4, 8), posing, one bias-tuning step, VGGT vs π³.

    .venv/bin/python benchmarks/run.py [--device cpu|cuda] [--quick] [--frames 2,4,8] [--skip posing,align]

Writes benchmarks/results/{forward,posing,align_step}_<device>.{json,md} and summary_<device>.md.
``--quick``: S = 2 only, no full-size posing, short chunked sweep (a few minutes on a GPU, ~10 min on CPU).
On CUDA the same script uses flash / memory-efficient SDPA (chosen by PyTorch for bf16 inputs) and bf16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_align_step  # noqa: E402
import bench_forward  # noqa: E402
import bench_models  # noqa: E402
import bench_posing  # noqa: E402
import torch  # noqa: E402
from _common import RESULTS, default_cache_dir, environment  # noqa: E402


def _f(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def summary(device: torch.device, fwd, pose, align, env, minutes: float, models=None) -> str:
    lines = [
        f"# ns_extreme benchmark summary ({device.type})",
        "",
        f"{env.get('cpu_model') or ''} ({env['cpu_capability']}, {env['threads']} "
        f"threads, {env.get('mem_total_gb')} GB)"
        + (f", GPU {env.get('gpu')}" if env.get("gpu") else "")
        + f", torch {env['torch']}, {env['date']}"
        + (f"; whole run {minutes:.0f} min" if minutes == minutes else "")
        + f"; load average at start {env.get('load_average_1_5_15')}.",
        "",
    ]
    if fwd:
        opt = fwd["optimised_variant"]
        lines += [f"## Forward (full-size architecture, 518x392): optimised = `{opt}` vs plain fp32 baseline", ""]
        lines += [
            "| S | baseline s | optimised s | speed-up (wall) | speed-up (CPU s) | baseline peak MB | optimised peak "
            "MB | peak ratio | pose max abs | depth max rel | points err/scale |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        runs = [r for r in fwd["runs"] if "error" not in r]
        for S in sorted({r["frames"] for r in runs}):
            b = next((r for r in runs if r["frames"] == S and r["variant"] == "baseline"), None)
            o = next((r for r in runs if r["frames"] == S and r["variant"] == opt), None)
            if not (b and o):
                continue
            d = o.get("diff_vs_baseline", {})
            lines.append(
                f"| {S} | {b['forward_s']:.1f} | {o['forward_s']:.1f} | {b['forward_s'] / o['forward_s']:.2f}× | "
                f"{b['forward_cpu_s'] / o['forward_cpu_s']:.2f}× | {b['process_peak_mb']:,.0f} | "
                f"{o['process_peak_mb']:,.0f} | "
                f"{o['process_peak_mb'] / b['process_peak_mb']:.2f} | {_f(d.get('pose_enc_max_abs'), '{:.2e}')} | "
                f"{_f(d.get('depth_max_rel'), '{:.2e}')} | {_f(d.get('points_max_abs_over_scale'), '{:.2e}')} |"
            )
        exact = [r for r in runs if r["variant"] == "fp32"]
        for r in exact:
            d = r.get("diff_vs_baseline", {})
            base = next(b for b in runs if b["frames"] == r["frames"] and b["variant"] == "baseline")
            lines.append(
                f"\nBit-exact optimised fp32 path (S={r['frames']}): {r['forward_s']:.1f} s, speed-up "
                f"{r.get('speedup_vs_baseline', 0):.2f}× wall / "
                f"{base['forward_cpu_s'] / r['forward_cpu_s']:.2f}× CPU s, "
                f"peak {r['process_peak_mb']:,.0f} MB; pose/depth bit-exact with the baseline: "
                f"{d.get('pose_enc_bit_exact')}/{d.get('depth_bit_exact')}."
            )
        growth = fwd.get("mb_per_extra_frame", {})
        lines.append(
            "\nForward-peak growth per extra frame: "
            + ", ".join(f"{k} {v:.0f} MB" for k, v in growth.items() if v is not None)
            + "."
        )
        lines.append("Details: forward_%s.md" % device.type)
        lines.append("")
    if pose:
        lines += ["## Posing", ""]
        for r in pose.get("scene", []):
            if "error" in r:
                lines.append(f"- example scene ({r.get('precision')}): error {r['error'].splitlines()[0]}")
                continue
            lines.append(
                f"- example scene, {r['images']} images at "
                f"{r['network_input_hw'][1]}x{r['network_input_hw'][0]}, precision {r['precision']}: "
                f"posing {r['pose_s']:.0f} s ({r['images_per_minute']:.1f} images/min; inference "
                f"{r['inference_s']:.0f} s), model load "
                f"{r['load_s']:.0f} s, dataset write {_f(r.get('write_s'), '{:.1f}')} s; peak "
                f"{r['process_peak_mb']:,.0f} MB."
            )
        for label in ("chunked", "unchunked"):
            if f"{label}_mb_per_image" in pose:
                lo, hi = pose[f"{label}_peak_range_mb"]
                lines.append(
                    f"- {label} small-config sweep: {pose[label + '_mb_per_image']:.2f} MB per extra image "
                    f"(peak {lo:,.0f}–{hi:,.0f} MB)."
                )
        lines.append("Details: posing_%s.md\n" % device.type)
    if align:
        lines += ["## One bias-tuning step (2 images, full size, fp32)", ""]
        for r in align["runs"]:
            if "error" in r:
                lines.append(f"- checkpointing={r.get('checkpointing')}: error {r['error'].splitlines()[0]}")
                continue
            lines.append(
                f"- checkpointing={r['checkpointing']}: step {r['step_s']:.0f} s (forward {r['forward_s']:.0f}, "
                f"backward {r['backward_s']:.0f}, "
                f"optimizer {r['optimizer_s']:.3f}); peak {r['step_peak_mb']:,.0f} MB "
                f"(weights {r['weights_mb']:,.0f} MB, "
                f"{r['step_extra_mb']:,.0f} MB above the resident model); "
                f"{r['values_with_grad']:,} values in {r['tensors_with_grad']} tensors hold "
                "gradients (exactly the bias set: "
                f"{r['grads_are_exactly_the_bias_set']}), optimizer state {r['optimizer_state_values']:,} values."
            )
        lines.append("Details: align_step_%s.md\n" % device.type)
    if models:
        lines += ["## VGGT vs π³ (full size, fp32, the heads posing runs)", ""]
        lines += ["| model | S | forward s | CPU s | forward peak MB |", "|---|---|---|---|---|"]
        for r in models["results"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['frames']} | error | | |")
                continue
            lines.append(
                f"| {r['model']} | {r['frames']} | {r['forward_s']:.1f} | {r['forward_cpu_s']:.0f} "
                f"| {r['forward_peak_mb']:,.0f} |"
            )
        lines.append("\nDetails: models_%s.md\n" % device.type)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frames", default=None, help="forward frame counts (default 2,4,8; 2,4,8,16,32 on CUDA)")
    ap.add_argument("--skip", default="", help="comma-separated: forward, posing, align, models")
    ap.add_argument(
        "--align-no-checkpointing-too", action="store_true", help="also time the bias step without checkpointing"
    )
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument(
        "--summary-only", action="store_true", help="only rebuild summary_<device>.md from the results JSON files"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    if args.summary_only:
        import json

        def read(name):
            p = RESULTS / f"{name}_{device.type}.json"
            return json.loads(p.read_text()) if p.is_file() else None

        fwd, pose, align, models = read("forward"), read("posing"), read("align_step"), read("models")
        env = next(d["environment"] for d in (fwd, pose, align, models) if d)
        text = summary(device, fwd, pose, align, env, float("nan"), models)
        (RESULTS / f"summary_{device.type}.md").write_text(text)
        print(text)
        return
    cuda = device.type == "cuda"
    frames = args.frames or ("2" if args.quick else ("2,4,8,16,32" if cuda else "2,4,8"))
    env = environment(device)
    t0 = time.perf_counter()
    fwd = pose = align = models = None
    if "forward" not in skip:
        fwd = bench_forward.main(["--device", args.device, "--frames", frames, "--cache-dir", str(args.cache_dir)])
    if "posing" not in skip:
        pargs = ["--device", args.device, "--cache-dir", str(args.cache_dir)]
        if args.quick:
            pargs += ["--no-scene", "--sizes", "20,40", "--unchunked-sizes", "20"]
        pose = bench_posing.main(pargs)
    if "align" not in skip:
        aargs = ["--device", args.device, "--cache-dir", str(args.cache_dir)]
        if args.align_no_checkpointing_too:
            aargs.append("--no-checkpointing-too")
        align = bench_align_step.main(aargs)
    if "models" not in skip:
        models = bench_models.main(["--device", args.device, "--frames", "2" if args.quick else "2,8"])
    minutes = (time.perf_counter() - t0) / 60
    text = summary(device, fwd, pose, align, env, minutes, models)
    out = RESULTS / f"summary_{device.type}.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
