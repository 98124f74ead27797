"""Refinement vs COLMAP from scratch on the dev_small scenes, per noise level of the input poses.

For each scene and noise level (rotation 0/2/5/10/20°, position 0–10 % of the extent, focal 0–10 %; seeded
``tests/posing_helpers.noisy_reference``) this runs:

* ours: ``refine_poses`` from the noisy cameras (what ``extreme-poses`` does after the model);
* COLMAP: the same SIFT features and exhaustive matching, then pycolmap's incremental mapper from scratch (no input
  poses), its registered cameras compared after a similarity fit, as for ours.

It reports views posed (ours: every view, refined or kept; COLMAP: registered), the median / max relative-rotation
error against the reference over all pairs of posed views and over the views COLMAP registered, the camera-centre
error after a similarity fit (fraction of the extent) and time per stage. A timing row poses 10 fountain views
upsampled to 2400x1600 (dev_small keeps 768-px copies) with the default 1600-px features.

    .venv/bin/python benchmarks/bench_refine.py            # all scenes and levels (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_refine.py --quick    # two levels, two scenes
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import pycolmap  # noqa: E402
from posing_helpers import Reference, load_reference, noisy_reference, pose_errors, rotation_angle_deg  # noqa: E402

from ns_extreme.posing.refine import RefineOptions, refine_poses  # noqa: E402
from ns_extreme.posing.refine.matching import extract_features, match_pairs, quiet_colmap  # noqa: E402
from ns_extreme.posing.refine.pairs import select_pairs  # noqa: E402

SCENES = ("strecha_fountain-P11", "strecha_Herz-Jesus-P8", "strecha_castle-P19_odd9", "hloc_sacre_coeur")
LEVELS = ((0.0, 0.0, 0.0), (2.0, 0.02, 0.02), (5.0, 0.05, 0.05), (10.0, 0.05, 0.10), (20.0, 0.10, 0.10))
"""(rotation degrees, position fraction of the extent, focal fraction)."""
SHARED = REPO.parent / "shared" / "data" / "dev_small"
RESULTS = HERE / "results"


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    amx = "amx_bf16" in open("/proc/cpuinfo").read()
    import os

    return (
        f"{cpu}, {os.cpu_count()} cores, {'AMX' if amx else 'no AMX'}, {platform.python_version()}, "
        f"pycolmap {pycolmap.__version__}"
    )


def relative_errors(w2c: np.ndarray, ref: Reference, views: list[int]) -> np.ndarray:
    R, G = w2c[:, :3, :3], ref.w2c[:, :3, :3]
    return np.array(
        [rotation_angle_deg(R[j] @ R[i].T, G[j] @ G[i].T) for a, i in enumerate(views) for j in views[a + 1 :]]
    )


def stats(w2c: np.ndarray, ref: Reference, views: list[int]) -> dict[str, float]:
    if len(views) < 2:
        return {"median_rel_deg": float("nan"), "max_rel_deg": float("nan"), "max_centre": float("nan")}
    rel = relative_errors(w2c, ref, views)
    centre = pose_errors(w2c[views], ref.subset(views)).max_pos_rel if len(views) >= 3 else float("nan")
    return {"median_rel_deg": float(np.median(rel)), "max_rel_deg": float(rel.max()), "max_centre": float(centre)}


def colmap_from_scratch(ref: Reference, K: np.ndarray) -> tuple[dict[int, np.ndarray], dict[str, float]]:
    """Registered view -> w2c of pycolmap's incremental mapper on our features (exhaustive matching)."""
    timings = {}
    with tempfile.TemporaryDirectory() as work, quiet_colmap():
        work = Path(work)
        t = time.perf_counter()
        features = extract_features(ref.paths, ref.sizes_wh, K, work, 1600, progress=False)
        timings["features_s"] = time.perf_counter() - t
        t = time.perf_counter()
        match_pairs(features, select_pairs(len(ref.paths), len(ref.paths)), progress=False)
        timings["matching_s"] = time.perf_counter() - t
        t = time.perf_counter()
        options = pycolmap.IncrementalPipelineOptions()
        options.min_model_size = 2
        options.random_seed = 0
        (work / "sparse").mkdir()
        models = pycolmap.incremental_mapping(features.database, features.image_dir, work / "sparse", options)
        timings["mapping_s"] = time.perf_counter() - t
        posed: dict[int, np.ndarray] = {}
        if models:
            best = max(models.values(), key=lambda r: r.num_reg_images())
            for v, name in enumerate(features.names):
                image = best.find_image_with_name(name)
                if image is not None and image.has_pose:
                    posed[v] = image.cam_from_world().matrix()
    return posed, timings


