"""Numerical parity of our WorldMirror with the reference ``WorldMirror.forward`` (outside the test suite).

The reference code is not vendored: point ``--reference`` at a checkout of Tencent-Hunyuan/HunyuanWorld-Mirror at
commit cce2f2fc (its ``src/`` and ``training/utils/logger.py`` are imported; it needs ``einops`` and ``gsplat``
importable, e.g. ``pip install --target DIR einops`` and ``--extra-path DIR``). Both models get the same
(enriched) random weights through ``load_state_dict(strict=True)`` with the official key names, then run on the
same inputs without priors, with each prior alone and with all three, with pretrained biases and with aligned ones.

    .venv/bin/python benchmarks/parity_worldmirror.py --reference /path/to/HunyuanWorld-Mirror --size tiny
    .venv/bin/python benchmarks/parity_worldmirror.py --reference /path/to/HunyuanWorld-Mirror --size full

``tiny`` uses ``WorldMirrorConfig.tiny()`` (the reference is built at the same sizes by passing them to its
constructors) and a synthetic bias checkpoint of the 32 released names; ``full`` uses the released sizes and the
released ``WM_changed_bias.pth`` (one copy of the weights, shared by both models; ~7 GB of RAM). Writes
``benchmarks/results/parity_worldmirror_<size>.{json,md}`` (the table is also printed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _common import RESULTS, enrich_random_weights, environment  # noqa: E402

from ns_extreme.models.bias import apply_bias_tensors, read_bias_checkpoint  # noqa: E402
from ns_extreme.models.worldmirror import WorldMirror, WorldMirrorConfig  # noqa: E402

DENSE = ("depth", "pts3d", "normals", "gs_depth")
OUTPUTS = ("camera_params", "camera_poses", "camera_intrs") + tuple(x for d in DENSE for x in (d, f"{d}_conf"))
SPLAT_FIELDS = ("means", "sh", "opacities", "scales", "quats")
BIAS_BLOCKS = [f"visual_geometry_transformer.{k}_blocks.{i}" for k in ("frame", "global") for i in (4, 11, 17, 23)]


@contextlib.contextmanager
def linspace_on_cpu():
    """DINOv2's drop-path schedule calls ``.item()`` on a linspace: keep it off the meta device."""
    original = torch.linspace
    torch.linspace = functools.partial(original, device="cpu")
    try:
        yield
    finally:
        torch.linspace = original


def reference_class(reference: Path, extra_paths: list[str], cfg: WorldMirrorConfig):
    """The reference ``WorldMirror`` class, its sub-constructors bound to ``cfg``'s sizes."""
    for p in [str(reference)] + extra_paths:
        if p not in sys.path:
            sys.path.insert(0, p)
    from src.models.layers import vision_transformer as vt
    from src.models.models import rasterization, visual_transformer, worldmirror

    full = WorldMirrorConfig()
    if cfg != full:

        def small_vit(patch_size=14, num_register_tokens=4, **kwargs):
            return vt.DinoVisionTransformer(
                patch_size=patch_size,
                embed_dim=cfg.embed_dim,
                depth=cfg.dino_depth,
                num_heads=cfg.dino_num_heads,
                mlp_ratio=4,
                block_fn=functools.partial(vt.Block, attn_class=vt.MemEffAttention),
                num_register_tokens=num_register_tokens,
                **kwargs,
            )

        visual_transformer.vit_large = small_vit
        worldmirror.VisualGeometryTransformer = functools.partial(
            visual_transformer.VisualGeometryTransformer, depth=cfg.depth, num_heads=cfg.num_heads
        )
        worldmirror.CameraHead = functools.partial(
            worldmirror.CameraHead, trunk_depth=cfg.camera_trunk_depth, num_heads=cfg.camera_num_heads
        )
        worldmirror.DPTHead = functools.partial(
            worldmirror.DPTHead, features=cfg.dpt_features, out_channels=list(cfg.dpt_out_channels)
        )
        worldmirror.GaussianSplatRenderer = functools.partial(
            rasterization.GaussianSplatRenderer, feature_dim=cfg.gs_features
        )
    return functools.partial(
        worldmirror.WorldMirror, img_size=cfg.img_size, embed_dim=cfg.embed_dim, gs_dim=cfg.gs_features
    )


