"""The contract every backbone of the registry (``ns_extreme.models.MODELS``) keeps, checked for each: official key
set and shapes, tiny configs with the real names, the released alignment, the camera path the alignment reads,
determinism and batch consistency, head dropping. A new backbone gets these tests by being registered (and adding
its row to ``CONTRACT``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import read_key_list

from ns_extreme.models import MODELS, get_spec, load_model, read_bias_checkpoint
from ns_extreme.models.loading import released_alignment_path
from ns_extreme.models.registry import CAMERA_HEADS

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Contract:
    key_list: str
    """Official state-dict key list in ../shared/fixtures/state_dict_keys."""
    parameters: int
    """Parameters of the full-size module (the official checkpoint less ``ignored_checkpoint_prefixes``)."""
    bias_tensors: int
    bias_parameters: int
    """Size of the paper's released alignment."""


CONTRACT = {
    "vggt": Contract("vggt_1b.txt", 1_256_537_516 - 65_941_396, 32, 73_728),
    "pi3": Contract("pi3.txt", 958_696_738, 36, 82_944),
    "worldmirror": Contract("worldmirror.txt", 1_263_337_002, 32, 73_728),
}
NAMES = list(MODELS)


def test_every_registered_model_has_a_contract():
    assert set(CONTRACT) == set(MODELS)


def _official(name: str, state_dict_keys) -> dict[str, tuple[int, ...]]:
    ignored = get_spec(name).ignored_checkpoint_prefixes
    keys = read_key_list(state_dict_keys / CONTRACT[name].key_list)
    return {k: v for k, v in keys.items() if not k.startswith(ignored)}


@pytest.mark.parametrize("name", NAMES)
def test_full_size_state_dict_equals_the_official_keys_and_shapes(name, state_dict_keys):
    spec = get_spec(name)
    official = _official(name, state_dict_keys)
    with torch.device("meta"):
        model = spec.build(spec.config("full"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(official)  # same names, same order
    assert ours == official  # same shapes
    assert sum(v.numel() for v in model.state_dict().values()) == CONTRACT[name].parameters


@pytest.mark.parametrize("name", NAMES)
def test_tiny_config_uses_only_official_key_names(name, state_dict_keys):
    spec = get_spec(name)
    with torch.device("meta"):
        tiny = spec.build(spec.config("tiny"))
    names = set(tiny.state_dict())
    assert names <= set(_official(name, state_dict_keys))
    assert sum(v.numel() for v in tiny.state_dict().values()) < 10_000_000


@pytest.mark.parametrize("name", NAMES)
def test_released_alignment_is_exactly_the_paper_bias_set_of_the_full_model(name):
    spec = get_spec(name)
    with torch.device("meta"):
        model = spec.build(spec.config("full"))
    released = read_bias_checkpoint(released_alignment_path(spec))
    params = dict(model.named_parameters())
    assert sorted(released) == sorted(spec.paper_bias_set.select(model))
    assert all(released[k].shape == params[k].shape for k in released)
    assert len(released) == CONTRACT[name].bias_tensors
    assert sum(v.numel() for v in released.values()) == CONTRACT[name].bias_parameters


@pytest.fixture(scope="module")
def tiny_models() -> dict:
    """Per name: the randomly initialised tiny model (``load_model(weights="random")``, what the CLIs use)."""
    return {
        name: load_model(name, weights="random", alignment="pretrained", config=get_spec(name).config("tiny"))
        for name in NAMES
    }


@pytest.mark.parametrize("name", NAMES)
def test_camera_path_gives_rotations_per_estimate(name, tiny_models):
    """What alignment training and evaluation read: ``w2c_rotations`` of the ``CAMERA_HEADS`` outputs."""
    torch.manual_seed(0)
    images = torch.rand(2, 2, 3, 42, 56)
    with torch.no_grad():
        estimates = get_spec(name).w2c_rotations(tiny_models[name](images, heads=CAMERA_HEADS))
    assert len(estimates) >= 1
    for R in estimates:
        assert R.shape == (2, 2, 3, 3) and R.dtype == torch.float32
        torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3).expand(2, 2, 3, 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.linalg.det(R), torch.ones(2, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_deterministic_and_batch_consistent(name, tiny_models):
    model = tiny_models[name]
    torch.manual_seed(1)
    x = torch.rand(2, 3, 3, 42, 56)
    with torch.no_grad():
        batched, again, single = model(x), model(x), model(x[1])
    tensors = [k for k, v in batched.items() if torch.is_tensor(v)]
    assert tensors
    for key in tensors:
        assert batched[key].shape[:2] == (2, 3), key
        assert torch.isfinite(batched[key]).all(), key
        assert torch.equal(batched[key], again[key]), key
        torch.testing.assert_close(batched[key][1:], single[key], rtol=1e-4, atol=1e-5)


HEAD_SUBSETS = sorted({(n, h) for n in NAMES for h in (CAMERA_HEADS, get_spec(n).posing_heads) if h is not None})
"""The head subsets ns_extreme builds: alignment's camera path and each model's posing heads (None: all)."""


@pytest.mark.parametrize("name, heads", HEAD_SUBSETS)
def test_dropped_heads_leave_the_kept_outputs_and_the_state_dict_unchanged(name, heads, tiny_models):
    spec = get_spec(name)
    full = tiny_models[name]
    reduced = load_model(name, weights="random", alignment="pretrained", config=spec.config("tiny"), heads=heads)
    full_state, reduced_state = full.state_dict(), reduced.state_dict()
    assert set(reduced_state) < set(full_state)
    assert all(torch.equal(reduced_state[k], full_state[k]) for k in reduced_state)
    torch.manual_seed(2)
    x = torch.rand(1, 2, 3, 42, 56)
    with torch.no_grad():
        want, got = full(x, heads=heads), reduced(x, heads=heads)
        with pytest.raises(ValueError, match="built without"):
            reduced(x)
    assert set(got) == set(want)
    for key, value in got.items():
        if torch.is_tensor(value):
            assert torch.equal(value, want[key]), key


@pytest.mark.parametrize("name", NAMES)
def test_unknown_heads_are_refused(name, tiny_models):
    with pytest.raises(ValueError, match="unknown heads"):
        tiny_models[name](torch.rand(1, 3, 42, 42), heads=("tracks",))
    with pytest.raises(ValueError, match="unknown heads"):
        get_spec(name).build(get_spec(name).config("tiny")).drop_heads(("tracks",))


def test_every_command_offers_exactly_the_registered_models():
    """One registry drives every CLI: the --model choices of extreme-poses / extreme3d and of ns-extreme-align."""
    import typing

    from ns_extreme.align.evaluate import EvalConfig
    from ns_extreme.align.train import TrainConfig
    from ns_extreme.cli.align import PairsConfig
    from ns_extreme.posing import PoseModelOptions

    for config in (PoseModelOptions, TrainConfig, EvalConfig, PairsConfig):
        hint = typing.get_type_hints(config, include_extras=True)["model"]
        while typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        assert typing.get_args(hint) == tuple(MODELS), config.__name__
