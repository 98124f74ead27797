"""WorldMirror: official key layout, released bias checkpoint, forward contract, priors and the architecture traps."""

from __future__ import annotations

import dataclasses
from importlib import resources

import pytest
import torch
from conftest import read_key_list
from torch import nn

from ns_extreme.models.bias import BiasSet, apply_bias_tensors, read_bias_checkpoint
from ns_extreme.models.testing import perturb_trivial_parameters
from ns_extreme.models.worldmirror import WORLDMIRROR_HEADS, WorldMirror, WorldMirrorConfig, build_worldmirror

WM_PARAMETERS = 1_263_337_002


def test_state_dict_equals_official_worldmirror_keys(state_dict_keys):
    official = read_key_list(state_dict_keys / "worldmirror.txt")
    assert len(official) == 1544
    with torch.device("meta"):
        model = build_worldmirror()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(official)  # same names, same order
    assert ours == official  # same shapes
    assert sum(v.numel() for v in model.state_dict().values()) == WM_PARAMETERS


def test_tiny_config_has_exactly_the_official_key_names(state_dict_keys):
    official = read_key_list(state_dict_keys / "worldmirror.txt")
    model = WorldMirror(WorldMirrorConfig.tiny())
    assert list(model.state_dict()) == list(official)
    assert sum(p.numel() for p in model.parameters()) * 4 < 8e6  # a few MB


