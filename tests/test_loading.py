"""load_model: weights from files/folders/the Hub cache, strict key checks, bias checkpoints, every error."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from ns_extreme.models import ModelLoadError, WeightsNotFoundError, get_spec, load_model, read_bias_checkpoint
from ns_extreme.models.bias import write_bias_checkpoint
from ns_extreme.models.pi3 import Pi3Config
from ns_extreme.models.vggt import VGGT, VGGTConfig

TINY = VGGTConfig.tiny()
X = torch.rand(2, 3, 28, 42, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = VGGT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.state_dict()


@pytest.fixture()
def tiny_file(tmp_path, tiny_state):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    return path


def reference_outputs(state):
    model = VGGT(TINY).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(X)


def test_safetensors_pt_and_folder_load_identically(tmp_path, tiny_state, tiny_file):
    torch.save(tiny_state, tmp_path / "model.pt")
    expected = reference_outputs(tiny_state)
    for source in (tiny_file, tmp_path / "model.pt", tmp_path):
        model = load_model("vggt", weights=source, alignment="pretrained", config=TINY)
        with torch.no_grad():
            out = model(X)
        assert torch.equal(out["pose_enc"], expected["pose_enc"])
        assert torch.equal(out["depth"], expected["depth"])
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
        assert model.load_report.weights_fingerprint and model.load_report.weights_file


def test_checkpoint_with_track_head_keys_is_accepted_and_they_are_ignored(tmp_path, tiny_state):
    path = tmp_path / "with_track.safetensors"
    save_file({**tiny_state, "track_head.tracker.flow_head.weight": torch.zeros(2, 2)}, str(path))
    load_model("vggt", weights=path, alignment="pretrained", config=TINY)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_strict_key_check_names_the_keys(tmp_path, tiny_state, damage):
    state = dict(tiny_state)
    if damage == "missing":
        del state["camera_head.embed_pose.weight"]
        key = "camera_head.embed_pose.weight"
    elif damage == "unexpected":
        state["aggregator.extra.weight"] = torch.zeros(3)
        key = "aggregator.extra.weight"
    else:
        state["depth_head.norm.bias"] = torch.zeros(7)
        key = "depth_head.norm.bias"
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")) as err:
        load_model("vggt", weights=path, alignment="pretrained", config=TINY)
    assert damage in str(err.value) or "wrong shape" in str(err.value)


def test_weights_of_a_different_model_size_are_refused(tiny_file):
    with pytest.raises(ModelLoadError, match="does not fit this model"):
        load_model(
            "vggt",
            weights=tiny_file,
            alignment="pretrained",
            config=VGGTConfig(**{**TINY.__dict__, "embed_dim": 64, "num_heads": 4}),
        )


def test_missing_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        load_model("vggt", weights=tmp_path / "nope.safetensors", config=TINY)
    with pytest.raises(WeightsNotFoundError, match="no weights file"):
        load_model("vggt", weights=tmp_path, config=TINY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match="--weights") as err:
        load_model("vggt", config=TINY)  # default: facebook/VGGT-1B, not cached here
    assert "facebook/VGGT-1B" in str(err.value) and "huggingface-cli download" in str(err.value)


def test_hub_cache_is_used_offline(tmp_path, monkeypatch, tiny_state):
    """A weights file in the Hugging Face cache layout is found with HF_HUB_OFFLINE=1."""
    hub = tmp_path / "hf" / "hub" / "models--someone--tiny-vggt"
    snapshot = hub / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("a" * 40)
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model = load_model("vggt", weights="someone/tiny-vggt", alignment="pretrained", config=TINY)
    assert model.load_report.weights_file.endswith("model.safetensors")


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    weights = tmp_path / "evil.pt"
    weights.write_bytes(pickle.dumps({"aggregator.camera_token": _Exploit()}))
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model("vggt", weights=weights, config=TINY)
    bias = tmp_path / "evil_bias.pth"
    torch.save({"bias_state_dict": {"x": _Exploit()}}, bias)
    with pytest.raises(ModelLoadError, match="weights_only"):
        read_bias_checkpoint(bias)
    assert "pickled code ran" not in capsys.readouterr().out


def test_corrupt_files_are_reported(tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model("vggt", weights=broken, config=TINY)
    truncated = tmp_path / "bias.pth"
    truncated.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ModelLoadError, match="bias checkpoint"):
        read_bias_checkpoint(truncated)


def filled_wide_model(name: str, cfg):
    """Real block widths (1024) so a released bias checkpoint fits; everything else tiny. Not initialised:
    every parameter is filled with its own index so unchanged ones can be checked exactly."""
    with torch.device("meta"):
        model = get_spec(name).build(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(float(i))
    return model


WIDE_CONFIGS = {
    "vggt": lambda: VGGTConfig(
        dino_depth=1, camera_trunk_depth=1, dpt_features=8, dpt_out_channels=(8, 8, 16, 16), img_size=56
    ),
    "pi3": lambda: Pi3Config(
        img_size=56, encoder_depth=1, head_embed_dim=32, head_num_heads=2, head_depth=1, camera_dim=16
    ),
}


@pytest.mark.parametrize(
    "name, released_file, tensors, parameters",
    [("vggt", "VGGT_changed_bias.pth", 32, 73_728), ("pi3", "PI3_changed_bias.pth", 36, 82_944)],
)
def test_released_checkpoint_changes_exactly_its_biases(bias_ckpts, name, released_file, tensors, parameters):
    from ns_extreme.models.bias import apply_bias_tensors

    model = filled_wide_model(name, WIDE_CONFIGS[name]())
    released = read_bias_checkpoint(bias_ckpts / released_file)
    report = apply_bias_tensors(model, released, released_file)
    assert (report.tensors, report.parameters) == (tensors, parameters)
    assert sorted(released) == sorted(get_spec(name).paper_bias_set.select(model))
    with torch.no_grad():
        for i, (param_name, p) in enumerate(model.named_parameters()):
            if param_name in released:
                assert torch.equal(p, released[param_name]), param_name
            else:
                assert bool((p == float(i)).all()), f"{param_name} changed"
    del model


def test_packaged_alignment_is_the_released_file(bias_ckpts):
    from ns_extreme.models.loading import released_alignment_path

    packaged = released_alignment_path(get_spec("vggt"))
    assert packaged.read_bytes() == (bias_ckpts / "VGGT_changed_bias.pth").read_bytes()


def test_bias_checkpoint_round_trip_has_the_released_structure(tmp_path, bias_ckpts):
    released = read_bias_checkpoint(bias_ckpts / "VGGT_changed_bias.pth")
    write_bias_checkpoint(tmp_path / "mine.pth", released)
    raw = torch.load(tmp_path / "mine.pth", weights_only=True)
    assert list(raw) == ["bias_state_dict"]
    assert all(torch.equal(raw["bias_state_dict"][k], v) for k, v in released.items())
    assert all(v.dtype == torch.float32 for v in raw["bias_state_dict"].values())


@pytest.mark.parametrize(
    "content, message",
    [
        ({"bias_state_dict": {"aggregator.frame_blocks.4.attn.nope.bias": torch.zeros(32)}}, "not parameters"),
        ({"bias_state_dict": {"aggregator.frame_blocks.4.attn.qkv.bias": torch.zeros(5)}}, "wrong shapes"),
        (
            {"bias_state_dict": {"aggregator.frame_blocks.4.attn.qkv.bias": torch.zeros(96, dtype=torch.int64)}},
            "floating-point",
        ),
        ({"bias_state_dict": {"aggregator.frame_blocks.4.attn.qkv.bias": torch.full((96,), float("nan"))}}, "NaN"),
        ({"state_dict": {}}, "bias_state_dict"),
        ({"bias_state_dict": {}}, "empty"),
    ],
)
def test_bad_bias_checkpoints_are_refused(tmp_path, content, message):
    path = tmp_path / "bias.pth"
    torch.save(content, path)
    with pytest.raises(ModelLoadError, match=message):
        load_model("vggt", weights="random", alignment=path, config=TINY)


def test_missing_alignment_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("vggt", weights="random", alignment=tmp_path / "none.pth", config=TINY)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model"):
        load_model("dust3r", weights="random")
