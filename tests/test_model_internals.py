"""Performance-related model internals checked against independent references.

* ``WeightsReader`` (per-tensor streaming of .safetensors, zip and legacy torch files) against
  ``safetensors.torch.load_file`` / ``torch.load(weights_only=True)``, bit for bit;
* ``load_model(storage_dtype=torch.bfloat16)`` and ``store_weights_in`` (bf16 Linear matrices, fp32 math);
* ``load_model(heads=...)``: VGGT without its point head;
* 2D RoPE (``RotaryPositionEmbedding2D`` / ``RopeTables``) against a complex-number float64 formula
  written here, the relative-position property, and the cached tables.

(tests/test_loading.py covers file/folder/Hub resolution, key checks and bias checkpoints.)
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ns_extreme.models import ModelLoadError, get_spec, load_model
from ns_extreme.models.layers import (
    Attention,
    RopeTables,
    RotaryPositionEmbedding2D,
    narrowable_linears,
    patch_positions,
    store_weights_in,
)
from ns_extreme.models.vggt import VGGT, VGGTConfig
from ns_extreme.models.weights import WeightsReader, read_state_dict

X = torch.rand(2, 3, 28, 42, generator=torch.Generator().manual_seed(0))  # 2 frames, 2x3 patches


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape and bytes (NaN payloads, -0.0 and subnormals included)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    a = got.contiguous().reshape(-1).view(torch.uint8)
    b = want.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(a, b), f"{what}: {int((a != b).sum())} of {a.numel()} bytes differ"


# --------------------------------------------------------------------------------------------------
# WeightsReader
# --------------------------------------------------------------------------------------------------


def mixed_state() -> dict[str, torch.Tensor]:
    """Every dtype the reader maps, odd shapes (scalar, empty, 3-D) and values that conversions treat
    specially: NaN, ±inf, -0.0, float32 subnormals, values that overflow float16, ties of bf16 rounding."""
    g = torch.Generator().manual_seed(1)
    special = torch.tensor(
        [
            float("nan"),
            float("inf"),
            -float("inf"),
            -0.0,
            0.0,
            1e-40,
            -3e-39,
            3.0e38,
            65520.0,
            1 + 2**-8,
            1 + 3 * 2**-8,
            -(2**-130),
        ]
    )
    return {
        "blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=g),
        "blocks.0.attn.qkv.bias": torch.randn(96, generator=g) * 1e-3,
        "special": special,
        "cube": torch.randn(3, 5, 7, generator=g) * 100,
        "scalar": torch.tensor(math.pi),
        "empty": torch.zeros(0, 4),
        "half": (torch.randn(17, 3, generator=g) * 10).half(),
        "bf16": torch.randn(5, 9, generator=g).bfloat16(),
        "double": torch.randn(4, 4, generator=g, dtype=torch.float64),
        "int64": torch.randint(-(2**40), 2**40, (6,), generator=g),
        "int32": torch.randint(-(2**30), 2**30, (2, 3), generator=g, dtype=torch.int32),
        "int16": torch.randint(-(2**15), 2**15 - 1, (5,), generator=g, dtype=torch.int16),
        "int8": torch.randint(-128, 127, (7,), generator=g, dtype=torch.int8),
        "uint8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "bool": torch.rand(11, generator=g) > 0.5,
    }


FORMATS = ("safetensors", "zip.pt", "zip.pth", "legacy.pt", "legacy.bin")


def write(path, state, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=fmt.startswith("zip"))


def reference_load(path, fmt: str) -> dict[str, torch.Tensor]:
    return load_file(str(path)) if fmt == "safetensors" else torch.load(path, weights_only=True)


@pytest.fixture(params=FORMATS)
def weights_file(request, tmp_path):
    fmt = request.param
    state = mixed_state()
    if fmt != "safetensors":
        # Torch files may hold views sharing one storage and non-contiguous tensors (safetensors refuses them).
        base = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
        state.update({"shared.base": base, "shared.transposed": base.t(), "shared.slice": base[2:5, 1::3]})
    path = tmp_path / f"weights.{fmt.split('.')[-1]}"
    write(path, state, fmt)
    return fmt, path, state


def test_reader_reads_every_tensor_bit_exactly(weights_file):
    fmt, path, state = weights_file
    reference = reference_load(path, fmt)
    assert set(reference) == set(state)  # the reference loader itself round-trips the file
    with WeightsReader(path) as reader:
        assert reader.shapes == {k: v.shape for k, v in reference.items()}
        assert all(type(s) is torch.Size for s in reader.shapes.values())
        # Reverse order and a second read: no state carried from one read to the next.
        for name in [*sorted(reference, reverse=True), *sorted(reference)]:
            assert_same_bits(reader.read(name), reference[name], f"{fmt} {name}")
            assert_same_bits(reader.read(name), state[name], f"{fmt} {name} vs saved")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reader_converts_floats_like_tensor_to(weights_file, dtype):
    """read(name, dtype) == reference.to(dtype) bit for bit for floating-point tensors; other dtypes are
    returned as stored. All results are kept until the end: none may alias the reader's reusable buffer."""
    fmt, path, _ = weights_file
    reference = reference_load(path, fmt)
    with WeightsReader(path) as reader:
        got = {name: reader.read(name, dtype) for name in reference}  # largest tensor first, then smaller ones
        got_again = {name: reader.read(name, dtype) for name in sorted(reference, key=lambda n: reference[n].numel())}
    converted = 0
    for name, ref in reference.items():
        want = ref.to(dtype) if ref.is_floating_point() else ref
        assert_same_bits(got[name], want, f"{fmt} {name} -> {dtype}")
        assert_same_bits(got_again[name], want, f"{fmt} {name} -> {dtype} (second read)")
        converted += ref.is_floating_point() and ref.dtype != dtype
    assert converted >= 3  # the conversion path really ran
    # The special values were really converted (not copied): float16 overflow, bf16 rounding.
    if dtype == torch.float16:
        assert torch.isinf(got["special"][7]) and torch.isinf(got["special"][8])
    if dtype == torch.bfloat16:
        assert got["special"][9].item() == 1.0 and got["special"][10].item() == 1 + 2**-6
    # read_state_dict is the same reader over all names.
    for name, tensor in read_state_dict(path, dtype).items():
        assert_same_bits(tensor, got[name], f"read_state_dict {name}")


