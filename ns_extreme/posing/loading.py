"""``load_backbone``: the posing adapter of ``PoseModelOptions``' model, loaded as the registry describes it."""

from __future__ import annotations

from typing import Any, Callable, Optional

from ns_extreme.posing.model_options import PoseModelOptions


def load_backbone(
    opts: PoseModelOptions, compare_pretrained: bool = False, say: Callable[[str], None] = print, splats: bool = False
) -> tuple[Any, Optional[Any], Any]:
    """Load the model named by ``opts``; returns (posing backbone, pretrained backbone to compare with or None,
    load report). ``say`` prints notes for the user. ``splats``: also run the model's 3D Gaussian head."""
    from ns_extreme.models import get_spec, load_model
    from ns_extreme.models.registry import resolve
    from ns_extreme.runtime import resolve_device, resolve_precision

    spec = get_spec(opts.model)
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.dtype, device)
    adapter = resolve(spec.posing_adapter)
    model_config = spec.config(opts.model_size)
    target_size = spec.network_input_size(opts.model_size)
    alignment: Optional[str] = opts.alignment
    if opts.model_size == "tiny" and alignment == "aligned":
        say("note: --model-size tiny: the released alignment does not fit the tiny model; using pretrained biases")
        alignment = "pretrained"
    weights = opts.weights or spec.default_weights
    heads, extra = spec.posing_heads, {}
    if splats:
        check_splats_supported(opts.model)
        heads, extra = (*(heads or ()), spec.splat_head), {"splats": True}

    def build(align: Optional[str]):
        return load_model(
            opts.model,
            weights,
            align,
            device,
            precision.params,
            model_config,
            storage_dtype=precision.weights,
            heads=heads,
            narrow_heads=precision.narrow_heads,
        )

    model = build(alignment)
    report = model.load_report
    if opts.compile:
        from ns_extreme.models.compiled import compile_for_inference

        compile_for_inference(model, device)
    backbone = adapter(model, dtype=precision.compute, target_size=target_size, name=opts.model, **extra)
    compare = None
    if compare_pretrained:
        if alignment in (None, "pretrained"):
            raise ValueError("--compare-pretrained needs an alignment to compare with (not --alignment pretrained)")
        other = build("pretrained")
        if opts.compile:
            compile_for_inference(other, device)
        compare = adapter(
            other, dtype=precision.compute, target_size=target_size, name=f"{opts.model}-pretrained", **extra
        )
    return backbone, compare, report


def check_splats_supported(model: str) -> None:
    """``--write-splats`` needs a model with a 3D Gaussian head (``ModelSpec.splat_head``)."""
    from ns_extreme.models.registry import MODELS, get_spec

    if get_spec(model).splat_head is None:
        able = [name for name, spec in MODELS.items() if spec.splat_head is not None]
        raise ValueError(f"--write-splats: {model} predicts no 3D Gaussians; use --model {' or '.join(able)}")
