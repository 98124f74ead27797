"""``--dtype auto`` on CPUs: bfloat16 exactly where the CPU has AMX or AVX-512 BF16 (faked here: this suite runs on
CPUs without them), and the same answer from every command (one resolver)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ns_extreme import runtime

# Flag lines as /proc/cpuinfo prints them (shortened): an AMX Xeon (torch 2.14 reports its capability as "AVX512"),
# an AVX-512 CPU without BF16 (Skylake-SP: oneDNN "supports" bf16 there by emulation), and an AVX2-only EPYC.
XEON_AMX = "fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8"
SKYLAKE = "fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq"
EPYC_AVX2 = "fpu sse2 avx2 fma"
ARM = None  # no "flags" line


def cpuinfo(tmp_path: Path, flags) -> Path:
    path = tmp_path / "cpuinfo"
    lines = ["processor\t: 0", "model name\t: test cpu"]
    if flags is not None:
        lines.append(f"flags\t\t: {flags}")
    path.write_text("\n".join(lines + ["", "processor\t: 1", "flags\t\t: other cpu ignored", ""]))
    return path


@pytest.fixture(autouse=True)
def detect(monkeypatch):
    """Detection, not the suite-wide NS_EXTREME_CPU_BF16=0 of conftest.py."""
    monkeypatch.delenv(runtime.FAST_BF16_ENV, raising=False)


def test_environment_variable_overrides_detection(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.FAST_BF16_ENV, "1")
    assert runtime.cpu_has_fast_bf16(cpuinfo(tmp_path, EPYC_AVX2))
    assert runtime.auto_precision_name(torch.device("cpu")) == "bf16"
    monkeypatch.setenv(runtime.FAST_BF16_ENV, "0")
    assert not runtime.cpu_has_fast_bf16(cpuinfo(tmp_path, XEON_AMX))
    assert runtime.auto_precision_name(torch.device("cpu")) == "fp32"


@pytest.fixture
def torch_probe_says(monkeypatch):
    def say(amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)

    return say


@pytest.mark.parametrize(
    "flags, fast", [(XEON_AMX, True), ("avx2 avx512_bf16", True), ("avx2 amx_bf16", True), (SKYLAKE, False),
                    (EPYC_AVX2, False), (ARM, False)]
)  # fmt: skip
def test_fast_bf16_from_cpu_flags(tmp_path, torch_probe_says, flags, fast):
    torch_probe_says(False, False)
    assert runtime.cpu_has_fast_bf16(cpuinfo(tmp_path, flags)) is fast


def test_only_the_first_cpu_flags_are_read(tmp_path):
    assert runtime.cpu_flags(cpuinfo(tmp_path, EPYC_AVX2)) == frozenset(EPYC_AVX2.split())
    assert runtime.cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.parametrize("amx, avx512_bf16", [(True, False), (False, True)])
def test_fast_bf16_from_torch_probe_without_cpuinfo(tmp_path, torch_probe_says, amx, avx512_bf16):
    torch_probe_says(amx, avx512_bf16)
    assert runtime.cpu_has_fast_bf16(tmp_path / "absent")  # e.g. a container without /proc/cpuinfo


def test_capability_string_and_onednn_query_do_not_decide(tmp_path, torch_probe_says, monkeypatch):
    """The issue's defect: torch says "AVX512" on an AMX Xeon; oneDNN says bf16 'supported' on any AVX-512BW CPU."""
    torch_probe_says(False, False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert runtime.cpu_has_fast_bf16(cpuinfo(tmp_path, XEON_AMX))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AMX")  # a string alone is not trusted
    assert not runtime.cpu_has_fast_bf16(cpuinfo(tmp_path, SKYLAKE))


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_means_the_same_in_every_resolver(monkeypatch, fast, expected):
    """extreme-poses / extreme3d (resolve_precision) and ns-extreme-align eval (resolve_dtype) agree."""
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast)
    cpu = torch.device("cpu")
    assert runtime.auto_precision_name(cpu) == expected
    precision = runtime.resolve_precision("auto", cpu)
    assert precision.name == expected
    assert precision.autocast == (torch.bfloat16 if fast else None)
    assert precision.weights == (torch.bfloat16 if fast else torch.float32)
    assert runtime.resolve_dtype("auto", cpu) == (torch.bfloat16 if fast else torch.float32)
    # MPS never gets bf16 from a CPU flag
    assert runtime.auto_precision_name(torch.device("mps")) == "fp32"


def test_auto_on_cuda(monkeypatch):
    for bf16, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert runtime.resolve_precision("auto", torch.device("cuda")).name == expected
        assert runtime.resolve_dtype("auto", torch.device("cuda")) == runtime.DTYPES[expected]


def test_explicit_names_and_errors():
    cpu = torch.device("cpu")
    assert runtime.resolve_dtype("fp16", cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        runtime.resolve_dtype("int8", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        runtime.resolve_precision("int8", cpu)


def test_this_machine_agrees_with_its_own_flags():
    """Where /proc/cpuinfo exists, the answer follows its flags (an AVX2-only CPU must stay fp32)."""
    flags = runtime.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    if flags & runtime.FAST_BF16_CPU_FLAGS:
        assert runtime.cpu_has_fast_bf16()
    elif "avx512f" not in flags:  # no AVX-512 at all: torch's probe cannot see AMX or AVX-512 BF16 either
        assert not runtime.cpu_has_fast_bf16()
        assert runtime.resolve_precision("auto", torch.device("cpu")).name == "fp32"


def test_bf16_precision_keeps_the_heads_float32_and_bf16_weights_narrows_them():
    """--dtype bf16 (autocast): the aggregator's matrices bf16, the camera head's float32 (the reference recipe);
    --dtype bf16-weights (no autocast, least memory): every Linear matrix bf16."""
    from ns_extreme.models.layers import Linear
    from ns_extreme.posing.loading import load_backbone
    from ns_extreme.posing.model_options import PoseModelOptions

    def dtypes(precision: str) -> dict[str, set]:
        opts = PoseModelOptions(model_size="tiny", weights="random", device="cpu", dtype=precision)
        backbone, _, _ = load_backbone(opts, say=lambda _: None)
        found: dict[str, set] = {}
        for name, module in backbone.model.named_modules():
            if isinstance(module, Linear):
                found.setdefault(name.split(".")[0], set()).add(module.weight.dtype)
        return found

    assert dtypes("bf16") == {"aggregator": {torch.bfloat16}, "camera_head": {torch.float32}}
    assert dtypes("bf16-weights") == {"aggregator": {torch.bfloat16}, "camera_head": {torch.bfloat16}}
    assert dtypes("fp32") == {"aggregator": {torch.float32}, "camera_head": {torch.float32}}
