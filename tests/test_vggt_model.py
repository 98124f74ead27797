"""VGGT backbone: tiny-model forward contract, determinism, memory-bounding options (key layout and the registry
contract: test_model_contract.py)."""

from __future__ import annotations

import pytest
import torch

from ns_extreme.models.testing import perturb_trivial_parameters
from ns_extreme.models.vggt import VGGT, VGGTConfig


@pytest.fixture(scope="module")
def tiny() -> VGGT:
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.tiny()).eval()
    perturb_trivial_parameters(model)  # default init would hide wiring mistakes
    return model


def test_tiny_forward_shapes(tiny):
    x = torch.rand(3, 3, 56, 70)
    with torch.no_grad():
        out = tiny(x)
    assert out["pose_enc"].shape == (1, 3, 9)
    assert len(out["pose_enc_list"]) == 4
    assert out["depth"].shape == (1, 3, 56, 70, 1)
    assert out["depth_conf"].shape == (1, 3, 56, 70)
    assert out["world_points"].shape == (1, 3, 56, 70, 3)
    assert out["world_points_conf"].shape == (1, 3, 56, 70)
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all() and (out["world_points_conf"] > 1).all()
    assert (out["pose_enc"][..., 7:] >= 0).all()  # field of view goes through ReLU
    assert all(torch.isfinite(v).all() for k, v in out.items() if torch.is_tensor(v))


def test_tiny_forward_is_deterministic_and_batch_consistent(tiny):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 3, 42, 56)
    with torch.no_grad():
        batched = tiny(x)
        again = tiny(x)
        single = tiny(x[1])
    for key in ("pose_enc", "depth", "world_points"):
        assert torch.equal(batched[key], again[key])
        torch.testing.assert_close(batched[key][1:], single[key], rtol=1e-5, atol=1e-5)


def test_frame_zero_is_the_reference(tiny):
    """Frame 0 gets its own camera/register tokens: swapping frames changes the answer."""
    torch.manual_seed(2)
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        a = tiny(x, heads=("camera",))["pose_enc"]
        b = tiny(x.flip(0), heads=("camera",))["pose_enc"]
    assert not torch.allclose(a, b.flip(1), atol=1e-4)


def test_heads_subset_and_dpt_chunking_do_not_change_outputs(tiny):
    torch.manual_seed(3)
    x = torch.rand(5, 3, 42, 42)
    with torch.no_grad():
        full = tiny(x)
        camera_only = tiny(x, heads=("camera",))
        chunked = VGGT(VGGTConfig(**{**tiny.cfg.__dict__, "dpt_frames_chunk": 2}))
        chunked.load_state_dict(tiny.state_dict())
        chunked_out = chunked.eval()(x)
    assert set(camera_only) == {"pose_enc", "pose_enc_list"}
    assert torch.equal(camera_only["pose_enc"], full["pose_enc"])
    torch.testing.assert_close(chunked_out["depth"], full["depth"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_out["world_points"], full["world_points"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shape, message",
    [((2, 3, 50, 56), "multiples of 14"), ((2, 4, 56, 56), "expected images"), ((3, 56, 56), "expected images")],
)
def test_bad_input_shapes_raise(tiny, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny(torch.rand(*shape))


def test_unknown_head_raises(tiny):
    with pytest.raises(ValueError, match="unknown heads"):
        tiny(torch.rand(1, 3, 56, 56), heads=("tracks",))


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    torch.manual_seed(4)
    x = torch.rand(2, 3, 28, 42)
    grads = []
    for checkpointing in (False, True):
        tiny.zero_grad()
        tiny.set_gradient_checkpointing(checkpointing)
        tiny.requires_grad_(True)
        tiny(x, heads=("camera",))["pose_enc"].square().sum().backward()
        grads.append(tiny.aggregator.global_blocks[23].attn.qkv.bias.grad.clone())
    tiny.set_gradient_checkpointing(False)
    tiny.requires_grad_(False)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------- precision recipe


def _bf16_rounded_fraction(t: torch.Tensor) -> float:
    t = t.float()[t != 0]  # zeros (the tiny model's ReLU'd fields of view) are representable in any dtype
    return float((t == t.bfloat16().float()).float().mean())


@pytest.mark.usefixtures("one_thread")
def test_bf16_autocast_runs_the_heads_in_float32_as_the_reference(tiny):
    """Under bf16 autocast only the aggregator is narrow: the forward equals aggregator-under-autocast followed by
    the float32 heads (bit for bit), the pose encodings are float32 and not bf16-rounded, and the outputs stay
    near the float32 model's."""
    x = torch.rand(1, 3, 3, 42, 56, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fp32 = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = tiny(x)
            layers = tiny.aggregator(x, set(tiny.cfg.dpt_taps) | {tiny.cfg.depth - 1})
        encodings = tiny.camera_head(layers[tiny.cfg.depth - 1][:, :, 0].float(), tiny.cfg.camera_iterations)
        taps = {k: v.float() for k, v in layers.items()}
        depth, _ = tiny.depth_head(taps, tiny.aggregator.patch_start_idx, (42, 56))
    assert torch.equal(mixed["pose_enc"], encodings[-1])
    assert torch.equal(mixed["depth"], depth)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert mixed[key].dtype == torch.float32, key
    assert _bf16_rounded_fraction(mixed["pose_enc"]) < 0.2  # bf16 heads: 1.0
    assert _bf16_rounded_fraction(mixed["depth"]) < 0.2
    # Only the backbone's bf16 rounding remains (measured on this tiny model: 9.8e-4 pose_enc, 9.5e-6 depth).
    assert (mixed["pose_enc"] - fp32["pose_enc"]).abs().max() < 2e-2
    torch.testing.assert_close(mixed["depth"], fp32["depth"], rtol=1e-2, atol=1e-2)
    assert not torch.equal(mixed["pose_enc"], fp32["pose_enc"])  # the autocast really ran


@pytest.mark.usefixtures("one_thread")
def test_dense_heads_autocast_is_the_measured_exception(tiny):
    x = torch.rand(1, 2, 3, 42, 56, generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        recipe = tiny(x, heads=("camera", "depth"))
        narrow = tiny(x, heads=("camera", "depth"), dense_heads_autocast=True)
    assert torch.equal(recipe["pose_enc"], narrow["pose_enc"])  # the camera head is float32 either way
    assert _bf16_rounded_fraction(recipe["depth"]) < 0.2
    assert not torch.equal(recipe["depth"], narrow["depth"])


@pytest.mark.usefixtures("one_thread")
def test_narrow_storage_keeps_the_heads_float32_and_matches_plain_autocast(tiny):
    """``bf16`` precision = bf16 Linear matrices in the aggregator + autocast: the same numbers as the reference's
    float32 weights under autocast (autocast rounds them identically), with the heads' weights untouched."""
    import copy

    from ns_extreme.models.layers import Linear, store_weights_in

    narrow = copy.deepcopy(tiny)
    assert store_weights_in(narrow, torch.bfloat16) > 0
    linears = {n: m.weight.dtype for n, m in narrow.named_modules() if isinstance(m, Linear)}
    assert {d for n, d in linears.items() if n.startswith("camera_head.")} == {torch.float32}
    assert {d for n, d in linears.items() if n.startswith("aggregator.")} == {torch.bfloat16}
    x = torch.rand(1, 2, 3, 42, 56, generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference, ours = tiny(x), narrow(x)
    for key in ("pose_enc", "depth", "world_points"):
        assert torch.equal(reference[key], ours[key]), key
