"""The prepared GPU check (run through ``benchmarks/gpu_check.sh``): VGGT-1B and π³ with random weights on one CUDA GPU.

    python benchmarks/gpu_check.py [--dry-run] [--budget-s 420] [--out DIR]

Sections, each recorded as ok / skipped (with the reason) / failed (with the error), never aborting the others:

1. ``forward``: forward time and peak memory at S = 2, 8, 32, 100, 200 frames (518x392) in the default precision
   (``--dtype auto``), posing heads (VGGT camera + depth, π³ points + conf + camera), weights loaded narrow;
2. ``accuracy``: bf16 autocast vs float32 at S = 8 on the same weights: pose-encoding difference, relative-rotation
   difference (degrees) over all frame pairs, median relative depth difference;
3. ``train_step``: one bias-tuning step (the paper's bias set, AdamW) with gradient checkpointing and bf16
   autocast, 2 frames;
4. ``posing``: ``ns-process-data extreme-poses`` end to end on examples/sacre_coeur (random weights; the dry run
   skips the refinement stage).

A wall-clock budget (default 7 min) skips what would not fit. ``--dry-run``: tiny models, S = 2 and 3, on CPU,
results in the output folder as ``gpu_check_dry-run.json`` (the default suite runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, Memory, Stopwatch, environment, example_frames, md_table  # noqa: E402

FULL = {"frames": (2, 8, 32, 100, 200), "hw": (392, 518), "accuracy_frames": 8, "size": "full"}
DRY = {"frames": (2, 3), "hw": (42, 56), "accuracy_frames": 3, "size": "tiny"}
MODELS = ("vggt", "pi3")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def section(results: dict, name: str, fn: Callable[[], Any], budget: Budget, need_s: float) -> None:
    if budget.left() < need_s:
        results[name] = {"status": "skipped", "reason": f"budget: {budget.left():.0f} s left, needs ~{need_s:.0f} s"}
        return
    t = time.perf_counter()
    try:
        results[name] = {"status": "ok", "result": fn()}
    except Exception as e:  # recorded, and the other sections still run
        results[name] = {
            "status": "failed",
            "error": f"{type(e).__name__}: {e}",
            "trace": traceback.format_exc()[-2000:],
        }
    results[name]["wall_s"] = time.perf_counter() - t
    print(f"[gpu_check] {name}: {results[name]['status']} ({results[name]['wall_s']:.1f} s)", flush=True)


def load(name: str, size: str, device: torch.device, precision: str, heads=None):
    from ns_extreme.models import get_spec, load_model
    from ns_extreme.runtime import resolve_precision

    spec = get_spec(name)
    prec = resolve_precision(precision, device)
    model = load_model(
        name,
        "random",
        "pretrained",
        device,
        prec.params,
        spec.config(size),
        storage_dtype=prec.weights,
        narrow_heads=prec.narrow_heads,
        heads=heads,
    )
    return model.eval(), prec


def forward(model, name: str, images: torch.Tensor, compute: torch.dtype) -> dict[str, torch.Tensor]:
    from ns_extreme.posing.backbone import _forward

    kwargs = {"dpt_frames_chunk": 2} if name == "vggt" else {}
    heads = ("camera", "depth") if name == "vggt" else ("points", "conf", "camera")
    with torch.no_grad():
        return _forward(model, images, compute, heads=heads, **kwargs)


def run_forward(cfg: dict, device: torch.device, budget: Budget) -> dict:
    from ns_extreme.models import get_spec

    rows = []
    for name in MODELS:
        model, prec = load(name, cfg["size"], device, "auto", heads=get_spec(name).posing_heads)
        mem = Memory(device)
        forward(model, name, example_frames(2, *cfg["hw"]).to(device), prec.compute)  # warm-up (kernels, caches)
        for S in cfg["frames"]:
            row: dict[str, Any] = {"model": name, "precision": prec.name, "frames": S, "hw": list(cfg["hw"])}
            if budget.left() < 30 and S > cfg["frames"][0]:
                rows.append({**row, "skipped": "budget"})
                continue
            images = example_frames(S, *cfg["hw"]).to(device)
            mem.reset()
            try:
                with Stopwatch(device) as sw:
                    out = forward(model, name, images, prec.compute)
                row.update(
                    forward_s=sw.wall,
                    peak_mb=mem.peak_mb(),
                    finite=all(bool(v.isfinite().all()) for v in out.values() if torch.is_tensor(v)),
                )
            except torch.cuda.OutOfMemoryError as e:
                row["oom"] = str(e).splitlines()[0]
            del images
            rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


def _relative_rotation_deg(R_a: torch.Tensor, R_b: torch.Tensor) -> float:
    """Largest angle between the relative rotations R_i R_j^T of two estimates, over all frame pairs."""
    rel_a = R_a[:, None] @ R_a[None].transpose(-1, -2)
    rel_b = R_b[:, None] @ R_b[None].transpose(-1, -2)
    cos = ((rel_a.transpose(-1, -2) @ rel_b).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return math.degrees(float(torch.arccos(cos.clamp(-1, 1)).max()))


def run_accuracy(cfg: dict, device: torch.device) -> dict:
    from ns_extreme.models import get_spec

    S = cfg["accuracy_frames"]
    images = example_frames(S, *cfg["hw"]).to(device)
    rows = []
    for name in MODELS:
        model, _ = load(name, cfg["size"], device, "fp32")
        fp32 = forward(model, name, images, torch.float32)
        bf16 = forward(model, name, images, torch.bfloat16)
        R32 = get_spec(name).w2c_rotations(fp32)[-1][0].double()
        R16 = get_spec(name).w2c_rotations(bf16)[-1][0].double()
        depth32, depth16 = (
            (fp32["depth"], bf16["depth"])
            if name == "vggt"
            else (fp32["local_points"][..., 2], bf16["local_points"][..., 2])
        )
        row = {
            "model": name,
            "frames": S,
            "relative_rotation_deg_max": _relative_rotation_deg(R32, R16),
            "depth_rel_diff_median": float(((depth16 - depth32).abs() / depth32.abs().clamp_min(1e-6)).median()),
            "outputs_float32": all(v.dtype == torch.float32 for v in bf16.values() if torch.is_tensor(v)),
        }
        if name == "vggt":
            row["pose_enc_max_abs_diff"] = float((bf16["pose_enc"] - fp32["pose_enc"]).abs().max())
        else:
            row["camera_pose_max_abs_diff"] = float((bf16["camera_poses"] - fp32["camera_poses"]).abs().max())
        rows.append(row)
        del model
    return {"rows": rows}


def run_train_step(cfg: dict, device: torch.device) -> dict:
    from ns_extreme.align.loss import rotation_loss
    from ns_extreme.models import get_spec

    rows = []
    for name in MODELS:
        spec = get_spec(name)
        model, _ = load(name, cfg["size"], device, "fp32")
        names = set(spec.paper_bias_set.select(model))
        model.requires_grad_(False)
        trainable = [p for n, p in model.named_parameters() if n in names]
        for p in trainable:
            p.requires_grad_(True)
        model.set_gradient_checkpointing(True)
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        images = example_frames(2, *cfg["hw"]).to(device)[None]
        R_gt = torch.eye(3, device=device).expand(1, 2, 3, 3)
        mem = Memory(device)
        mem.reset()
        with Stopwatch(device) as sw:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(images, heads=("camera",))
            loss = rotation_loss(spec.w2c_rotations(out), R_gt, spec.reference_frame, "last").loss
            loss.backward()
            optimizer.step()
        rows.append(
            {
                "model": name,
                "trained_tensors": len(trainable),
                "step_s": sw.wall,
                "peak_mb": mem.peak_mb(),
                "loss_finite": bool(torch.isfinite(loss)),
                "grads_nonzero": sum(bool(p.grad is not None and p.grad.abs().sum() > 0) for p in trainable),
            }
        )
        del model, optimizer
    return {"rows": rows}


def run_posing(cfg: dict, device: torch.device) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ns_extreme_gpu_check_")) / "dataset"
    script = (
        "import sys; sys.argv[0] = 'ns-process-data'; "
        "from ns_extreme.nerfstudio.process_data import entrypoint; entrypoint()"
    )
    images = REPO / "examples" / "sacre_coeur" / "images"
    if cfg["size"] == "tiny":  # the dry run: 3 of the 10 photos
        subset = out.parent / "images"
        subset.mkdir()
        for path in sorted(images.glob("*.jpg"))[:3]:
            shutil.copy(path, subset / path.name)
        images = subset
    cmd = [sys.executable, "-c", script, "extreme-poses", "--data", str(images)]
    cmd += ["--output-dir", str(out), "--weights", "random", "--alignment", "pretrained", "--device", device.type]
    if cfg["size"] == "tiny":
        cmd += ["--model-size", "tiny", "--no-refine"]  # the dry run: seconds, not the 30 s of refinement
    t = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    transforms = json.loads((out / "transforms.json").read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"wall_s": wall, "frames_posed": len(transforms["frames"]), "stdout_tail": proc.stdout.strip()[-800:]}


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [
        f"# GPU check{' (dry run: tiny models on CPU)' if data['dry_run'] else ''}",
        "",
        f"Machine: {env['machine_label']}",
        "",
    ]
    for name, sec in data["sections"].items():
        lines.append(f"## {name}: {sec['status']}" + (f" ({sec['wall_s']:.1f} s)" if "wall_s" in sec else ""))
        lines.append("")
        if sec["status"] != "ok":
            lines += [sec.get("reason") or sec.get("error", ""), ""]
            continue
        result = sec["result"]
        if "rows" in result:
            keys = list(dict.fromkeys(k for r in result["rows"] for k in r))
            lines += [md_table(keys, [[r.get(k) for k in keys] for r in result["rows"]]), ""]
        else:
            lines += ["```", json.dumps(result, indent=1), "```", ""]
    if data.get("setup"):
        lines += ["## setup (gpu_check.sh)", "", "```", data["setup"].strip(), "```"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on CPU, S = 2 and 3 (seconds)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of all sections")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results file")
    parser.add_argument("--setup-log", type=Path, help="gpu_check.sh's install log, copied into the results")
    args = parser.parse_args()
    if args.dry_run:
        device, cfg = torch.device("cpu"), DRY
    elif not torch.cuda.is_available():
        print("error: no CUDA device visible (use --dry-run to test this script on CPU)", file=sys.stderr)
        return 2
    else:
        device, cfg = torch.device("cuda"), FULL
    budget = Budget(args.budget_s)
    sections: dict[str, Any] = {}
    section(sections, "forward", lambda: run_forward(cfg, device, budget), budget, 60)
    section(sections, "accuracy", lambda: run_accuracy(cfg, device), budget, 40)
    section(sections, "train_step", lambda: run_train_step(cfg, device), budget, 40)
    section(sections, "posing", lambda: run_posing(cfg, device), budget, 60)
    env = environment(device)
    data = {"dry_run": args.dry_run, "config": cfg, "environment": env, "sections": sections}
    if args.setup_log and args.setup_log.is_file():
        data["setup"] = args.setup_log.read_text()
    label = "dry-run" if args.dry_run else "".join(c if c.isalnum() else "_" for c in env.get("gpu", "gpu")).strip("_")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_check_{label}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    md = path.with_suffix(".md")
    md.with_suffix(".md.tmp").write_text(markdown(data) + "\n")
    os.replace(md.with_suffix(".md.tmp"), md)
    print(f"[gpu_check] wrote {path} and {md}")
    return 0 if all(s["status"] != "failed" for s in sections.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