def test_safetensors_reads_are_new_tensors(tmp_path):
    """Writing into a tensor the reader returned must not change later reads (the reader's docstring:
    'a new CPU tensor owned by the caller'), with and without conversion."""
    path = tmp_path / "w.safetensors"
    state = mixed_state()
    save_file(state, str(path))
    with WeightsReader(path) as reader:
        for dtype in (None, torch.float16):
            first = reader.read("cube", dtype)
            first.fill_(7)
            assert_same_bits(reader.read("cube", dtype), state["cube"] if dtype is None else state["cube"].to(dtype))


def test_legacy_torch_file_ending_like_a_zip_archive_is_read(tmp_path):
    """A legacy (non-zip) torch file whose last tensor bytes contain the zip end-of-central-directory
    record (b"PK\\x05\\x06" + 18 bytes) must still be read as a legacy file. zipfile.is_zipfile() says
    True for such a file (it searches the last 64 KiB for that record), and torch.load(mmap=True) then
    refuses it; torch itself decides by the first bytes (local file header b"PK\\x03\\x04")."""
    state = {"w": torch.randn(4, 4), "tail": torch.tensor(list(b"PK\x05\x06") + [0] * 18, dtype=torch.uint8)}
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:4] != b"PK\x03\x04"
    with WeightsReader(path) as reader:
        for name, tensor in state.items():
            assert_same_bits(reader.read(name), tensor, name)