def run_level(scene: str, level: tuple[float, float, float], seed: int = 0) -> dict:
    ref = load_reference(SHARED / scene)
    deg, pos, focal = level
    noisy = noisy_reference(ref, seed, rotation_deg=(deg, deg), position=(pos, pos), focal=(focal, focal))
    t = time.perf_counter()
    ours = refine_poses(ref.paths, noisy.w2c, noisy.K, ref.sizes_wh, RefineOptions(), progress=False)
    ours_s = time.perf_counter() - t
    all_views = list(range(len(ref.paths)))
    refined = [i for i, v in enumerate(ours.views) if v.status == "refined"]
    posed, colmap_t = colmap_from_scratch(ref, noisy.K)
    registered = sorted(posed)
    colmap_w2c = np.stack([posed.get(i, ref.w2c[i]) for i in all_views])
    return {
        "scene": scene,
        "rotation_deg": deg,
        "position": pos,
        "focal": focal,
        "views": len(all_views),
        "input": stats(noisy.w2c, ref, all_views),
        "ours": {
            "status": ours.status,
            "refined": len(refined),
            "posed": len(all_views),
            "all": stats(ours.w2c_opencv, ref, all_views),
            "on_colmap_views": stats(ours.w2c_opencv, ref, registered),
            "time_s": ours_s,
            "timings": ours.timings,
            "focal_error_max": float(np.abs(ours.intrinsics[:, 0, 0] / ref.K[:, 0, 0] - 1).max()),
        },
        "colmap": {
            "registered": len(registered),
            "on_colmap_views": stats(colmap_w2c, ref, registered),
            "timings": colmap_t,
        },
    }


def timing_1600(tmp: Path) -> dict:
    """10 fountain views upsampled to 2400x1600, default options (1600-px features), inputs 5° off."""
    ref = load_reference(SHARED / SCENES[0]).subset(range(10))
    paths = []
    for p in ref.paths:
        big = tmp / p.name
        Image.open(p).resize((2400, 1600), Image.Resampling.BICUBIC).save(big, quality=95)
        paths.append(big)
    scale = np.diag([2400 / 768, 1600 / 512, 1.0])
    big_ref = Reference(ref.scene_dir, ref.names, paths, ref.w2c, scale @ ref.K, np.tile([2400, 1600], (10, 1)))
    noisy = noisy_reference(big_ref, 0, rotation_deg=(5.0, 5.0), position=(0.05, 0.05), focal=(0.05, 0.05))
    t = time.perf_counter()
    result = refine_poses(paths, noisy.w2c, noisy.K, big_ref.sizes_wh, RefineOptions(), progress=False)
    total = time.perf_counter() - t
    rel = relative_errors(result.w2c_opencv, big_ref, list(range(10)))
    return {
        "total_s": total,
        "timings": result.timings,
        "refined": result.num_refined,
        "median_rel_deg": float(np.median(rel)),
    }


def fmt(x: float, digits: int = 2) -> str:
    return "–" if x != x else f"{x:.{digits}f}"


