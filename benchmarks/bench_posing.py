"""Posing end to end (the work of ``extreme-poses``) and chunked-posing memory as a scene grows.

    python benchmarks/bench_posing.py [--device cpu|cuda] [--precisions auto] [--sizes 20,50,100]

Part A: the example scene (examples/sacre_coeur/images, 10 photos) posed by the full-size VGGT-1B architecture (random
weights with plausible camera outputs) as ``ns-process-data extreme-poses`` does it: load (only the camera and depth
heads posing uses), ``pose_images`` with ``VGGTBackbone``, write the nerfstudio dataset. ``auto`` = the precision the
CLI picks (``--dtype auto``). Part B: ``--max-frames-per-pass 8`` posing of 20 → 100 synthetic views (jittered copies of
the example photos) with a small config at 224 px, against unchunked posing of the smaller scenes: peak memory per scene
size. One fresh process per configuration. Results: benchmarks/results/posing_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    EXAMPLE_IMAGES,
    Memory,
    Stopwatch,
    default_cache_dir,
    environment,
    md_table,
    model_config,
    run_worker,
    weights_file,
    worker_main,
    write_image_folder,
    write_results,
)


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    from ns_extreme.io.dataset import write_dataset
    from ns_extreme.io.images import scan_images
    from ns_extreme.models import load_model
    from ns_extreme.models.testing import make_outputs_plausible
    from ns_extreme.posing import pose_images
    from ns_extreme.posing.backbone import VGGTBackbone
    from ns_extreme.posing.options import PosingOptions
    from ns_extreme.posing.refine import RefineOptions
    from ns_extreme.runtime import resolve_precision

    device = torch.device(spec["device"])
    mem = Memory(device)
    prec = resolve_precision(spec["precision"], device)
    with Stopwatch(device) as load:
        if spec["weights"] == "random":
            model = load_model(
                "vggt",
                weights="random",
                alignment="pretrained",
                device=device,
                dtype=prec.params,
                config=model_config(spec["config"]),
                storage_dtype=prec.weights,
                narrow_heads=prec.narrow_heads,
                heads=("camera", "depth"),
            )
        else:
            model = load_model(
                "vggt",
                weights=spec["weights"],
                alignment="pretrained",
                device=device,
                dtype=prec.params,
                config=model_config(spec["config"]),
                storage_dtype=prec.weights,
                narrow_heads=prec.narrow_heads,
                heads=("camera", "depth"),
            )
            make_outputs_plausible("vggt", model)  # random weights: keep the fields of view valid
    load_peak = mem.peak_mb()
    backbone = VGGTBackbone(model, dtype=prec.compute, target_size=spec["target_size"])
    paths = sorted(scan_images(Path(spec["images"])).images)[: spec.get("limit") or None]
    options = PosingOptions(
        max_frames_per_pass=spec.get("max_frames_per_pass", 0),
        chunk_overlap=spec.get("chunk_overlap", 4),
        refinement=RefineOptions(refine=False),  # model time and memory only; bench_refine.py times refinement
    )
    resident = mem.now_mb()
    mem.reset()
    with Stopwatch(device) as pose:
        recon = pose_images(paths, backbone, options, progress=False)
    pose_peak = mem.peak_mb()
    write_s = None
    if spec.get("write_dataset"):
        out = Path(tempfile.mkdtemp(prefix="ns_extreme_pose_")) / "dataset"
        with Stopwatch(device) as write:
            write_dataset(recon, out, overwrite=True, depth_format="png")
        write_s = write.wall
        import shutil

        shutil.rmtree(out.parent, ignore_errors=True)
    total_peak = mem.peak_mb()
    return {
        "precision": prec.name,
        "images": len(paths),
        "network_input_hw": list(recon.depth.shape[1:]),
        "max_frames_per_pass": options.max_frames_per_pass,
        "chunks": len(recon.chunk_residuals) + 1,
        "chunk_residual_median": [r["median"] for r in recon.chunk_residuals],
        "load_s": load.wall,
        "pose_s": pose.wall,
        "pose_cpu_s": pose.cpu,
        "inference_s": recon.timings.get("inference_s"),
        "points_s": recon.timings.get("points_s"),
        "write_s": write_s,
        "total_s": load.wall + pose.wall + (write_s or 0.0),
        "images_per_minute": len(paths) / (pose.wall / 60.0),
        "load_peak_mb": load_peak,
        "pose_peak_mb": pose_peak,
        "resident_before_pose_mb": resident,
        "process_peak_mb": max(load_peak, pose_peak, total_peak),
        "points": int(len(recon.points_xyz)),
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }


def _print(res: dict[str, Any]) -> None:
    if "error" in res:
        print("   " + res["error"].splitlines()[0], flush=True)
    else:
        print(
            f"   {res['images']} images: posing {res['pose_s']:.1f} s ({res['images_per_minute']:.1f} images/min), "
            f"peak {res['process_peak_mb']:.0f} MB (posing window "
            f"{res['pose_peak_mb']:.0f} MB), {res['chunks']} pass(es)",
            flush=True,
        )


def run(
    device: torch.device,
    precisions: list[str],
    sizes: list[int],
    unchunked_sizes: list[int],
    cache_dir: Path,
    scene: bool = True,
    max_frames_per_pass: int = 8,
    small_target: int = 224,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"device": str(device), "scene": [], "chunked": []}
    if scene:
        weights = weights_file(cache_dir, "full")
        for p in precisions:
            spec = dict(
                device=str(device),
                precision=p,
                config="full",
                weights=str(weights),
                images=str(EXAMPLE_IMAGES),
                target_size=518,
                write_dataset=True,
            )
            print(f"posing: example scene, full size, precision {p} ...", flush=True)
            res = run_worker(Path(__file__), spec)
            res.setdefault("precision", p)
            _print(res)
            data["scene"].append(res)
    if sizes:
        folder = Path(cache_dir) / f"synthetic_views_{max(sizes)}"
        if not (folder.is_dir() and len(list(folder.glob("*.jpg"))) >= max(sizes)):
            write_image_folder(folder, max(sizes))
        for n in sorted(set(sizes) | set(unchunked_sizes)):
            for chunked in (True, False):
                if (chunked and n not in sizes) or (not chunked and n not in unchunked_sizes):
                    continue
                spec = dict(
                    device=str(device),
                    precision="fp32",
                    config="small",
                    weights="random",
                    images=str(folder),
                    limit=n,
                    target_size=small_target,
                    max_frames_per_pass=max_frames_per_pass if chunked else 0,
                    chunk_overlap=4,
                    threads=threads,
                )
                print(
                    f"posing: {n} synthetic views, small config, {'chunked' if chunked else 'one pass'} ...", flush=True
                )
                res = run_worker(Path(__file__), spec)
                res.setdefault("images", n)
                res.setdefault("max_frames_per_pass", spec["max_frames_per_pass"])
                _print(res)
                data["chunked"].append(res)
        for label, flag in (("chunked", True), ("unchunked", False)):
            pts = [
                (r["images"], r["pose_peak_mb"])
                for r in data["chunked"]
                if "error" not in r and bool(r["max_frames_per_pass"]) == flag
            ]
            if len(pts) >= 2:
                (n0, m0), (n1, m1) = min(pts), max(pts)
                data[f"{label}_mb_per_image"] = (m1 - m0) / (n1 - n0)
                data[f"{label}_peak_range_mb"] = [min(m for _, m in pts), max(m for _, m in pts)]
    return data


def markdown(data: dict[str, Any], env: dict[str, Any]) -> str:
    parts = [
        f"# Posing ({env['device']}; {env.get('cpu_model') or ''}, {env['cpu_capability']}, {env['threads']} "
        f"threads, torch {env['torch']})\n"
    ]
    if data["scene"]:
        rows = [
            [
                r.get("precision"),
                r.get("images"),
                "x".join(map(str, r.get("network_input_hw", []))),
                r.get("load_s"),
                r.get("inference_s"),
                r.get("points_s"),
                r.get("write_s"),
                r.get("pose_s"),
                r.get("images_per_minute"),
                r.get("load_peak_mb"),
                r.get("pose_peak_mb"),
                r.get("process_peak_mb"),
            ]
            if "error" not in r
            else [r.get("precision"), "error: " + r["error"].splitlines()[0][:80]] + [None] * 10
            for r in data["scene"]
        ]
        parts.append(
            "## extreme-poses on the example scene (full-size VGGT-1B architecture, random weights)\n\n"
            + md_table(
                [
                    "precision",
                    "images",
                    "network input HxW",
                    "load s",
                    "inference s",
                    "points s",
                    "write s",
                    "posing s",
                    "images/min",
                    "load peak MB",
                    "posing peak MB",
                    "process peak MB",
                ],
                rows,
            )
        )
    if data["chunked"]:
        rows = [
            [
                r.get("images"),
                r.get("max_frames_per_pass") or "all",
                r.get("chunks"),
                r.get("inference_s"),
                r.get("pose_peak_mb"),
                max(r.get("chunk_residual_median") or [0.0]) if "error" not in r else None,
            ]
            if "error" not in r
            else [
                r.get("images"),
                r.get("max_frames_per_pass"),
                "error: " + r["error"].splitlines()[0][:80],
                None,
                None,
                None,
            ]
            for r in data["chunked"]
        ]
        extra = []
        for label in ("chunked", "unchunked"):
            if f"{label}_mb_per_image" in data:
                lo, hi = data[f"{label}_peak_range_mb"]
                extra.append(
                    f"{label}: {data[f'{label}_mb_per_image']:.2f} MB per extra image (peak {lo:.0f}–{hi:.0f} MB)"
                )
        parts.append(
            "## Chunked posing as the scene grows (small config, 224 px, "
            "`--max-frames-per-pass 8 --chunk-overlap 4`)\n\n"
            + md_table(
                [
                    "images",
                    "frames per pass",
                    "passes",
                    "inference s",
                    "posing peak MB",
                    "max join residual (median, rel.)",
                ],
                rows,
            )
            + ("\n\n" + "; ".join(extra) + "." if extra else "")
        )
    return "\n\n".join(parts) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precisions", default="auto", help="comma-separated: auto, fp32, bf16-weights, bf16, fp16")
    ap.add_argument("--sizes", default="20,40,60,80,100", help="scene sizes for the chunked sweep ('' to skip)")
    ap.add_argument("--unchunked-sizes", default="20,40", help="scene sizes also posed in one pass, for contrast")
    ap.add_argument("--no-scene", action="store_true", help="skip the full-size example scene")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of the chunked-sweep workers")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    data = run(
        device,
        args.precisions.split(","),
        ints(args.sizes),
        ints(args.unchunked_sizes),
        args.cache_dir,
        not args.no_scene,
        threads=args.threads,
    )
    data["environment"] = env
    j, m = write_results("posing", device, data, markdown(data, env))
    print(f"wrote {j} and {m}")
    return data


if __name__ == "__main__":
    if not worker_main(_worker):
        main()