@pytest.mark.parametrize("fmt", ["zip.pt", "legacy.pth"])
def test_wrapped_state_dict_is_unwrapped(tmp_path, fmt):
    """Training checkpoints {"model": state_dict, ...} are read as their state dict."""
    state = mixed_state()
    path = tmp_path / f"ckpt.{fmt.split('.')[-1]}"
    torch.save({"model": state, "epoch": 3}, path, _use_new_zipfile_serialization=fmt.startswith("zip"))
    with WeightsReader(path) as reader:
        assert reader.shapes == {k: v.shape for k, v in state.items()}
        for name, tensor in state.items():
            assert_same_bits(reader.read(name), tensor, name)


def test_truncated_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(mixed_state(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(ModelLoadError, match="does not fit the file"):
        WeightsReader(path)


class _TouchMarker:
    """Unpickling this would create a file (a visible side effect, unlike a print)."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["zip.pt", "zip.pth", "legacy.pt", "legacy.bin", "raw-pickle.pt"])
def test_reader_refuses_pickled_code_without_running_it(tmp_path, fmt):
    marker = tmp_path / "code-ran"
    evil = _TouchMarker()
    evil.marker = str(marker)
    content = {"model": {"w": torch.zeros(2), "b": evil}}
    path = tmp_path / f"evil.{fmt.split('.')[-1]}"
    if fmt == "raw-pickle.pt":
        path.write_bytes(pickle.dumps(content, protocol=2))
    else:
        torch.save(content, path, _use_new_zipfile_serialization=fmt.startswith("zip"))
    # The payload is live: plain unpickling does run it.
    control = tmp_path / "control"
    evil.marker = str(control)
    pickle.loads(pickle.dumps(evil)).close()
    assert control.exists()
    with pytest.raises(ModelLoadError, match="pickled Python objects"):
        WeightsReader(path)
    with pytest.raises(ModelLoadError, match="pickled Python objects"):
        load_model("vggt", weights=path, alignment="pretrained", config=VGGTConfig.tiny())
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Tiny model weights files
# --------------------------------------------------------------------------------------------------


def random_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tiny-config state dict with every parameter perturbed (no zeros, nothing bf16-representable)."""
    spec = get_spec(name)
    torch.manual_seed(seed)
    model = spec.build(spec.config("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_weights")
    files = {}
    for name in ("vggt", "pi3"):
        state = random_state(name)
        files[name] = folder / f"{name}.safetensors"
        save_file(state, str(files[name]))
        torch.save(state, folder / f"{name}.pt")
        files[name + ".pt"] = folder / f"{name}.pt"
        files[name + ".state"] = state
    return files


def tiny_load(name: str, path, **kwargs):
    return load_model(name, weights=path, alignment="pretrained", config=get_spec(name).config("tiny"), **kwargs)


def linear_weight_names(model: torch.nn.Module) -> set[str]:
    """The Linear matrices stored narrow: all but the heads' (they compute in float32, as the reference)."""
    names = {f"{n}.weight" for n, _ in narrowable_linears(model)}
    heads = tuple(f"{h}." for h in model.float32_modules)
    assert names and not any(n.startswith(heads) for n in names)
    return names


def outputs(model, heads=None) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(X) if heads is None else model(X, heads=heads)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------------------------------
# storage_dtype / store_weights_in
# --------------------------------------------------------------------------------------------------

# Measured (seed 0, rel = ||out_bf16_storage - out_fp32|| / ||out_fp32||): vggt pose_enc 4.0e-3, depth 4.6e-5,
# depth_conf 2.3e-5, world_points 7.9e-4, world_points_conf 3.5e-5; pi3 local_points 6.7e-3, conf 3.2e-3,
# camera_poses 2.6e-3, points 7.1e-3 (seeds 0-3: vggt <= 4.0e-3 / 8.9e-5 / 4.5e-5 / 7.9e-4 / 3.5e-5).
# A model computing in bfloat16 (dtype=torch.bfloat16) is off by 1.1e-2..3.0e-2 / 1.5e-3..2.9e-3 /
# 1.8e-3..2.9e-3 / 6.2e-3..1.6e-2 / 1.8e-3..2.7e-3 (vggt) and 2.8e-2 / 1.6e-2 / 8.5e-3 / 2.8e-2 (pi3):
# the bounds below (about 2.5x the bf16-storage error) all reject it.
STORAGE_TOLERANCE = {
    "vggt": {"pose_enc": 1e-2, "depth": 4e-4, "depth_conf": 4e-4, "world_points": 3e-3, "world_points_conf": 4e-4},
    "pi3": {"local_points": 2e-2, "conf": 1e-2, "camera_poses": 7e-3, "points": 2e-2},
}


@pytest.mark.parametrize("name, file_key", [("vggt", "vggt"), ("vggt", "vggt.pt"), ("pi3", "pi3")])
def test_storage_dtype_narrows_exactly_the_linear_matrices(tiny_files, name, file_key):
    state = tiny_files[name + ".state"]
    model = tiny_load(name, tiny_files[file_key], storage_dtype=torch.bfloat16)
    narrow = linear_weight_names(model)
    # The transformer blocks' projections are among them; heads' plain nn.Linear (pi3) are not.
    assert {"attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"} <= {
        ".".join(n.split(".")[-3:]) for n in narrow
    }
    loaded = model.state_dict()  # parameters and buffers (pi3: image_mean / image_std)
    assert set(loaded) == set(state)
    assert sum(loaded[n].numel() for n in narrow) > 0.5 * sum(v.numel() for v in loaded.values())
    for key, value in state.items():
        if key in narrow:
            assert_same_bits(loaded[key], value.to(torch.bfloat16), key)
        else:
            assert_same_bits(loaded[key], value, key)
    assert "bfloat16 linear weights" in model.load_report.dtype


@pytest.mark.parametrize("name", ["vggt", "pi3"])
def test_storage_dtype_forward_is_the_fp32_model_with_bf16_rounded_matrices(tmp_path, tiny_files, name):
    """Linear widens its bf16 matrix to fp32 per call: the output must be bit-identical to a float32 model
    whose Linear weights were rounded to bf16 in the file, and close to (not equal to) the fp32 model's."""
    state = tiny_files[name + ".state"]
    stored = tiny_load(name, tiny_files[name], storage_dtype=torch.bfloat16)
    rounded_file = tmp_path / "rounded.safetensors"
    narrow = linear_weight_names(stored)
    save_file({k: v.to(torch.bfloat16).float() if k in narrow else v for k, v in state.items()}, str(rounded_file))
    out_stored = outputs(stored)
    out_rounded = outputs(tiny_load(name, rounded_file))
    out_fp32 = outputs(tiny_load(name, tiny_files[name]))
    assert set(out_stored) == set(STORAGE_TOLERANCE[name])
    for key, tolerance in STORAGE_TOLERANCE[name].items():
        assert out_stored[key].dtype == torch.float32
        assert_same_bits(out_stored[key], out_rounded[key], key)
        rel = float((out_stored[key].double() - out_fp32[key].double()).norm() / out_fp32[key].double().norm())
        assert 0 < rel < tolerance, f"{key}: relative error {rel:.2e} (tolerance {tolerance:.0e})"


@pytest.mark.parametrize("name", ["vggt", "pi3"])
def test_store_weights_in_after_fp32_load_equals_loading_with_storage_dtype(tiny_files, name):
    direct = tiny_load(name, tiny_files[name], storage_dtype=torch.bfloat16)
    later = tiny_load(name, tiny_files[name])
    narrow = linear_weight_names(later)
    assert all(p.dtype == torch.float32 for p in later.parameters())
    converted = store_weights_in(later, torch.bfloat16)
    assert converted == sum(dict(later.named_parameters())[n].numel() for n in narrow) > 0
    assert store_weights_in(later, torch.bfloat16) == 0  # already stored so
    got, want = dict(later.named_parameters()), dict(direct.named_parameters())
    assert list(got) == list(want)
    for key in want:
        assert_same_bits(got[key].data, want[key].data, key)
        assert got[key].requires_grad == want[key].requires_grad is False
    out_later, out_direct = outputs(later), outputs(direct)
    for key in out_direct:
        assert_same_bits(out_later[key], out_direct[key], key)


# --------------------------------------------------------------------------------------------------
# heads=("camera", "depth")
# --------------------------------------------------------------------------------------------------


def test_vggt_without_point_head(tmp_path, tiny_files):
    state = tiny_files["vggt.state"]
    point_keys = sorted(k for k in state if k.startswith("point_head."))
    assert len(point_keys) > 10
    stripped = tmp_path / "no_point_head.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("point_head.")}, str(stripped))

    full = tiny_load("vggt", tiny_files["vggt"])
    posing = tiny_load("vggt", stripped, heads=("camera", "depth"))
    posing_from_full_file = tiny_load("vggt", tiny_files["vggt"], heads=("camera", "depth"))

    # Not built: no module, no parameters.
    for model in (posing, posing_from_full_file):
        assert model.point_head is None and model.depth_head is not None and model.camera_head is not None
        names = [n for n, _ in model.named_parameters()]
        assert not any(n.startswith("point_head.") for n in names)
        assert len(names) == len(state) - len(point_keys)
        with pytest.raises(ValueError, match="points"):
            model(X)
    n_point = sum(state[k].numel() for k in point_keys)
    assert sum(p.numel() for p in posing.parameters()) == sum(p.numel() for p in full.parameters()) - n_point

    # All heads requested: the missing point-head keys are named.
    with pytest.raises(ModelLoadError, match=rf"{len(point_keys)} missing keys: point_head\.") as err:
        tiny_load("vggt", stripped)
    assert "unexpected" not in str(err.value) and "wrong shape" not in str(err.value)

    want = outputs(full)
    with torch.no_grad():
        want_encodings = full(X, heads=("camera",))["pose_enc_list"]
    assert {"pose_enc", "depth", "depth_conf", "world_points"} <= set(want)
    for model in (posing, posing_from_full_file):
        got = outputs(model, heads=("camera", "depth"))
        assert set(got) == {"pose_enc", "depth", "depth_conf"}
        for key, value in got.items():
            assert_same_bits(value, want[key], key)
        with torch.no_grad():
            encodings = model(X, heads=("camera",))["pose_enc_list"]
        for got_enc, want_enc in zip(encodings, want_encodings, strict=True):
            assert_same_bits(got_enc, want_enc, "pose_enc_list")


# --------------------------------------------------------------------------------------------------
# 2D RoPE
# --------------------------------------------------------------------------------------------------

BASE = 100.0  # VGGT's RotaryPositionEmbedding2D(frequency=100)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float = BASE, angle_dtype=None) -> torch.Tensor:
    """2D RoPE in float64 via complex numbers. x [B, heads, N, D], positions [B, N, 2] (row, col).

    Channels [0, D/2) encode the row, [D/2, D) the column. In each half of size h the pair
    (c, c + h/2), c < h/2, is the complex number z = x_c + i x_{c+h/2}, multiplied by exp(i p w_c) with
    w_c = base^(-2c/h). ``angle_dtype``: round p*w_c to that dtype first (the reference implementation
    computes its angle table in the input dtype)."""
    D = x.shape[-1]
    h, q = D // 2, D // 4
    w = base ** (-2.0 * torch.arange(q, dtype=torch.float64) / h)
    parts = []
    for axis in (0, 1):
        half = x[..., axis * h : (axis + 1) * h].double()
        z = torch.complex(half[..., :q], half[..., q:])
        angle = positions[..., axis].double()[:, None, :, None] * w
        if angle_dtype is not None:
            angle = angle.float().to(angle_dtype).double()
        z = z * torch.polar(torch.ones_like(angle), angle)
        parts += [z.real, z.imag]
    return torch.cat(parts, dim=-1)


def rope_textbook(x: torch.Tensor, positions: torch.Tensor, base: float = BASE) -> torch.Tensor:
    """The usual formulation, in x's dtype: per half, x * cos + rotate_half(x) * sin with cos/sin rows
    looked up per position (angles computed in float32, then cast to x's dtype before cos/sin)."""
    D = x.shape[-1]
    h = D // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, h, 2).float() / h))
    angles = torch.outer(torch.arange(int(positions.max()) + 1).float(), inv_freq).to(x.dtype)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    out = []
    for axis in (0, 1):
        part = x[..., axis * h : (axis + 1) * h]
        c = F.embedding(positions[..., axis], cos)[:, None]
        s = F.embedding(positions[..., axis], sin)[:, None]
        first, second = part.chunk(2, dim=-1)
        out.append(part * c + torch.cat((-second, first), dim=-1) * s)
    return torch.cat(out, dim=-1)


def random_rope_inputs(seed: int, D: int, dtype=torch.float32, B: int = 2, H: int = 3, N: int = 50, max_pos: int = 38):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, N, D, generator=g).to(dtype)
    positions = torch.randint(0, max_pos, (B, N, 2), generator=g)
    return x, positions


# float32 vs the float64 formula, measured max |error| (|x| <= 4.5): 2.6e-7 (D=4), 4.4e-7 (8), 1.2e-6 (16),
# 2.8e-6 (64), 3.8e-6 (128): float32 rounding of angles up to 37 rad, then of cos/sin and the products.
@pytest.mark.parametrize("D", [4, 8, 16, 64, 128])
def test_rope_matches_independent_formula_fp32(D):
    rope = RotaryPositionEmbedding2D(BASE)
    x, positions = random_rope_inputs(D, D)
    before = x.clone()
    with torch.no_grad():
        got = rope(x, positions)
    assert_same_bits(x, before, "input")  # the in-place fast path must not touch its input
    want = rope_reference(x, positions)
    err = float((got.double() - want).abs().max())
    assert err < 1e-5, err
    assert float((want - x.double()).abs().max()) > 1.0  # the rotation is not near the identity here
    # The usual formulation (vggt/layers/rope.py style): bit-identical in float32, as layers.py promises.
    assert_same_bits(got, rope_textbook(x, positions), "textbook")
    # With autograd on, the out-of-place path gives the same bits and gradients flow.
    xg = x.clone().requires_grad_(True)
    out = rope(xg, positions)
    assert_same_bits(out.detach(), got, "grad path")
    out.square().sum().backward()
    assert torch.allclose(xg.grad, 2 * x, atol=2e-5)  # rotations preserve the norm: d|R x|^2/dx = 2x


def test_rope_layout_row_first_half_col_second_half():
    """Moving a token along the row axis changes only the first half of its channels, along columns only the
    second; channel c pairs with c + D/4 and position 1 rotates pair 0 by exactly 1 rad."""
    rope = RotaryPositionEmbedding2D(BASE)
    D = 16
    x = torch.randn(1, 1, 3, D, generator=torch.Generator().manual_seed(5))
    pos = torch.tensor([[[0, 0], [1, 0], [0, 1]]])
    with torch.no_grad():
        y = rope(x, pos)
    assert torch.equal(y[0, 0, 0], x[0, 0, 0])  # position (0, 0): identity
    assert torch.equal(y[0, 0, 1, D // 2 :], x[0, 0, 1, D // 2 :]) and not torch.allclose(
        y[0, 0, 1, : D // 2], x[0, 0, 1, : D // 2]
    )
    assert torch.equal(y[0, 0, 2, : D // 2], x[0, 0, 2, : D // 2]) and not torch.allclose(
        y[0, 0, 2, D // 2 :], x[0, 0, 2, D // 2 :]
    )
    a, b = x[0, 0, 1, 0].item(), x[0, 0, 1, D // 4].item()
    assert y[0, 0, 1, 0].item() == pytest.approx(a * math.cos(1) - b * math.sin(1), abs=1e-6)
    assert y[0, 0, 1, D // 4].item() == pytest.approx(b * math.cos(1) + a * math.sin(1), abs=1e-6)
    # Lowest frequency of the column half: w = base^(-2(q-1)/h) with h = D/2, q = D/4.
    w = BASE ** (-2 * (D // 4 - 1) / (D // 2))
    a, b = x[0, 0, 2, D // 2 + D // 4 - 1].item(), x[0, 0, 2, D - 1].item()
    assert y[0, 0, 2, D // 2 + D // 4 - 1].item() == pytest.approx(a * math.cos(w) - b * math.sin(w), abs=1e-6)


def test_vggt_positions_and_frequency():
    """VGGT: special tokens at (0, 0), patch (r, c) at (r + 1, c + 1); one base-100 RoPE shared by all blocks."""
    pos = patch_positions(2, 2, 3, 5, torch.device("cpu"))
    assert pos.shape == (2, 5 + 6, 2)
    assert pos[0, :5].eq(0).all()
    assert pos[1, 5:].tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    with torch.device("meta"):
        model = VGGT(VGGTConfig())  # full size, no memory
    rope = model.aggregator.rope
    assert rope.frequency == BASE
    blocks = [*model.aggregator.frame_blocks, *model.aggregator.global_blocks]
    assert len(blocks) == 48 and all(b.attn.rope is rope for b in blocks)


def test_rope_scores_depend_only_on_relative_position():
    """<rope(q, p1), rope(k, p2)> = f(q, k, p1 - p2): the float64 formula evaluated at p1 - p2 alone, and
    unchanged when both positions are shifted by the same 2D offset."""
    rope = RotaryPositionEmbedding2D(BASE)
    D, N = 64, 40
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, N, D, generator=g)
    k = torch.randn(1, 2, N, D, generator=g)
    p1 = torch.randint(0, 20, (1, N, 2), generator=g)
    p2 = torch.randint(0, 20, (1, N, 2), generator=g)
    with torch.no_grad():
        scores = (rope(q, p1) * rope(k, p2)).sum(-1).double()  # token i of q against token i of k
        shifted = (rope(q, p1 + torch.tensor([13, 5])) * rope(k, p2 + torch.tensor([13, 5]))).sum(-1).double()
    # Relative formula: rotate q by (p1 - p2) (possibly negative) and dot with the unrotated k.
    relative = (rope_reference(q, p1 - p2) * k.double()).sum(-1)
    unrotated = (q * k).sum(-1).double()
    scale = (q.norm(dim=-1) * k.norm(dim=-1)).double()
    assert float(((scores - relative).abs() / scale).max()) < 1e-5
    assert float(((shifted - scores).abs() / scale).max()) < 1e-5
    # Not vacuous: the scores do depend on the offset (identity "RoPE" would fail the first check).
    assert float(((scores - unrotated).abs() / scale).max()) > 0.1
    # And on it only: a different offset gives different scores.
    other = (rope_reference(q, p1 - p2 + torch.tensor([0, 3])) * k.double()).sum(-1)
    assert float(((other - scores).abs() / scale).max()) > 0.1


def test_rope_tables_are_cached_and_exact_across_calls_dtypes_and_head_dims():
    rope = RotaryPositionEmbedding2D(BASE)
    _, positions = random_rope_inputs(11, 8, N=30)
    tables = rope.tables(positions)
    g = torch.Generator().manual_seed(12)
    inputs = [
        torch.randn(2, 30, 3, 32, generator=g),  # [B, N, heads, D] (the layout RopeTables.rotate takes)
        torch.randn(2, 30, 3, 32, generator=g).bfloat16(),
        torch.randn(2, 30, 4, 16, generator=g),  # another head dim, same tables
        torch.randn(2, 30, 3, 32, generator=g).double(),
        torch.randn(2, 30, 3, 32, generator=g),  # back to the first key
        torch.randn(2, 30, 3, 32, generator=g).half(),
    ]
    with torch.no_grad():
        for x in inputs:
            got = tables.rotate(x)
            fresh = RopeTables(rope, positions).rotate(x)
            assert_same_bits(got, fresh, f"{x.dtype} D={x.shape[-1]} vs fresh tables")
            via_module = rope(x.transpose(1, 2), positions).transpose(1, 2)
            assert_same_bits(got, via_module, f"{x.dtype} via module")
            textbook = rope_textbook(x.transpose(1, 2), positions).transpose(1, 2)
            assert_same_bits(got, textbook, f"{x.dtype} textbook")
    # One entry per (head_dim, dtype, device), reused: the second float32 D=32 call built nothing.
    cos, sin = tables.get(32, torch.float32, torch.device("cpu"))
    assert tables.get(32, torch.float32, torch.device("cpu"))[0] is cos
    assert len(tables._cache) == 5
    assert cos.shape == (2, 30, 32) and cos.dtype == torch.float32 and sin.dtype == torch.float32


# bf16, error per unit of pair magnitude (|x_c| + |x_c'|), measured: 5.7e-3 (D=8), 7.7e-3 (D=64) against the
# float64 formula with bf16-rounded angles; 6.7e-3 and 5.2e-2 against float32 math on the same inputs, where
# the bf16 rounding of angles up to 37 rad (as in the reference implementation) dominates.
@pytest.mark.parametrize("D", [8, 64])
def test_rope_bf16(D):
    rope = RotaryPositionEmbedding2D(BASE)
    x32, positions = random_rope_inputs(20 + D, D)
    x = x32.bfloat16()
    with torch.no_grad():
        got = rope(x, positions)
        got32 = rope(x.float(), positions)
    assert got.dtype == torch.bfloat16
    assert_same_bits(got, rope_textbook(x, positions), "textbook bf16")
    want = rope_reference(x, positions, angle_dtype=torch.bfloat16)
    # Per-pair magnitude bounds each output channel: |out_c| <= |x_c| + |x_{c'}|.
    q = D // 4
    pair = x.double().abs()
    pair = pair + torch.cat([pair[..., i * q : (i + 1) * q] for i in (1, 0, 3, 2)], dim=-1)
    rel = float(((got.double() - want).abs() / pair).max())
    assert rel < 2**-6, rel  # four bf16 roundings (unit roundoff 2^-8): cos or sin, products, sum
    # Against float32 math on the same inputs: plus the angle rounding, at most 37 rad * 2^-8 per unit of pair
    # magnitude.
    rel32 = float(((got.double() - got32.double()).abs() / pair).max())
    assert rel32 < 37 * 2**-8 + 2**-6, rel32


def test_attention_rotates_q_and_k_in_token_major_layout():
    """Attention with RoPE (and qk-norm) against a plain reimplementation: q/k/v split, per-head LayerNorm,
    the independent RoPE formula on q and k, softmax attention, output projection."""
    torch.manual_seed(3)
    dim, heads, B, N = 32, 2, 2, 12
    rope = RotaryPositionEmbedding2D(BASE)
    attn = Attention(dim, heads, qk_norm=True, rope=rope)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(B, N, dim)
    positions = torch.randint(0, 9, (B, N, 2))

    def reference(pos):
        qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(B, N, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, d]
        q = F.layer_norm(q, (dim // heads,), attn.q_norm.weight, attn.q_norm.bias, attn.q_norm.eps)
        k = F.layer_norm(k, (dim // heads,), attn.k_norm.weight, attn.k_norm.bias, attn.k_norm.eps)
        q, k = rope_reference(q, pos), rope_reference(k, pos)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
        out = (weights @ v.double()).transpose(1, 2).reshape(B, N, dim)
        return out @ attn.proj.weight.double().T + attn.proj.bias.double()

    with torch.no_grad():
        got = attn(x, pos=positions)
        got_tables = attn(x, pos=rope.tables(positions))
        want = reference(positions)
        unrotated = reference(torch.zeros_like(positions))
    assert_same_bits(got_tables, got, "RopeTables vs positions")
    err = float((got.double() - want).abs().max())
    assert err < 1e-5, err
    assert float((unrotated - want).abs().max()) > 100 * err  # RoPE matters here