def markdown(rows: list[dict], timing: dict, host: str) -> str:
    lines = [
        "# Refinement vs COLMAP from scratch (benchmarks/bench_refine.py)",
        "",
        f"Machine: {host}. Same SIFT features (1600-px cap; dev_small images are 768 px or smaller) for both.",
        "Errors: relative rotation over pairs of posed views (degrees, median / max) and camera centres after a",
        "similarity fit (max, fraction of the extent). 'on COLMAP's views' compares both "
        "on the views COLMAP registered.",
        "",
        "| scene | input error (rot° / pos / focal) | ours: refined / posed | ours: all views med / max ° | "
        "COLMAP: registered | on COLMAP's views, ours med / max ° | COLMAP med / max ° | ours centre | COLMAP centre | "
        "ours s (features / matching / BA) | COLMAP s (features / matching / mapping) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, c = r["ours"], r["colmap"]
        t = o["timings"]
        ct = c["timings"]
        lines.append(
            f"| {r['scene']} | {r['rotation_deg']:g} / {r['position']:.0%} / {r['focal']:.0%} | "
            f"{o['refined']} / {o['posed']} of {r['views']} | {fmt(o['all']['median_rel_deg'])} / "
            f"{fmt(o['all']['max_rel_deg'])} | "
            f"{c['registered']} of {r['views']} | {fmt(o['on_colmap_views']['median_rel_deg'])} / "
            f"{fmt(o['on_colmap_views']['max_rel_deg'])} | {fmt(c['on_colmap_views']['median_rel_deg'])} / "
            f"{fmt(c['on_colmap_views']['max_rel_deg'])} | {fmt(o['on_colmap_views']['max_centre'], 4)} | "
            f"{fmt(c['on_colmap_views']['max_centre'], 4)} | {o['time_s']:.1f} ({t.get('features_s', 0):.1f} / "
            f"{t.get('matching_s', 0):.1f} / {t.get('bundle_adjustment_s', 0):.1f}) | "
            f"{sum(ct.values()):.1f} ({ct['features_s']:.1f} / {ct['matching_s']:.1f} / {ct['mapping_s']:.1f}) |"
        )
    if timing:
        t = timing["timings"]
        lines += [
            "",
            f"Timing target (10 images at 1600 px, < 60 s): **{timing['total_s']:.1f} s** (features "
            f"{t.get('features_s', 0):.1f} s, "
            f"matching {t.get('matching_s', 0):.1f} s, BA {t.get('bundle_adjustment_s', 0):.1f} "
            f"s); {timing['refined']} of 10 "
            f"refined, median relative-rotation error {timing['median_rel_deg']:.3f}° (fountain "
            "upsampled to 2400x1600, inputs 5° off).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two scenes, two noise levels, no timing row")
    args = parser.parse_args()
    scenes = SCENES[:2] if args.quick else SCENES
    levels = LEVELS[1:3] if args.quick else LEVELS
    rows = []
    for scene in scenes:
        for level in levels:
            row = run_level(scene, level)
            o = row["ours"]
            print(
                f"{scene} {level}: ours {o['refined']}/{row['views']} refined, all med "
                f"{o['all']['median_rel_deg']:.3f}°, "
                f"COLMAP {row['colmap']['registered']} registered, med "
                f"{row['colmap']['on_colmap_views']['median_rel_deg']:.3f}° "
                f"(ours on those {o['on_colmap_views']['median_rel_deg']:.3f}°), {o['time_s']:.1f} s",
                flush=True,
            )
            rows.append(row)
    timing = {}
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            timing = timing_1600(Path(tmp))
        print(f"1600 px timing: {timing['total_s']:.1f} s {timing['timings']}", flush=True)
    host = machine()
    RESULTS.mkdir(exist_ok=True)
    name = "refine_cpu_quick" if args.quick else "refine_cpu"
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": host, "rows": rows, "timing_1600": timing}, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(rows, timing, host))
    print(f"wrote {RESULTS / name}.md")


if __name__ == "__main__":
    main()
