"""WorldMirror: official key layout, released bias checkpoint, forward contract, priors and the architecture traps."""

from __future__ import annotations

from importlib import resources

import pytest
import torch
from conftest import read_key_list
from torch import nn

from ns_extreme.models.bias import BiasSet, apply_bias_tensors, read_bias_checkpoint
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
    # Default init zeroes biases and sets LayerScale to 0.01, which would hide wiring mistakes.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "gamma", "token")) or p.ndim == 1:
                p.normal_(0, 0.3)
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
