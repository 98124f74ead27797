"""torch.compile (inductor, frozen weights on CPU) against eager, in the same process, float32 and bf16 autocast,
plus the precision recipe's cost: the dense (depth) head in float32 vs under autocast.

    .venv/bin/python benchmarks/bench_compile.py [--config small] [--frames 2] [--device cpu]

Per precision (each in a fresh process): eager forward twice, compile (first call = compile + run), compiled
forward twice; VGGT camera + depth heads at 518x392 with random weights; differences to the eager float32 run.
Writes benchmarks/results/compile_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Memory,
    Stopwatch,
    environment,
    example_frames,
    md_table,
    model_config,
    run_worker,
    worker_main,
    write_results,
)

HW = (392, 518)
HEADS = ("camera", "depth")


def _diff(out: dict, ref: dict) -> dict[str, float]:
    from ns_extreme.models.rotation_readers import w2c_rotations_from_pose_encoding

    R, R0 = (w2c_rotations_from_pose_encoding(o["pose_enc"])[0].double() for o in (out, ref))
    rel, rel0 = (r[:, None] @ r[None].transpose(-1, -2) for r in (R, R0))
    cos = ((rel.transpose(-1, -2) @ rel0).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return {
        "pose_enc_max_abs_diff": float((out["pose_enc"] - ref["pose_enc"]).abs().max()),
        "relative_rotation_deg_max": float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).max()),
        "depth_rel_diff_median": float(((out["depth"] - ref["depth"]).abs() / ref["depth"].abs()).median()),
    }


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    from ns_extreme.models import load_model
    from ns_extreme.models.compiled import compile_for_inference
    from ns_extreme.runtime import resolve_precision

    device = torch.device(spec["device"])
    prec = resolve_precision(spec["precision"], device)
    model = load_model(
        "vggt",
        "random",
        "pretrained",
        device,
        prec.params,
        model_config(spec["config"]),
        storage_dtype=prec.weights,
        narrow_heads=prec.narrow_heads,
    ).eval()
    images = example_frames(spec["frames"], *HW).to(device)[None]
    mem = Memory(device)

    def run(dense_autocast: bool = False) -> tuple[float, dict]:
        with (
            Stopwatch(device) as sw,
            torch.no_grad(),
            torch.autocast(device.type, dtype=prec.autocast or torch.float32, enabled=prec.autocast is not None),
        ):
            out = model(images, heads=HEADS, dpt_frames_chunk=2, dense_heads_autocast=dense_autocast)
        return sw.wall, {k: v.float() for k, v in out.items() if torch.is_tensor(v)}

    result: dict[str, Any] = {"precision": prec.name, "frames": spec["frames"], "config": spec["config"]}
    repeats = spec.get("repeats", 2)
    eager = [run() for _ in range(repeats)]
    result["eager_s"] = statistics.median(t for t, _ in eager)
    result["eager_peak_mb"] = mem.peak_mb()
    ref = eager[-1][1]
    if spec.get("reference"):
        result.update(_diff(ref, torch.load(spec["reference"])))
    if prec.autocast is not None and spec.get("dense", True):
        dense = [run(dense_autocast=True) for _ in range(repeats)]
        result["eager_dense_autocast_s"] = statistics.median(t for t, _ in dense)
        result["dense_autocast_depth_rel_diff_median"] = float(
            ((dense[-1][1]["depth"] - ref["depth"]).abs() / ref["depth"].abs()).median()
        )
    if spec.get("compile"):
        compile_for_inference(model, device)
        mem.reset()
        first, out = run()
        result["compile_first_call_s"] = first
        compiled = [run() for _ in range(repeats)]
        result["compiled_s"] = statistics.median(t for t, _ in compiled)
        result["compiled_peak_mb"] = mem.peak_mb()
        result["compiled_vs_eager_max_abs_diff"] = float((compiled[-1][1]["pose_enc"] - ref["pose_enc"]).abs().max())
        saved = result["eager_s"] - result["compiled_s"]
        result["calls_to_pay_back_compile"] = (
            (first - result["compiled_s"]) / saved if saved > 0 else None
        )  # forward calls of one shape before compiling is a net win
    if spec.get("save_reference"):
        torch.save(ref, spec["save_reference"])
    return result


def markdown(data: dict, env: dict) -> str:
    header = ["config", "frames", "precision", "eager s", "compile 1st call s", "compiled s", "pays back after"]
    header += ["pose-enc diff", "rel. rot. diff °", "depth rel. diff", "depth head autocast s", "its depth diff"]
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append(
                [r["spec"]["config"], r["spec"]["frames"], r["spec"]["precision"], r["error"][:80]] + [None] * 8
            )
            continue
        rows.append(
            [r["config"], r["frames"], r["precision"], r["eager_s"], r.get("compile_first_call_s"), r.get("compiled_s"),
             r.get("calls_to_pay_back_compile"), r.get("pose_enc_max_abs_diff"), r.get("relative_rotation_deg_max"),
             r.get("depth_rel_diff_median"), r.get("eager_dense_autocast_s"),
             r.get("dense_autocast_depth_rel_diff_median")]
        )  # fmt: skip
    return "\n".join(
        [
            f"# torch.compile vs eager, float32 vs bf16 ({env['device']})",
            "",
            "Random weights, VGGT camera + depth heads, 518x392. Differences are to the eager float32 run of the same"
            " weights. 'pays back after': forward calls of one shape before compile time is recovered (blank: "
            "compiled is not faster).",
            "",
            md_table(header, rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=("tiny", "small", "full"))
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", default="fp32,bf16", help="precisions to compile too ('' = eager only)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (median)")
    parser.add_argument("--name", default="compile", help="results file name: results/<name>_<device>.*")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense-head autocast measurement")
    args = parser.parse_args()
    device = torch.device(args.device)
    base = {"device": args.device, "config": args.config, "frames": args.frames, "repeats": args.repeats}
    base["dense"] = not args.no_dense
    compiled = set(filter(None, args.compile.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        reference = str(Path(tmp) / "fp32_outputs.pt")
        fp32 = {**base, "precision": "fp32", "save_reference": reference, "compile": "fp32" in compiled}
        results = [run_worker(Path(__file__), fp32)]
        bf16 = {**base, "precision": "bf16", "reference": reference, "compile": "bf16" in compiled}
        results.append(run_worker(Path(__file__), bf16))
    env = environment(device)
    data = {"environment": env, "results": results}
    j, m = write_results(args.name, device, data, markdown(data, env))
    print(m.read_text())


if __name__ == "__main__":
    if not worker_main(_worker):
        main()