@torch.no_grad()
def enrich(model: nn.Module, seed: int) -> None:
    """``enrich_random_weights`` over WorldMirror's dense heads, plus positive fields of view so that the
    intrinsics are finite."""
    enrich_random_weights(model, seed, dense_heads=("depth_head", "pts_head", "norm_head", "gs_head", "gs_renderer"))
    model.cam_head.param_predictor.fc2.bias[7:] += 0.5


def random_rotations(n: int, g: torch.Generator) -> torch.Tensor:
    q = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    from ns_extreme.geometry.rotations_torch import quat_xyzw_to_matrix_torch

    return quat_xyzw_to_matrix_torch(q)


def make_inputs(S: int, H: int, W: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, S, 3, H, W, generator=g)
    c2w = torch.eye(4).repeat(1, S, 1, 1)
    c2w[0, :, :3, :3] = random_rotations(S, g)
    c2w[0, :, :3, 3] = torch.randn(S, 3, generator=g) * 2.0
    K = torch.zeros(1, S, 3, 3)
    f = 0.9 * W + torch.rand(S, generator=g) * 0.2 * W
    K[0, :, 0, 0], K[0, :, 1, 1] = f, f * 1.01
    K[0, :, 0, 2], K[0, :, 1, 2], K[0, :, 2, 2] = W / 2 + 1.5, H / 2 - 2.0, 1.0
    depth = 1.0 + 4.0 * torch.rand(1, S, H, W, generator=g)
    depth[:, :, : H // 4] = 0.0  # invalid band
    depth[0, 0, -1, -1] = float("nan")
    return {"images": images, "poses_c2w": c2w, "intrinsics": K, "depth": depth}


PRIOR_CASES = {
    "none": (),
    "pose": ("poses_c2w",),
    "depth": ("depth",),
    "intrinsics": ("intrinsics",),
    "all": ("poses_c2w", "depth", "intrinsics"),
}
REFERENCE_KEYS = {"poses_c2w": "camera_poses", "depth": "depthmap", "intrinsics": "camera_intrs"}
FLAG_INDEX = {"poses_c2w": 0, "depth": 1, "intrinsics": 2}  # cond_flags = [pose, depth, intrinsics]


def voxel_keys(means: torch.Tensor, voxel: float) -> np.ndarray:
    v = torch.floor(means.double() / voxel).long().numpy()
    return v[:, 0] * 10**12 + v[:, 1] * 10**6 + v[:, 2]


def compare(ours: dict, ref: dict, voxel: float) -> dict[str, float]:
    diffs = {}
    for name in OUTPUTS:
        a, b = ours[name].float(), ref[name].float()
        assert a.shape == b.shape, (name, a.shape, b.shape)
        diffs[name] = float((a - b).abs().max())
        diffs[name + " (rel)"] = diffs[name] / max(float(b.abs().max()), 1e-12)
    # Merged splats are matched by voxel (a merged centre stays inside its voxel): a centre that moved across a
    # voxel boundary by round-off changes which voxels exist, so positional comparison would be meaningless.
    keys_a, keys_b = (voxel_keys(o["splats"]["means"][0], voxel) for o in (ours, ref))
    common, ia, ib = np.intersect1d(keys_a, keys_b, return_indices=True)
    for field in SPLAT_FIELDS:
        a, b = ours["splats"][field][0][torch.from_numpy(ia)], ref["splats"][field][0][torch.from_numpy(ib)]
        diffs[f"splats.{field}"] = float((a - b).abs().max())
    diffs["splats unmatched (ours, ref)"] = (len(keys_a) - len(common), len(keys_b) - len(common))
    diffs["splat count (ours, ref)"] = (len(keys_a), len(keys_b))
    return diffs


def run(args: argparse.Namespace) -> dict:
    cfg = WorldMirrorConfig.tiny() if args.size == "tiny" else WorldMirrorConfig()
    Reference = reference_class(Path(args.reference), args.extra_path, cfg)
    torch.manual_seed(0)
    t = time.perf_counter()
    ours = WorldMirror(cfg).eval()
    enrich(ours, seed=1)
    state = ours.state_dict()
    with torch.device("meta"), linspace_on_cpu():
        ref = Reference().eval()
    # Strict load with the official names; full size shares one copy of the weights (assign=True).
    ref.load_state_dict(
        state if args.size == "full" else {k: v.clone() for k, v in state.items()}, strict=True, assign=True
    )
    ref.requires_grad_(False)
    for name in [
        f"{b}.{leaf}"
        for b in BIAS_BLOCKS
        for leaf in ("attn.qkv.bias", "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias")
    ]:
        owner, attr = ref.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        setattr(owner, attr, nn.Parameter(getattr(owner, attr).detach().clone(), requires_grad=False))
    print(f"built both models in {time.perf_counter() - t:.1f} s", flush=True)
    if args.size == "full":
        bias = read_bias_checkpoint(HERE.parent / "ns_extreme" / "data" / "WM_changed_bias.pth")
    else:
        g = torch.Generator().manual_seed(7)
        params = dict(ours.named_parameters())
        bias = {
            n: params[n].detach() + 0.1 * torch.randn(params[n].shape, generator=g)
            for n in sorted(state)
            if any(n.startswith(b + ".") for b in BIAS_BLOCKS)
            and n.endswith(("qkv.bias", "proj.bias", "fc1.bias", "fc2.bias"))
        }
    assert len(bias) == 32

    results = []
    sequences = [(args.frames, 0)] + ([(12, 1)] if args.size == "tiny" else [])
    for alignment in ("pretrained", "aligned"):
        if alignment == "aligned":
            apply_bias_tensors(ours, bias, "bias checkpoint")  # ours: our loader's path
            missing, unexpected = ref.load_state_dict(bias, strict=False)  # the reference's documented path
            assert not unexpected and len(missing) == 1544 - 32
        for S, seed in sequences:
            inputs = make_inputs(S, args.height, args.width, seed)
            for case, priors in PRIOR_CASES.items():
                with torch.no_grad():
                    t = time.perf_counter()
                    out = ours(inputs["images"], **{p: inputs[p].clone() for p in priors})
                    t_ours = time.perf_counter() - t
                    views = {"img": inputs["images"].clone()}
                    views.update({REFERENCE_KEYS[p]: inputs[p].clone() for p in priors})
                    flags = [0, 0, 0]
                    for p in priors:
                        flags[FLAG_INDEX[p]] = 1
                    t = time.perf_counter()
                    expected = ref(views, cond_flags=flags, is_inference=True)
                    t_ref = time.perf_counter() - t
                diffs = compare(out, expected, cfg.splat_voxel_size)
                row = {"alignment": alignment, "frames": S, "priors": case, "cond_flags": flags, "diffs": diffs}
                row["seconds (ours, ref)"] = (round(t_ours, 2), round(t_ref, 2))
                results.append(row)
                worst = max(v for k, v in diffs.items() if isinstance(v, float) and "(rel)" not in k)
                print(f"{alignment:10s} S={S:2d} {case:10s} flags={flags} max abs diff {worst:.3g}", flush=True)
    return {
        "size": args.size,
        "image": [args.height, args.width],
        "results": results,
        "environment": environment(torch.device("cpu")),
    }


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"### WorldMirror parity, {report['size']} ({report['image'][0]}x{report['image'][1]} px), "
        f"{env.get('cpu_model')} ({env['threads']} threads), torch {env['torch']}, {env['date']}",
        "",
        "Max abs difference per output (splats: over the voxels both sides have); last columns: the largest relative "
        "difference over all outputs, the splat counts and the voxels only one side has.",
        "",
        "| biases | S | priors | cond_flags | "
        + " | ".join(OUTPUTS)
        + " | splats | max rel | splats ours / ref | unmatched |",
        "|---|---:|---|---|" + "---:|" * len(OUTPUTS) + "---:|---:|---|---|",
    ]
    for r in report["results"]:
        d = r["diffs"]
        splat = max(d[f"splats.{f}"] for f in SPLAT_FIELDS)
        cells = " | ".join(f"{d[o]:.1e}" for o in OUTPUTS)
        rel = max(d[o + " (rel)"] for o in OUTPUTS)
        count, unmatched = d["splat count (ours, ref)"], d["splats unmatched (ours, ref)"]
        lines.append(
            f"| {r['alignment']} | {r['frames']} | {r['priors']} | {r['cond_flags']} | {cells} | {splat:.1e} | "
            f"{rel:.1e} | {count[0]} / {count[1]} | {unmatched[0]} / {unmatched[1]} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="checkout of Tencent-Hunyuan/HunyuanWorld-Mirror @ cce2f2fc")
    parser.add_argument("--extra-path", action="append", default=[], help="extra import path (e.g. where einops is)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--height", type=int, default=56)
    parser.add_argument("--width", type=int, default=84)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"parity_worldmirror_{args.size}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"parity_worldmirror_{args.size}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
