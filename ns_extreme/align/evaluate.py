"""Relative-rotation evaluation (``ns-extreme-align eval``), the paper's protocol (arXiv 2511.22686).

Each pair runs alone as a 2-image sequence (VGGT crop preprocessing at ``image_size``, the two images padded
to a common shape with white), under ``no_grad`` and optional low-precision autocast. The predicted relative
rotation ``R2 · R1ᵀ`` of the two world-to-camera rotations (the backbone's final camera estimate, read by
``ModelSpec.w2c_rotations``: VGGT's pose encoding, π³'s transposed camera-to-world rotations) is compared
with the GT ``R2gt · R1gtᵀ``; per
overlap class (large / small / none / all) we report MRE (median error, degrees), RA15 and RA30 (% of pairs
with error ≤ 15° / ≤ 30°) for every compared model, side by side.

Outputs in ``output_dir``: ``report.json`` (configuration, per-model load reports and summaries, per-pair GT and
errors), ``errors_hist.png`` and ``errors_cdf.png``. All written atomically.

Models are given as ``--models`` entries ``[label=]alignment``: ``pretrained``, ``aligned`` (the paper's released
biases) or a path to a bias checkpoint (e.g. a training run's ``biases.pth``). A custom predictor (any callable
from a collated batch to ``[B, 2, 3, 3]`` world-to-camera rotations) can be passed to ``evaluate`` instead of
loading a model (tests use a GT oracle).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import tyro
from typing_extensions import Annotated

from ns_extreme import distributed
from ns_extreme.align.console import say
from ns_extreme.align.data import PairDataset, collate_pairs, load_pair_list, resolve_images_root
from ns_extreme.align.metrics import format_table, rotation_errors_deg, summarize
from ns_extreme.align.train import ModelSize, model_config_for
from ns_extreme.geometry.rotations import geodesic_angle_deg, relative_rotation
from ns_extreme.io.atomic import atomic_write_json, check_output_location
from ns_extreme.models import get_spec, load_model
from ns_extreme.models.registry import CAMERA_HEADS, ModelName, model_choices_help
from ns_extreme.models.rotation_readers import W2cRotationReader
from ns_extreme.runtime import DeviceName, DtypeName, resolve_device, resolve_dtype

__all__ = [
    "EvalConfig", "EvalResult", "AlignmentArg", "parse_alignment_arg", "parse_alignment_args", "evaluate",
    "predict_rotations", "model_predictor",
]  # fmt: skip

REPORT_FORMAT = "ns_extreme.align_eval"
REPORT_VERSION = 1

Predictor = Callable[[Mapping[str, Any]], torch.Tensor]
"""Collated batch (``images [B, 2, 3, H, W]``, ``R_gt``, ...) -> predicted w2c rotations ``[B, 2, 3, 3]``."""


@dataclass
class EvalConfig:
    """Evaluate relative rotation on a pair list: MRE / RA15 / RA30 per overlap class, models side by side."""

    pairs: Path
    """Evaluation pair list (JSON from `ns-extreme-align pairs`)."""
    models: tuple[str, ...] = ("pretrained", "aligned")
    """Models to compare, each `[label=]alignment`: `pretrained`, `aligned` (the paper's biases), or a bias
    checkpoint path, e.g. `pretrained aligned mine=outputs/align/biases.pth`."""
    output_dir: Path = Path("outputs/align_eval")
    """Folder for report.json and the plots."""
    images_root: Optional[Path] = None
    """Folder the pair list's image paths are relative to (default: the list's own `root`)."""
    max_pairs: Optional[int] = None
    """Evaluate only the first N pairs."""

    model: Annotated[ModelName, tyro.conf.arg(help=model_choices_help())] = "vggt"
    weights: Optional[str] = None
    """Base weights: Hugging Face id, local file/folder, or `random` (default: the model's official weights)."""
    model_size: ModelSize = "full"
    """`tiny`: a few-MB test model (with `--weights random`)."""
    image_size: int = 518
    """Image width after VGGT's crop preprocessing (the paper: 518)."""
    device: DeviceName = "auto"
    """auto, cpu, cuda or mps."""
    dtype: DtypeName = "auto"
    """Autocast precision of the forward pass: auto (bf16 on Ampere+ GPUs / fast-bf16 CPUs, as the paper), fp32,
    bf16, fp16. Weights stay fp32."""
    batch_size: int = 1
    """Pairs per forward pass (each pair is still its own 2-image sequence)."""
    num_workers: int = 0
    """Data-loading worker processes."""
    seed: int = 0
    """Seed for `--weights random`."""
    progress: bool = True
    """Show a progress bar."""
    plots: bool = True
    """Write errors_hist.png and errors_cdf.png."""
    preset: Optional[Path] = None
    """YAML/JSON/TOML file of option defaults (its `eval:` section); command-line options override it."""
    view: bool = False
    """After evaluating, browse the pairs (images, predicted vs ground-truth pose, error) in the browser."""
    view_host: str = "127.0.0.1"
    """Address the pair browser listens on (loopback by default)."""
    view_port: int = 8080
    """Port of the pair browser."""
    collective_timeout: float = 1800.0
    """Under torchrun: seconds a rank waits for the others before it stops with an error (a rank that died)."""

    def validate(self) -> None:
        if not self.models:
            raise ValueError("--models needs at least one entry (pretrained, aligned or a bias checkpoint path)")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"--max-pairs must be >= 1, got {self.max_pairs}")
        if self.image_size <= 0 or self.image_size % 14:
            raise ValueError(f"--image-size must be a positive multiple of 14, got {self.image_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        get_spec(self.model)
        parse_alignment_args(self.models)


@dataclass(frozen=True)
class AlignmentArg:
    """One ``--models`` entry: a label for the report and the alignment (biases) to load the backbone with."""

    label: str
    alignment: str
    """``pretrained``, ``aligned`` or a bias checkpoint path."""


_LABEL_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_alignment_arg(entry: str) -> AlignmentArg:
    """``pretrained`` | ``aligned`` | ``path`` | ``label=pretrained|aligned|path``; a path's label is its file stem
    (``biases``: its folder's name)."""
    entry = entry.strip()
    if not entry:
        raise ValueError("empty --models entry; use pretrained, aligned or [label=]path/to/biases.pth")
    label, sep, alignment = entry.partition("=")
    if not sep:
        alignment = entry
        if entry in ("pretrained", "aligned"):
            label = entry
        else:
            p = Path(entry)
            label = p.parent.name if p.stem in ("biases", "") and p.parent.name else p.stem
    label, alignment = label.strip(), alignment.strip()
    if not label or not _LABEL_RE.match(label):
        raise ValueError(f"--models entry {entry!r}: label must be letters, digits, '_', '-', '.', '+' (got {label!r})")
    if not alignment:
        raise ValueError(f"--models entry {entry!r} has no alignment after '='")
    if alignment not in ("pretrained", "aligned") and not Path(alignment).is_file():
        raise FileNotFoundError(f"--models entry {entry!r}: bias checkpoint {alignment} not found")
    return AlignmentArg(label, alignment)


def parse_alignment_args(entries: tuple[str, ...] | list[str]) -> list[AlignmentArg]:
    out = [parse_alignment_arg(s) for s in entries]
    labels = [m.label for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"model labels must be unique, repeated: {dup} (name them: label=path)")
    return out


@dataclass
class EvalResult:
    report: dict[str, Any]
    errors: dict[str, np.ndarray]
    """Per model label: per-pair errors in degrees (pair-list order)."""
    summaries: dict[str, dict[str, dict[str, Any]]]
    table: str
    report_path: Path
    plot_paths: list[Path]


def model_predictor(
    model: torch.nn.Module,
    device: torch.device,
    autocast_dtype: Optional[torch.dtype],
    w2c_rotations: W2cRotationReader,
) -> Predictor:
    """Predictor running the camera path of a model on each pair (no_grad, optional autocast); ``w2c_rotations``
    is the model's ``ModelSpec.w2c_rotations`` (its last camera estimate is evaluated)."""

    def predict(batch: Mapping[str, Any]) -> torch.Tensor:
        images = batch["images"].to(device)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ),
        ):
            out = model(images, heads=CAMERA_HEADS)
        R_w2c = w2c_rotations(out)[-1].float()
        if not torch.isfinite(R_w2c).all():
            bad = [int(i) for i, ok in zip(batch["index"], torch.isfinite(R_w2c).flatten(1).all(1)) if not ok]
            raise FloatingPointError(
                f"the model produced NaN/Inf camera outputs for pair(s) {bad[:5]}: check --weights and the bias "
                "checkpoint, or use --dtype fp32"
            )
        return R_w2c.cpu()

    return predict