def _materialise(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Give the named parameters of a meta-built model real storage, each filled with its own index."""
    values = {}
    for i, name in enumerate(names):
        owner, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        value = torch.full(getattr(owner, attr).shape, float(i + 1))
        setattr(owner, attr, nn.Parameter(value.clone()))
        values[name] = value
    return values


def test_released_bias_checkpoint_applies_exactly(bias_ckpts):
    packaged = resources.files("ns_extreme") / "data" / "WM_changed_bias.pth"
    assert packaged.read_bytes() == (bias_ckpts / "WM_changed_bias.pth").read_bytes()
    released = read_bias_checkpoint(bias_ckpts / "WM_changed_bias.pth")
    with torch.device("meta"):
        model = build_worldmirror()
    blocks = [f"visual_geometry_transformer.{kind}_blocks.{i}" for kind in ("frame", "global") for i in (4, 11, 17, 23)]
    assert sorted(released) == sorted(BiasSet.from_blocks("paper", blocks).select(model))
    # The tuned biases and untouched neighbours (norm biases of the same blocks, biases of block 5) get real storage.
    neighbours = [f"{b}.norm1.bias" for b in blocks] + ["visual_geometry_transformer.frame_blocks.5.attn.qkv.bias"]
    before = _materialise(model, sorted(released) + neighbours)
    report = apply_bias_tensors(model, released, "WM_changed_bias.pth")
    assert (report.tensors, report.parameters) == (32, 73_728)
    params = dict(model.named_parameters())
    for name in released:
        assert torch.equal(params[name], released[name]), name
    for name in neighbours:
        assert torch.equal(params[name], before[name]), name


@pytest.fixture(scope="module")
def tiny(one_thread) -> WorldMirror:
    torch.manual_seed(0)
    model = WorldMirror(WorldMirrorConfig.tiny()).eval()
    perturb_trivial_parameters(model)  # default init would hide wiring mistakes
    with torch.no_grad():
        model.cam_head.param_predictor.fc2.bias[7:] += 0.5  # positive fields of view: finite focal lengths
    return model


def test_tiny_forward_shapes(tiny):
    x = torch.rand(3, 3, 56, 70)
    with torch.no_grad():
        out = tiny(x)
    assert out["camera_params"].shape == (1, 3, 9)
    assert len(out["camera_params_list"]) == 4
    assert out["camera_poses"].shape == (1, 3, 4, 4) and out["camera_intrs"].shape == (1, 3, 3, 3)
    for name, channels in (("depth", 1), ("pts3d", 3), ("normals", 3), ("gs_depth", 1)):
        assert out[name].shape == (1, 3, 56, 70, channels), name
        assert out[f"{name}_conf"].shape == (1, 3, 56, 70)
        assert (out[f"{name}_conf"] > 1).all()
    assert out["gs_params"].shape == (1, 3, 56, 70, 12)
    assert (out["depth"] > 0).all() and (out["gs_depth"] > 0).all()
    torch.testing.assert_close(out["normals"].norm(dim=-1), torch.ones(1, 3, 56, 70))
    splats = out["splats"]
    n = splats["means"][0].shape[0]
    assert 0 < n <= 3 * 56 * 70
    assert splats["sh"][0].shape == (n, 1, 3) and splats["quats"][0].shape == (n, 4)
    assert all(torch.isfinite(v).all() for k, v in out.items() if torch.is_tensor(v))
    # camera_poses is the inverse of the world-to-camera matrix encoded in camera_params.
    w2c = torch.linalg.inv(out["camera_poses"])
    from ns_extreme.geometry.pose_encoding import w2c_intrinsics_from_pose_encoding

    expected_w2c, expected_K = w2c_intrinsics_from_pose_encoding(out["camera_params"], (56, 70))
    torch.testing.assert_close(w2c[..., :3, :], expected_w2c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["camera_intrs"], expected_K)
    assert set(WORLDMIRROR_HEADS) == {"camera", "depth", "points", "normals", "gs"}


def _c2w(S: int, seed: int = 0) -> torch.Tensor:
    from ns_extreme.geometry.rotations_torch import quat_xyzw_to_matrix_torch

    g = torch.Generator().manual_seed(seed)
    c2w = torch.eye(4).repeat(S, 1, 1)
    c2w[:, :3, :3] = quat_xyzw_to_matrix_torch(torch.randn(S, 4, generator=g))
    c2w[:, :3, 3] = torch.randn(S, 3, generator=g)
    return c2w


def _K(S: int, H: int, W: int) -> torch.Tensor:
    K = torch.tensor([[0.9 * W, 0.0, W / 2 + 1], [0.0, 0.95 * W, H / 2 - 1], [0.0, 0.0, 1.0]])
    return K.repeat(S, 1, 1)


# ---------------------------------------------------------------------------------------------- architecture traps


def test_seven_special_tokens_even_without_priors(tiny):
    """camera, 4 registers, pose, ray: the two prior tokens are zeros without priors but stay in the sequence."""
    seen = {}
    hook = tiny.visual_geometry_transformer.frame_blocks[0].register_forward_pre_hook(
        lambda module, args: seen.setdefault("tokens", args[0].clone())
    )
    try:
        with torch.no_grad():
            tiny(torch.rand(2, 3, 56, 70), heads=("camera",))
    finally:
        hook.remove()
    tokens = seen["tokens"]
    assert tiny.visual_geometry_transformer.patch_start_idx == 7
    assert tokens.shape[1] == 7 + 4 * 5
    assert torch.equal(tokens[:, 5:7], torch.zeros_like(tokens[:, 5:7]))
    assert torch.equal(tokens[0, 0], tiny.visual_geometry_transformer.cam_token[0, 0, 0])
    # Dropping the zero tokens (VGGT's 5-token layout) changes the answer: they take part in attention.
    vgt = tiny.visual_geometry_transformer
    with torch.no_grad():
        x = torch.rand(1, 2, 3, 56, 70)
        seven = vgt(x, [23])[23][:, :, 0]
        vgt.patch_start_idx = 5
        try:
            five = super(type(vgt), vgt).forward(x, [23])[23][:, :, 0]
        finally:
            vgt.patch_start_idx = 7
    assert (seven - five).abs().max() > 1e-3


def test_dense_heads_read_layers_4_11_17_23_and_camera_layer_23(tiny):
    x = torch.rand(1, 2, 3, 56, 70)
    with torch.no_grad():
        out = tiny(x, heads=("camera", "depth"))
        layers = tiny.visual_geometry_transformer(x, range(24))
        poisoned = {i: t if i in (4, 11, 17, 23) else torch.full_like(t, float("nan")) for i, t in layers.items()}
        depth, _ = tiny.depth_head(poisoned, 7, (56, 70))
        camera = tiny.cam_head(poisoned[23][:, :, 0])[-1]
        # VGGT-style indexing of a 4-element list would read the first four layers instead.
        first_four, _ = tiny.depth_head({t: layers[i] for t, i in zip((4, 11, 17, 23), range(4))}, 7, (56, 70))
    assert torch.equal(depth, out["depth"]) and torch.equal(camera, out["camera_params"])
    assert (first_four - out["depth"]).abs().max() > 1e-4


def test_first_frame_uses_token_slot_zero(tiny):
    """Slot 0 of cam_token/reg_token is for frame 0 only: with equal slots the model is frame-order equivariant."""
    x = torch.rand(3, 3, 56, 70)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}

    def both_orders() -> tuple[torch.Tensor, torch.Tensor]:
        ordered = tiny(x, heads=("camera",))["camera_params"][0]
        return ordered, tiny(x.flip(0), heads=("camera",))["camera_params"][0].flip(0)

    with torch.no_grad():
        ordered, flipped = both_orders()
        assert (ordered - flipped).abs().max() > 1e-3
        vgt = tiny.visual_geometry_transformer
        try:
            vgt.cam_token[:, 0] = vgt.cam_token[:, 1]
            vgt.reg_token[:, 0] = vgt.reg_token[:, 1]
            ordered, flipped = both_orders()
        finally:
            tiny.load_state_dict(state)
    torch.testing.assert_close(ordered, flipped, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- prior normalisation


def test_pose_normalisation_min_max_up_to_ten_views():
    from ns_extreme.models.worldmirror.priors import normalize_c2w_translations

    c2w = torch.eye(4).repeat(1, 3, 1, 1)
    c2w[0, :, :3, 3] = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # range (2, 1, 0) -> scale 2, centre (1, 0.5, 0); t' = (t - centre) / (2 / 0.8) + 0.5
    expected = torch.tensor([[0.1, 0.3, 0.5], [0.9, 0.3, 0.5], [0.5, 0.7, 0.5]])
    out = normalize_c2w_translations(c2w)
    torch.testing.assert_close(out[0, :, :, 3], expected)
    assert torch.equal(out[..., :3, :3], c2w[..., :3, :3])


@pytest.mark.parametrize("views, quantiles", [(10, False), (11, True)])
def test_pose_normalisation_quantiles_from_eleven_views(views, quantiles):
    import numpy as np

    from ns_extreme.models.worldmirror.priors import normalize_c2w_translations

    t = np.zeros((views, 3))
    t[:, 0] = np.arange(views, dtype=float)
    t[-1, 0] = 100.0  # an outlier
    t[:, 1] = np.linspace(0, 1, views)
    c2w = torch.eye(4).repeat(1, views, 1, 1)
    c2w[0, :, :3, 3] = torch.from_numpy(t).float()
    lo, hi = (np.quantile(t, 0.05, axis=0), np.quantile(t, 0.95, axis=0)) if quantiles else (t.min(0), t.max(0))
    scale = max(np.maximum(hi - lo, np.maximum(1e-6, np.abs(hi) * 1e-6)).max(), 1e-6)
    expected = np.clip((t - (lo + hi) / 2) / (scale / 0.8) + 0.5, 0, 1)
    out = normalize_c2w_translations(c2w)[0, :, :, 3].double().numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert (out[-1, 0] == 1.0) == quantiles  # the outlier is clamped only with the quantile bounds


def test_pose_normalisation_uses_only_views_with_a_pose():
    from ns_extreme.models.worldmirror.priors import pose_prior_vectors

    c2w = _c2w(4)[None]
    valid = torch.tensor([[True, False, True, True]])
    subset = pose_prior_vectors(c2w[:, [0, 2, 3]])
    torch.testing.assert_close(pose_prior_vectors(c2w, valid)[:, [0, 2, 3]], subset)


def test_depth_normalisation_edge_cases():
    from ns_extreme.models.worldmirror.priors import normalize_depth

    # 100 valid pixels (1..100): min / max bounds; zeros and NaN are invalid and map to 0.
    d = torch.zeros(1, 1, 11, 11)
    d.view(-1)[:100] = torch.arange(1, 101, dtype=torch.float32)
    d[0, 0, -1, -1] = float("nan")
    out = normalize_depth(d)
    torch.testing.assert_close(out.view(-1)[:100], (torch.arange(100, dtype=torch.float32)) / (99 + 99e-6))
    assert torch.equal(out.view(-1)[100:], torch.zeros(21))
    # 121 valid pixels: 1 % / 99 % quantiles, the extremes clamp to 0 and 1.
    d = torch.arange(1, 122, dtype=torch.float32).view(1, 1, 11, 11)
    lo, hi = torch.quantile(d.flatten(), 0.01), torch.quantile(d.flatten(), 0.99)
    out = normalize_depth(d)
    torch.testing.assert_close(out, ((d - lo) / (hi - lo + (hi - lo) * 1e-6)).clamp(0, 1))
    assert out.min() == 0 and out.max() == 1 and out[0, 0, 0, 1] == 0 and 0 < out[0, 0, 0, 2] < 0.01
    # Constant depth: bounds widen to (d, d + 1) -> all zeros; every map is normalised on its own (scale is lost).
    assert torch.equal(normalize_depth(torch.full((1, 1, 4, 4), 3.0)), torch.zeros(1, 1, 4, 4))
    pair = torch.rand(1, 2, 14, 14) + 1
    pair[0, 1] = pair[0, 0] * 7
    out = normalize_depth(pair)
    torch.testing.assert_close(out[0, 0], out[0, 1])


def test_intrinsics_are_read_at_network_resolution():
    from ns_extreme.models.worldmirror.priors import ray_prior_vectors

    K = _K(2, 56, 70)[None]
    rays = ray_prior_vectors(K, (56, 70))
    torch.testing.assert_close(rays[0, 0], torch.tensor([0.9, 0.95 * 70 / 56, 36 / 70, 27 / 56]))
    K2 = K.clone()
    K2[..., :2, :] *= 2  # the same camera at twice the resolution
    torch.testing.assert_close(ray_prior_vectors(K2, (112, 140)), rays)


# ---------------------------------------------------------------------------------------------- priors in the model


def test_each_prior_changes_the_outputs_and_is_deterministic(tiny):
    S, H, W = 3, 56, 70
    x = torch.rand(S, 3, H, W)
    priors = {"poses_c2w": _c2w(S), "intrinsics": _K(S, H, W), "depth": torch.rand(S, H, W) + 0.5}
    with torch.no_grad():
        base = tiny(x, heads=("camera",))["camera_params"]
        for name, value in priors.items():
            a = tiny(x, heads=("camera",), **{name: value})["camera_params"]
            b = tiny(x[None], heads=("camera",), **{name: value[None]})["camera_params"]
            assert torch.equal(a, b), name
            assert (a - base).abs().max() > 1e-4, name
        every = tiny(x, heads=("camera",), **priors)["camera_params"]
    assert (every - base).abs().max() > 1e-4


def test_priors_absent_for_every_view_equal_no_prior(tiny):
    S, H, W = 3, 56, 70
    x = torch.rand(S, 3, H, W)
    depth = torch.rand(S, H, W)
    depth[:] = 0.0
    depth[1, :3] = float("nan")
    with torch.no_grad():
        base = tiny(x, heads=("camera", "depth"))
        none = tiny(
            x,
            heads=("camera", "depth"),
            poses_c2w=torch.full((S, 4, 4), float("nan")),
            intrinsics=torch.full((S, 3, 3), float("nan")),
            depth=depth,
        )
    for key in ("camera_params", "depth"):
        assert torch.equal(base[key], none[key]), key


def test_priors_for_some_views_only(tiny):
    """A view marked as without a prior gets the zero token; the others keep theirs."""
    S, H, W = 3, 56, 70
    x = torch.rand(S, 3, H, W)
    K = _K(S, H, W)
    partial = K.clone()
    partial[1] = float("nan")
    with torch.no_grad():
        full = tiny(x, heads=("camera",), intrinsics=K)["camera_params"]
        some = tiny(x, heads=("camera",), intrinsics=partial)["camera_params"]
        none = tiny(x, heads=("camera",))["camera_params"]
    assert (some - full).abs().max() > 1e-5 and (some - none).abs().max() > 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"poses_c2w": torch.eye(4).repeat(2, 1, 1)}, "one entry per image"),
        ({"poses_c2w": torch.eye(4).repeat(3, 1, 1)[:, :2]}, "matrices"),
        ({"intrinsics": torch.eye(3).repeat(3, 1, 1)[None]}, "dimensions"),
        ({"intrinsics": torch.eye(3).repeat(3, 1, 1) * torch.tensor([1.0, -1.0, 1.0])}, "positive"),
        (
            {"poses_c2w": torch.eye(4).repeat(3, 1, 1).index_put_((torch.tensor([1]),), torch.tensor(float("nan")))},
            None,
        ),
        ({"depth": torch.rand(3, 56, 70).int()}, "floating-point"),
    ],
)
def test_bad_priors_raise_clear_errors(tiny, kwargs, message):
    x = torch.rand(3, 3, 56, 70)
    if message is None:  # view 1 entirely NaN is fine (no pose for that view); partly NaN is not
        poses = kwargs["poses_c2w"]
        with torch.no_grad():
            tiny(x, heads=("camera",), poses_c2w=poses)
        poses = torch.eye(4).repeat(3, 1, 1)
        poses[1, 0, 3] = float("inf")
        with pytest.raises(ValueError, match=r"views \[1\] are partly NaN/Inf"):
            tiny(x, heads=("camera",), poses_c2w=poses)
        return
    with pytest.raises(ValueError, match=message):
        tiny(x, heads=("camera",), **kwargs)


def test_depth_prior_at_another_resolution_is_resized(tiny):
    x = torch.rand(2, 3, 56, 70)
    depth = torch.rand(2, 28, 35) + 1
    resized = torch.nn.functional.interpolate(depth[None], size=(56, 70), mode="bilinear", align_corners=False)[0]
    with torch.no_grad():
        a = tiny(x, heads=("camera",), depth=depth)["camera_params"]
        b = tiny(x, heads=("camera",), depth=resized)["camera_params"]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- heads and options


def test_heads_subset_chunking_and_dropping_do_not_change_outputs(tiny):
    x = torch.rand(4, 3, 56, 70)
    with torch.no_grad():
        full = tiny(x)
        depth_only = tiny(x, heads=("depth",))
        chunked = tiny(x, dpt_frames_chunk=2)
    assert set(depth_only) == {"depth", "depth_conf"}
    assert torch.equal(depth_only["depth"], full["depth"])
    for key in ("depth", "pts3d", "normals", "gs_depth", "gs_params"):
        torch.testing.assert_close(chunked[key], full[key], rtol=1e-5, atol=1e-6, msg=key)
    gs_only = WorldMirror(WorldMirrorConfig.tiny())
    gs_only.load_state_dict(tiny.state_dict())
    assert gs_only.drop_heads(("gs",)) == ["depth_head.", "pts_head.", "norm_head."]  # gs keeps the camera
    with torch.no_grad():
        out = gs_only.eval()(x, heads=("gs",))
    assert torch.equal(out["gs_depth"], full["gs_depth"]) and torch.equal(out["camera_poses"], full["camera_poses"])
    with pytest.raises(ValueError, match="built without the depth"):
        gs_only(x, heads=("depth",))
    with pytest.raises(ValueError, match="unknown heads"):
        tiny(x, heads=("track",))


def test_heads_run_in_float32_under_autocast(tiny):
    x = torch.rand(2, 3, 56, 70)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(x, heads=("camera", "depth"))
    assert out["camera_params"].dtype == torch.float32 and out["depth"].dtype == torch.float32
    with torch.no_grad():
        reference = tiny(x, heads=("camera", "depth"))
    assert (out["depth"] - reference["depth"]).abs().max() < 0.1 * reference["depth"].abs().max()


def test_gradient_checkpointing_gives_the_same_gradients(one_thread):
    torch.manual_seed(0)
    model = WorldMirror(dataclasses.replace(WorldMirrorConfig.tiny(), dino_depth=2, camera_trunk_depth=1))
    x = torch.rand(2, 3, 28, 42)
    K = _K(2, 28, 42)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(checkpointing)
        out = model(x, intrinsics=K, heads=("camera",))
        out["camera_params"].square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "visual_geometry_transformer.ray_embed.0.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_splats_are_back_projected_and_voxel_merged():
    from ns_extreme.models.worldmirror import splats_from_gaussian_params

    # Two pixels, depth 2, fx = 1, cx = 0.5: centres at x = -1 and +1 in the camera, +4 and +6 in the world.
    params = torch.zeros(1, 12, 1, 2)
    params[0, 0] = 1.0  # quaternion (1, 0, 0, 0)
    params[0, 4:7] = torch.log(torch.tensor([0.1, 0.2, 0.5]))[:, None, None]  # scales; 0.5 clamps to 0.3
    params[0, 11] = torch.tensor([0.0, torch.log(torch.tensor(3.0))])  # merge weights sigmoid: 0.5, 0.75
    images = torch.tensor([0.5, 1.0]).view(1, 1, 1, 1, 2).expand(1, 1, 3, 1, 2)
    depth = torch.full((1, 1, 1, 2, 1), 2.0)
    K = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    c2w = torch.eye(4).view(1, 1, 4, 4).clone()
    c2w[..., 0, 3] = 5.0
    apart = splats_from_gaussian_params(params, images, depth, c2w, K, 1, voxel_size=0.5)
    torch.testing.assert_close(apart["means"][0], torch.tensor([[4.0, 0.0, 2.0], [6.0, 0.0, 2.0]]))
    torch.testing.assert_close(apart["scales"][0][0], torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(apart["sh"][0][:, 0, 0], torch.tensor([0.0, 0.5 / 0.28209479177387814]))
    merged = splats_from_gaussian_params(params, images, depth, c2w, K, 1, voxel_size=10.0)
    w = torch.tensor([0.5, 0.75])
    assert merged["means"][0].shape == (1, 3)
    torch.testing.assert_close(merged["means"][0][0], torch.tensor([(4 * 0.5 + 6 * 0.75) / 1.25, 0.0, 2.0]))
    torch.testing.assert_close(merged["opacities"][0], ((w * w).sum() / w.sum()).view(1))
    torch.testing.assert_close(merged["quats"][0], torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


@pytest.mark.slow
def test_full_size_forward_with_priors():
    torch.manual_seed(0)
    model = build_worldmirror().eval()
    S, H, W = 2, 56, 70
    x = torch.rand(S, 3, H, W)
    with torch.no_grad():
        model.cam_head.param_predictor.fc2.bias[7:] += 0.5
        plain = model(x)
        priors = model(x, poses_c2w=_c2w(S), intrinsics=_K(S, H, W), depth=torch.rand(S, H, W) + 1)
    for out in (plain, priors):
        assert out["camera_params"].shape == (1, S, 9) and out["normals"].shape == (1, S, H, W, 3)
        assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v))
        assert out["splats"]["means"][0].shape[1] == 3
    assert (plain["camera_params"] - priors["camera_params"]).abs().max() > 1e-6
