"""``--compile``: torch.compile of the model forward (inductor, frozen weights on CPU), and its clear error where
inductor cannot run."""

from __future__ import annotations

import pytest
import torch

from ns_extreme.cli.runtime import user_error_message
from ns_extreme.models.compiled import CompileUnavailableError, compile_for_inference, cpu_compiler
from ns_extreme.posing.loading import load_backbone
from ns_extreme.posing.model_options import PoseModelOptions

TINY = dict(model_size="tiny", weights="random", alignment="pretrained", device="cpu", dtype="fp32")


def test_compile_without_a_cpu_compiler_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cpu_compiler() is None
    with pytest.raises(CompileUnavailableError, match="needs a C\\+\\+ compiler") as info:
        load_backbone(PoseModelOptions(compile=True, **TINY), say=lambda _: None)
    message = user_error_message(info.value, "out of memory")
    assert message is not None and "run without --compile" in message


def test_compile_is_off_by_default_and_leaves_the_model_eager():
    assert PoseModelOptions().compile is False
    backbone, _, _ = load_backbone(PoseModelOptions(**TINY), say=lambda _: None)
    assert getattr(backbone.model, "_compiled_call_impl", None) is None


@pytest.mark.slow  # inductor compiles for one to three minutes on 2 cores
def test_compiled_forward_matches_eager():
    if cpu_compiler() is None:
        pytest.skip("no C++ compiler")
    from ns_extreme.models.vggt import VGGT, VGGTConfig

    torch.manual_seed(0)
    model = VGGT(VGGTConfig.tiny()).eval()
    x = torch.rand(1, 2, 3, 42, 56)
    with torch.no_grad():
        eager = model(x, heads=("camera", "depth"))
        compiled = compile_for_inference(model, torch.device("cpu"))(x, heads=("camera", "depth"))
    assert compiled.keys() == eager.keys()
    torch.testing.assert_close(compiled["pose_enc"], eager["pose_enc"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled["depth"], eager["depth"], rtol=1e-4, atol=1e-4)
