"""VGGT vs π³ vs WorldMirror: forward time and peak memory of each backbone as the posing pipeline runs it.

    python benchmarks/bench_models.py [--device cpu|cuda] [--frames 2,8] [--precision fp32] [--models ...]

Full-size architectures with random weights (``load_model(weights="random")``: timing and memory do not depend
on the values), the heads posing runs (``ModelSpec.posing_heads``: VGGT camera + depth; π³ points, confidence,
camera; WorldMirror camera + depth + normals), the example scene at 518×392, one fresh process per row. Models
that take network priors run twice: without priors and with all of them (intrinsics, poses, depth for every view;
synthetic values: the cost does not depend on them). Writes benchmarks/results/models_<device>.{json,md}
(``--output-name`` to write another file, e.g. when adding rows for one model).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import torch
from _common import Memory, Stopwatch, environment, example_frames, md_table, run_worker, worker_main, write_results

HEIGHT, WIDTH = 392, 518
MODELS = ("vggt", "pi3", "worldmirror")


def synthetic_priors(n: int, height: int, width: int) -> Any:
    """Every prior for ``n`` views of ``height`` × ``width``: a 60° field of view, cameras on a 1 m arc looking
    inwards, depth planes tilted from 2 to 4 m."""
    import numpy as np

    from ns_extreme.posing.priors import FramePriors

    f = width / (2 * np.tan(np.radians(30)))
    K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])
    poses = np.stack([np.eye(4)] * n)
    for i in range(n):
        a = np.radians(10.0 * i)
        poses[i, :3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
        poses[i, :3, 3] = [np.sin(a), 0.0, 1.0 - np.cos(a)]
    depth = np.broadcast_to(np.linspace(2, 4, width, dtype=np.float32), (n, height, width)).copy()
    return FramePriors(intrinsics=np.stack([K] * n), poses_c2w=poses, depth=depth)


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    from ns_extreme.models import get_spec, load_model
    from ns_extreme.models.registry import resolve
    from ns_extreme.runtime import resolve_precision

    device = torch.device(spec["device"])
    prec = resolve_precision(spec["precision"], device)
    model_spec = get_spec(spec["model"])
    adapter = resolve(model_spec.posing_adapter)
    mem = Memory(device)
    with Stopwatch(device) as load:
        model = load_model(
            spec["model"], weights="random", alignment="pretrained" if spec.get("tiny") else "aligned", device=device,
            dtype=prec.params, storage_dtype=prec.weights, narrow_heads=prec.narrow_heads,
            heads=model_spec.posing_heads,
            config=model_spec.config("tiny" if spec.get("tiny") else "full"),
        )  # fmt: skip
    load_peak = mem.peak_mb()
    backbone = adapter(model, dtype=prec.compute, name=spec["model"])
    images = (
        example_frames(spec["frames"], 98, 126) if spec.get("tiny") else example_frames(spec["frames"], HEIGHT, WIDTH)
    )
    resident = mem.now_mb()
    mem.reset()
    import ns_extreme.posing.focal as focal

    fit_s = [0.0]
    recover_focal = focal.recover_focal

    def timed_recover_focal(*args: Any, **kwargs: Any) -> Any:
        with Stopwatch(device) as fit:
            out = recover_focal(*args, **kwargs)
        fit_s[0] += fit.wall
        return out

    focal.recover_focal = timed_recover_focal  # Pi3Backbone looks it up per call
    kwargs = {}
    if spec.get("priors"):
        kwargs["priors"] = synthetic_priors(len(images), *images.shape[-2:])
    with Stopwatch(device) as forward:
        pred = backbone.predict(images, **kwargs)  # includes π³'s focal-length fit: the cost posing pays
    return {
        "model": spec["model"],
        "frames": spec["frames"],
        "priors": "all" if spec.get("priors") else "none",
        "precision": prec.name,
        "heads": list(model_spec.posing_heads) if model_spec.posing_heads else ["all"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_s": load.wall,
        "forward_s": forward.wall,
        "forward_cpu_s": forward.cpu,
        "focal_fit_s": fit_s[0],
        "load_peak_mb": load_peak,
        "resident_mb": resident,
        "forward_peak_mb": mem.peak_mb(),
        "finite": bool(all(torch.isfinite(torch.as_tensor(a)).all() for a in (pred.w2c_opencv, pred.depth))),
    }


def markdown(results: list[dict[str, Any]], env: dict[str, Any]) -> str:
    rows = [
        [r["model"], r["frames"], r.get("priors", "none"), r.get("precision"), r.get("parameters"), r.get("forward_s"),
         r.get("forward_cpu_s"), r.get("focal_fit_s"), r.get("resident_mb"), r.get("forward_peak_mb"), r.get("error")]
        for r in results
    ]  # fmt: skip
    return "\n".join([
        f"# Backbone forward ({env['device']})",
        "",
        f"{env.get('cpu_model') or ''} ({env['cpu_capability']}, {env['threads']} threads), torch "
        f"{env['torch']}, {env['date']}; "
        f"load average at start {env.get('load_average_1_5_15')}.",
        "",
        "Full-size architectures, random weights with the released alignment, 518×392, the heads posing runs "
        "(VGGT camera + depth; π³ all, plus its focal-length fit; WorldMirror camera + depth + normals, without and "
        "with all network priors), one fresh process per row.",
        "",
        md_table(["model", "S", "priors", "precision", "parameters", "forward s", "CPU s", "of which focal fit s",
                  "resident MB", "forward peak MB", "error"], rows),
    ])  # fmt: skip


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--frames", default="2,8")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16-weights, bf16, fp16 or auto")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tiny", action="store_true", help="tiny configurations at 126×98 (a smoke test of the script)")
    ap.add_argument("--output-name", default=None, help="results file stem (default: models, or models_tiny)")
    args = ap.parse_args(argv)
    from ns_extreme.models import get_spec

    device = torch.device(args.device)
    results = []
    for S in (int(s) for s in args.frames.split(",")):
        for name in args.models.split(","):
            for priors in (False, True) if get_spec(name).priors else (False,):
                print(f"models: {name} S={S}{' with priors' if priors else ''} ...", flush=True)
                spec = dict(
                    model=name, frames=S, device=str(device), precision=args.precision, tiny=args.tiny, priors=priors
                )
                res = run_worker(
                    Path(__file__), spec, min_available_mb=9000 if device.type == "cpu" and not args.tiny else 0
                )
                res.setdefault("model", name)
                res.setdefault("frames", S)
                res.setdefault("priors", "all" if priors else "none")
                print(f"   {res}", flush=True)
                results.append(res)
    env = environment(device)
    data = {"environment": env, "results": results}
    name = args.output_name or ("models_tiny" if args.tiny else "models")
    j, m = write_results(name, device, data, markdown(results, env))
    print(f"wrote {j} and {m}")
    return data


if __name__ == "__main__":
    if not worker_main(_worker):
        main()