def predict_rotations(
    predictor: Predictor,
    dataset: PairDataset,
    batch_size: int = 1,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "",
    indices: Optional[list[int]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run a predictor over a dataset in order: (predicted relative rotations [N, 3, 3], GT ones [N, 3, 3]).

    ``indices``: only these pairs (a rank's shard); the rows of the others stay NaN."""
    # Pairs are batched only with pairs of the same preprocessed shape, so batching never adds padding: every
    # pair sees exactly the input it would see alone (the paper's protocol).
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i in range(len(dataset)) if indices is None else indices:
        by_shape.setdefault(dataset.expected_shape(i), []).append(i)
    batches = [idx[b : b + batch_size] for idx in by_shape.values() for b in range(0, len(idx), batch_size)]
    batches.sort(key=lambda b: b[0])
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate_pairs, num_workers=num_workers
    )
    pred_rel = np.full((len(dataset), 3, 3), np.nan if indices is not None else 0.0)
    gt_rel = pred_rel.copy()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(dataset) if indices is None else len(indices)
        bar = tqdm(total=total, desc=desc or "eval", unit="pair", dynamic_ncols=True)
    try:
        for batch in loader:
            R = predictor(batch).detach().to("cpu", torch.float64).numpy()
            R_gt = batch["R_gt"].to(torch.float64).numpy()
            if R.shape != R_gt.shape:
                raise ValueError(f"predictor returned {R.shape}, expected {R_gt.shape}")
            idx = batch["index"].numpy()
            pred_rel[idx] = relative_rotation(R[:, 0], R[:, 1])
            gt_rel[idx] = relative_rotation(R_gt[:, 0], R_gt[:, 1])
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return pred_rel, gt_rel


def _json_float(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


def _json_matrix(M: np.ndarray) -> Optional[list[list[float]]]:
    return M.tolist() if np.all(np.isfinite(M)) else None


def evaluate(
    cfg: EvalConfig, *, predictors: Optional[Mapping[str, Predictor]] = None, console: Any = None
) -> Optional[EvalResult]:
    """Evaluate every model of ``cfg.models`` (or the given ``predictors``, label -> predictor) and write the report.

    Under torchrun the pairs are sharded over the ranks (round-robin) and gathered on rank 0, which writes the
    same report as one process and returns the result; the other ranks return None."""
    cfg.validate()
    device = resolve_device(cfg.device)
    with distributed.process_group(device, cfg.collective_timeout):
        return _evaluate(cfg, device, predictors, console if distributed.is_main_process() else None)


def _gather_rows(indices: list[int], pred_rel: np.ndarray, gt_rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank 0: every rank's rows of its shard put together (a no-op in one process)."""
    parts = distributed.gather_object((indices, pred_rel[indices], gt_rel[indices]))
    if parts is None or len(parts) == 1:
        return pred_rel, gt_rel
    for idx, pred, gt in parts:
        pred_rel[idx], gt_rel[idx] = pred, gt
    return pred_rel, gt_rel


def _evaluate(
    cfg: EvalConfig, device: torch.device, predictors: Optional[Mapping[str, Predictor]], console: Any
) -> Optional[EvalResult]:
    main = distributed.is_main_process()
    check_output_location(cfg.output_dir, "--output-dir", inside=True)  # before minutes of inference
    distributed.check_same_on_all_ranks("options or pair lists", [repr(cfg), distributed.file_fingerprint(cfg.pairs)])
    pairs = load_pair_list(cfg.pairs)
    if cfg.max_pairs is not None:
        pairs.records = pairs.records[: cfg.max_pairs]
    root = resolve_images_root(pairs, cfg.pairs, cfg.images_root)
    dataset = PairDataset(pairs, root, image_size=cfg.image_size, cache=False)
    labels = pairs.overlap_labels()
    shard = distributed.shard(range(len(dataset))) if distributed.world_size() > 1 else None

    dtype = resolve_dtype(cfg.dtype, device)
    autocast_dtype = None if dtype == torch.float32 else dtype
    errors: dict[str, np.ndarray] = {}
    pred_angles: dict[str, np.ndarray] = {}
    pred_rels: dict[str, np.ndarray] = {}
    models_report: dict[str, Any] = {}
    gt_rel = None

    if predictors is not None:
        jobs: list[tuple[str, Any]] = [(label, p) for label, p in predictors.items()]
    else:
        jobs = [(m.label, m) for m in parse_alignment_args(cfg.models)]
    for label, job in jobs:
        t0 = time.perf_counter()
        if isinstance(job, AlignmentArg):
            model = load_model(
                cfg.model,
                weights=cfg.weights,
                alignment=job.alignment,
                device=device,
                dtype=torch.float32,
                config=model_config_for(cfg.model, cfg.model_size),
                seed=cfg.seed,
            )
            predictor = model_predictor(model, device, autocast_dtype, get_spec(cfg.model).w2c_rotations)
            load_report = model.load_report
            entry: dict[str, Any] = {
                "alignment": job.alignment,
                "load_report": {
                    "summary": load_report.summary(),
                    "weights": load_report.weights,
                    "weights_fingerprint": load_report.weights_fingerprint,
                    "licence": load_report.licence,
                    "alignment_parameters": load_report.alignment.parameters if load_report.alignment else 0,
                },
            }
            say(console, load_report.summary())
        else:
            model, predictor, entry = None, job, {"alignment": "custom predictor"}
        pred_rel, gt = predict_rotations(
            predictor, dataset, cfg.batch_size, cfg.num_workers, cfg.progress and main, desc=label, indices=shard
        )
        if shard is not None:
            pred_rel, gt = _gather_rows(shard, pred_rel, gt)
            if not main:
                del model, predictor
                continue
        gt_rel = gt
        errors[label] = rotation_errors_deg(pred_rel, gt)
        pred_angles[label] = geodesic_angle_deg(pred_rel, np.eye(3))
        pred_rels[label] = pred_rel
        entry["seconds"] = time.perf_counter() - t0
        models_report[label] = entry
        del model, predictor

    if not main:
        return None
    summaries = {label: summarize(e, labels) for label, e in errors.items()}
    for label in summaries:
        models_report[label]["summary"] = summaries[label]
    table = format_table(summaries)
    assert gt_rel is not None
    gt_angles = geodesic_angle_deg(gt_rel, np.eye(3))

    per_pair = []
    for i, rec in enumerate(pairs.records):
        per_pair.append(
            {
                "index": i,
                "scene": rec.scene,
                "image1": rec.view1.path,
                "image2": rec.view2.path,
                "overlap": rec.overlap,
                "gt_angle_deg": float(gt_angles[i]),
                "errors_deg": {label: _json_float(float(e[i])) for label, e in errors.items()},
                "pred_angle_deg": {label: _json_float(float(a[i])) for label, a in pred_angles.items()},
                "gt_rel_rotation": _json_matrix(gt_rel[i]),
                "pred_rel_rotation": {label: _json_matrix(R[i]) for label, R in pred_rels.items()},
            }
        )
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "pairs_file": str(cfg.pairs),
        "images_root": str(root),
        "num_pairs": len(pairs),
        "counts": pairs.counts(),
        "model": cfg.model,
        "image_size": cfg.image_size,
        "device": str(device),
        "autocast": None if autocast_dtype is None else str(autocast_dtype).replace("torch.", ""),
        "metrics": "MRE = median error (deg); RA15 / RA30 = % of pairs with error <= 15 / 30 deg",
        "models": models_report,
        "table": table,
        "pairs": per_pair,
    }
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_paths: list[Path] = []
    if cfg.plots:
        from ns_extreme.align.plots import plot_error_cdfs, plot_error_histograms

        plot_paths.append(plot_error_histograms(errors, labels, out_dir / "errors_hist.png"))
        plot_paths.append(plot_error_cdfs(errors, labels, out_dir / "errors_cdf.png"))
    report["plots"] = [p.name for p in plot_paths]
    report_path = atomic_write_json(out_dir / "report.json", report)
    say(console, table)
    say(console, f"report: {report_path}" + (f"; plots: {', '.join(str(p) for p in plot_paths)}" if plot_paths else ""))
    return EvalResult(report, errors, summaries, table, report_path, plot_paths)
