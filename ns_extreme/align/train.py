"""Bias alignment training (``ns-extreme-align train``): tune only a few backbone biases with the rotation loss.

Everything but the chosen biases is frozen (``requires_grad=False``) and the optimizer holds only those
biases, so nothing else can change or hold gradients / optimizer state. Only the camera path of the model
runs (``heads=("camera",)``); heads stay frozen, as in the paper. Any registered backbone trains the same way:
``ModelSpec.w2c_rotations`` reads its predicted world-to-camera rotations (VGGT: pose encodings, π³:
camera-to-world poses) and ``ModelSpec.reference_frame`` says whether the first-camera anchor term applies.

Outputs under ``output_dir`` (nerfstudio-like):

- ``config.json``: the run's configuration;
- TensorBoard event files (``train/loss``, ``train/rel_error_deg``, ``train/anchor_error_deg``, ``train/lr``,
  ``train/grad_norm``);
- ``checkpoints/step-XXXXXX.ckpt``: resumable state (biases, optimizer, scheduler, step, RNG states, config),
  written atomically (temp file + rename), the last ``keep_checkpoints`` kept;
- ``biases.pth``: the tuned biases in the paper's released format ``{"bias_state_dict": {name: tensor}}``, loadable
  with ``load_model(alignment=path)`` (and ``biases_step-N.pth`` with every checkpoint if asked).

Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and returns (a second Ctrl-C aborts at once).
``resume=True`` continues from the newest checkpoint and gives the same result as an uninterrupted run: the
data order and augmentation are pure functions of (seed, epoch, pair index), and the optimizer / scheduler
state is restored exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pickle
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch
import tyro
from torch import nn
from typing_extensions import Annotated

from ns_extreme.align.console import say
from ns_extreme.align.data import (
    AugmentConfig,
    EpochBatchSampler,
    PairDataset,
    collate_pairs,
    load_pair_list,
    resolve_images_root,
)
from ns_extreme.align.loss import IterationWeighting, rotation_loss
from ns_extreme.io.atomic import atomic_write_json, check_output_location, torch_save_atomic
from ns_extreme.models import get_spec, load_model
from ns_extreme.models.bias import BiasSet, bias_state_dict, write_bias_checkpoint
from ns_extreme.models.registry import CAMERA_HEADS, ModelName, ModelSizeName, model_choices_help
from ns_extreme.runtime import DeviceName, resolve_device

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "model_config_for",
    "select_bias_names",
    "find_checkpoints",
    "latest_checkpoint",
    "read_train_checkpoint",
    "lr_factor",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ns_extreme.align.train"
CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r"^step-(\d+)\.ckpt$")

ModelSize = ModelSizeName


@dataclass
class TrainConfig:
    """Tune the paper's bias subset of a 3D foundation model on image pairs with the rotation-only geodesic loss.

    Known from the paper: the bias set, the loss, frozen heads, 2 epochs on ~65k pairs. Unknown (our defaults):
    optimizer settings, learning rate, schedule, batch size, resolution, augmentation (configs/align_vggt_paper.yaml
    marks which of its values come from the paper).
    """

    pairs: Path
    """Training pair list (JSON from `ns-extreme-align pairs`)."""
    output_dir: Path = Path("outputs/align")
    """Run folder: config.json, TensorBoard logs, checkpoints/, biases.pth."""
    images_root: Optional[Path] = None
    """Folder the pair list's image paths are relative to (default: the list's own `root`)."""
    max_pairs: Optional[int] = None
    """Use only the first N pairs of the list (smoke tests)."""

    model: Annotated[
        ModelName,
        tyro.conf.arg(help=model_choices_help() + " Models without a reference view get no first-camera anchor term."),
    ] = "vggt"
    weights: Optional[str] = None
    """Base weights: Hugging Face id, local file/folder, or `random` (default: the model's official weights)."""
    model_size: ModelSize = "full"
    """`tiny`: a few-MB model with the real parameter names, for smoke tests with `--weights random`."""
    init_alignment: str = "pretrained"
    """Biases to start from: `pretrained`, `aligned` (the paper's released checkpoint) or a bias checkpoint path."""
    bias_set: tuple[str, ...] = ("paper",)
    """Trainable parameters: `paper` (the paper's set: 73,728 biases in 8 blocks for VGGT, 82,944 in 9 decoder blocks
    for π³) or regular expressions full-matched against parameter names, e.g.
    `aggregator\\.global_blocks\\.23\\..*\\.bias` (VGGT) or `decoder\\.35\\..*\\.bias` (π³)."""

    epochs: int = 2
    """Passes over the pair list (paper: 2 epochs on ~65k pairs)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps in total (the schedule still spans all epochs; resumable)."""
    batch_size: int = 4
    """Pairs per optimizer step (not in the paper)."""
    lr: float = 1e-4
    """Peak AdamW learning rate (not in the paper)."""
    weight_decay: float = 0.0
    """AdamW weight decay (biases are usually not decayed)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 100
    """Linear warm-up steps from 0 to `lr`."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warm-up: cosine decay to `min_lr_ratio * lr` at the last step, or constant."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of `lr` (cosine schedule)."""
    grad_clip: float = 1.0
    """Clip the gradient norm of the trained biases to this (0 = no clipping)."""
    loss_iterations: IterationWeighting = "last"
    """Supervise the last camera-head iteration (as evaluated) or `all` iterations weighted 0.6^(n-1-i) (VGGT
    refines 4 times; π³ has a single camera estimate, for which both are the same)."""

    bf16: bool = False
    """bfloat16 autocast for the forward pass (the paper evaluates in bf16 on Ampere+ GPUs)."""
    gradient_checkpointing: bool = False
    """Recompute backbone activations in the backward pass: much less memory, ~30 % slower."""
    image_size: int = 518
    """Image width after the (VGGT-style) crop preprocessing, for every backbone (multiple of 14; the paper
    evaluates at 518)."""
    color_jitter: float = 0.0
    """Photometric jitter strength (brightness/contrast/saturation in [1-s, 1+s]; 0 = off)."""
    swap_prob: float = 0.5
    """Probability of presenting a pair in reverse order (GT rotations swapped with the images)."""
    cache_images: bool = False
    """Keep preprocessed images in memory (small pair lists only)."""

    seed: int = 0
    """Seed of the data order, augmentation and (with `--weights random`) the model."""
    device: DeviceName = "auto"
    """auto, cpu, cuda or mps."""
    num_workers: int = 0
    """Data-loading worker processes."""
    log_every: int = 10
    """Write TensorBoard scalars every N steps."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 3
    """Keep the newest N step checkpoints (0 = keep all)."""
    export_every_checkpoint: bool = False
    """Also write biases_step-N.pth (released format) with every checkpoint."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir/checkpoints."""
    progress: bool = True
    """Show a progress bar."""
    preset: Optional[Path] = None
    """YAML/JSON/TOML file of option defaults, e.g. configs/align_vggt_paper.yaml (its `train:` section);
    options given on the command line override it."""

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}"),
            (self.max_steps is None or self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}"),
            (self.max_pairs is None or self.max_pairs >= 1, f"--max-pairs must be >= 1, got {self.max_pairs}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 0, f"--keep-checkpoints must be >= 0, got {self.keep_checkpoints}"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (
                self.image_size > 0 and self.image_size % 14 == 0,
                f"--image-size must be a positive multiple of 14, got {self.image_size}",
            ),
            (len(self.bias_set) > 0, "--bias-set needs `paper` or at least one regular expression"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        AugmentConfig(self.color_jitter, self.swap_prob)  # validates
        get_spec(self.model)  # unknown model -> ValueError

    def to_json(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()
        }


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    """Optimizer steps done in total (including those before a resume)."""
    total_steps: int
    """Steps the schedule spans (epochs × batches per epoch)."""
    completed: bool
    """False when stopped by a signal (a checkpoint was written; continue with resume)."""
    bias_names: list[str]
    biases: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    """Per step of this invocation: step, loss, rel_error_deg, anchor_error_deg, lr, grad_norm, seconds."""
    checkpoint: Optional[Path] = None
    export: Optional[Path] = None
    stop_signal: Optional[int] = None
    """The signal that interrupted the run (SIGINT / SIGTERM), if any."""
    model: Optional[nn.Module] = field(default=None, repr=False)
    """The trained model (for inspection; the biases are also in ``biases``)."""
    optimizer: Optional[torch.optim.Optimizer] = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------------ helpers


def model_config_for(model: str, size: ModelSize) -> Any:
    """The config of ``model`` at ``size`` (``ModelSpec.config``)."""
    return get_spec(model).config(size)


def select_bias_names(model: nn.Module, model_name: str, bias_set: tuple[str, ...] | list[str]) -> list[str]:
    """Parameter names of ``paper`` (the model's paper set) and / or regular expressions (full match)."""
    spec = get_spec(model_name)
    names: list[str] = []
    patterns = [p for p in bias_set if p != "paper"]
    if "paper" in bias_set:
        names += spec.paper_bias_set.select(model)
    if patterns:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"--bias-set: invalid regular expression {p!r}: {err}") from None
        names += BiasSet("custom", tuple(patterns)).select(model)
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return sorted(set(names), key=order.__getitem__)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up, then cosine or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def find_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of ``output_dir/checkpoints/step-*.ckpt``, oldest first (temp files are ignored)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_file()]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    found = find_checkpoints(output_dir)
    return found[-1][1] if found else None


def read_train_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (weights_only=True) and check its format."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: refused: it holds pickled Python objects other than tensors (possibly code), which are never "
            "loaded (torch.load weights_only=True). Delete this file to resume from the previous checkpoint, or start "
            "a new --output-dir"
        ) from None
    except Exception as err:
        raise ValueError(
            f"{path}: not a readable training checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160] if str(err) else ''}); "
            "only plain tensors load (torch.load weights_only=True). Delete this file to resume from the previous "
            "checkpoint, or start a new --output-dir"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an ns-extreme-align training checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {ckpt.get('version')} is newer than this build reads ({CHECKPOINT_VERSION})"
        )
    return ckpt


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _ignore_sigint(worker_id: int) -> None:
    """Data workers ignore Ctrl-C: the main process stops cleanly after the current step instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StopFlag:
    """SIGINT / SIGTERM set a flag the loop checks after each step; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopFlag"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signum
            log.warning(
                "received %s: finishing the current step, then writing a checkpoint", signal.Signals(signum).name
            )

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _write_checkpoint(
    output_dir: Path,
    step: int,
    epoch: int,
    model: nn.Module,
    names: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    total_steps: int,
) -> Path:
    path = output_dir / "checkpoints" / f"step-{step:06d}.ckpt"
    torch_save_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "epoch": epoch,
            "total_steps": total_steps,
            "model": cfg.model,
            "bias_names": list(names),
            "biases": bias_state_dict(model, names),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "config": json.dumps(cfg.to_json()),
        },
        path,
    )
    if cfg.export_every_checkpoint:
        write_bias_checkpoint(output_dir / f"biases_step-{step}.pth", bias_state_dict(model, names))
    if cfg.keep_checkpoints > 0:
        for _, old in find_checkpoints(output_dir)[: -cfg.keep_checkpoints]:
            with contextlib.suppress(OSError):
                old.unlink()
    return path


def _check_resume_compatible(
    ckpt: dict[str, Any], cfg: TrainConfig, names: list[str], total_steps: int, path: Path
) -> None:
    if ckpt.get("model") != cfg.model:
        raise ValueError(f"{path}: checkpoint is for model {ckpt.get('model')!r}, not {cfg.model!r}")
    if list(ckpt.get("bias_names", [])) != names:
        raise ValueError(
            f"{path}: checkpoint trains a different bias set "
            f"({len(ckpt.get('bias_names', []))} tensors vs {len(names)})"
        )
    if ckpt.get("total_steps") != total_steps:
        raise ValueError(
            f"{path}: the schedule spanned {ckpt.get('total_steps')} steps, now {total_steps} "
            "(--epochs, --batch-size or the pair list changed); resume with the same settings"
        )


# ------------------------------------------------------------------------------------------------ training


def train(cfg: TrainConfig, *, console: Any = None) -> TrainResult:
    """Run (or resume) bias alignment as configured; returns what was done. Raises ValueError / FileNotFoundError
    subclasses for user mistakes (bad pair list, missing images, bad checkpoint, ...)."""
    cfg.validate()
    spec = get_spec(cfg.model)
    output_dir = Path(cfg.output_dir)
    existing = find_checkpoints(output_dir)
    if existing and not cfg.resume:
        raise FileExistsError(
            f"{output_dir} already holds training checkpoints (newest step {existing[-1][0]}); "
            "pass --resume to continue, or choose another --output-dir"
        )
    check_output_location(output_dir, "--output-dir", inside=True)  # before the model loads
    resume_path = existing[-1][1] if (cfg.resume and existing) else None
    ckpt = read_train_checkpoint(resume_path) if resume_path is not None else None

    pairs = load_pair_list(cfg.pairs)
    if cfg.max_pairs is not None:
        pairs.records = pairs.records[: cfg.max_pairs]
    root = resolve_images_root(pairs, cfg.pairs, cfg.images_root)
    dataset = PairDataset(
        pairs,
        root,
        image_size=cfg.image_size,
        augment=AugmentConfig(cfg.color_jitter, cfg.swap_prob),
        seed=cfg.seed,
        cache=cfg.cache_images,
    )

    device = resolve_device(cfg.device)
    model = load_model(
        cfg.model,
        weights=cfg.weights,
        alignment=cfg.init_alignment,
        device=device,
        dtype=torch.float32,
        config=model_config_for(cfg.model, cfg.model_size),
        seed=cfg.seed,
    )
    names = select_bias_names(model, cfg.model, cfg.bias_set)
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    trainable = [params[n] for n in names]
    if {n for n, p in model.named_parameters() if p.requires_grad} != set(names):  # load_model froze everything
        raise RuntimeError("internal error: parameters outside the bias set require gradients")
    model.eval()  # no dropout / batch norm in these backbones; eval keeps inference behaviour identical
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)

    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    per_epoch = EpochBatchSampler.batches_per_epoch(len(dataset), cfg.batch_size)
    total_steps = cfg.epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio)
    )

    step = 0
    if ckpt is not None:
        _check_resume_compatible(ckpt, cfg, names, total_steps, resume_path)
        with torch.no_grad():
            for n in names:
                params[n].copy_(ckpt["biases"][n].to(params[n]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        log.info("resumed from %s at step %d", resume_path, step)
    else:
        if cfg.resume:
            say(console, f"--resume: no checkpoint in {output_dir / 'checkpoints'}, starting from step 0")
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        torch.manual_seed(cfg.seed)

    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / "config.json", cfg.to_json())
    stop_at = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    n_params = sum(p.numel() for p in trainable)
    say(
        console,
        f"{model.load_report.summary()}\n"
        f"training {n_params:,} parameters in {len(names)} tensors on the relative-rotation loss"
        + (" + first-camera anchor" if spec.reference_frame else " (no anchor term)")
        + f"; {len(dataset)} pairs, {per_epoch} steps/epoch, "
        f"{cfg.epochs} epochs = {total_steps} steps"
        + (f" (stopping at {stop_at})" if stop_at < total_steps else "")
        + (f"; resuming at step {step}" if ckpt is not None else ""),
    )

    writer = _LazySummaryWriter(str(output_dir), purge_step=step if ckpt is not None else None)
    history: list[dict[str, float]] = []
    stop = _StopFlag()
    last_ckpt: Optional[Path] = resume_path
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop_at, initial=min(step, stop_at), desc="align", unit="step", dynamic_ncols=True)
    try:
        with stop.installed():
            while step < stop_at and not stop:
                epoch, start = divmod(step, per_epoch)
                sampler = EpochBatchSampler(len(dataset), cfg.batch_size, epoch, cfg.seed, shuffle=True, start=start)
                loader = torch.utils.data.DataLoader(
                    dataset,
                    batch_sampler=sampler,
                    collate_fn=collate_pairs,
                    num_workers=cfg.num_workers,
                    worker_init_fn=_ignore_sigint if cfg.num_workers > 0 else None,
                )
                for batch in loader:
                    t0 = time.perf_counter()
                    images = batch["images"].to(device, non_blocking=True)
                    R_gt = batch["R_gt"].to(device, torch.float32)
                    with autocast:
                        out = model(images, heads=CAMERA_HEADS)
                    loss = rotation_loss(spec.w2c_rotations(out), R_gt, spec.reference_frame, cfg.loss_iterations)
                    if not torch.isfinite(loss.loss):
                        raise FloatingPointError(
                            f"non-finite loss at step {step} (NaN/Inf in the model outputs): check --weights and "
                            "--init-alignment, lower --lr, or disable --bf16"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.loss.backward()
                    if cfg.grad_clip > 0:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
                    else:
                        grad_norm = float(
                            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trainable]))
                        )
                    if not math.isfinite(grad_norm):
                        # e.g. π³'s SVD camera head when its 3x3 output is already orthonormal to float precision:
                        # stop before the optimizer writes NaN into the biases (and into the next checkpoint)
                        raise FloatingPointError(
                            f"non-finite gradient at step {step} (loss "
                            f"{float(loss.loss.detach()):.4g}): stopped before "
                            "updating the biases, earlier checkpoints are intact; check --weights and "
                            "--init-alignment, "
                            "lower --lr, or disable --bf16"
                        )
                    lr = optimizer.param_groups[0]["lr"]
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    record = {
                        "step": step,
                        "loss": float(loss.loss.detach()),
                        "rel_error_deg": float(torch.rad2deg(loss.rel_error).mean()),
                        "anchor_error_deg": float(torch.rad2deg(loss.anchor_error).mean()),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "seconds": time.perf_counter() - t0,
                    }
                    history.append(record)
                    if step % cfg.log_every == 0 or step == stop_at:
                        for key in ("loss", "rel_error_deg", "anchor_error_deg", "lr", "grad_norm"):
                            writer.add_scalar(f"train/{key}", record[key], step)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{record['loss']:.4f}", err=f"{record['rel_error_deg']:.1f}°", refresh=False
                        )
                    if step % cfg.checkpoint_every == 0 and step < stop_at:
                        last_ckpt = _write_checkpoint(
                            output_dir, step, epoch, model, names, optimizer, scheduler, cfg, total_steps
                        )
                    if step >= stop_at or stop:
                        break
            found = find_checkpoints(output_dir)
            if found and found[-1][0] == step:
                last_ckpt = found[-1][1]
            else:
                last_ckpt = _write_checkpoint(
                    output_dir, step, step // per_epoch, model, names, optimizer, scheduler, cfg, total_steps
                )
    finally:
        if bar is not None:
            bar.close()
        writer.flush()
        writer.close()

    biases = bias_state_dict(model, names)
    completed = not stop
    export = None
    if completed:
        export = output_dir / "biases.pth"
        write_bias_checkpoint(export, biases)
        say(console, f"done at step {step}/{total_steps}: tuned biases in {export} (load with --alignment {export})")
    else:
        say(console, f"interrupted at step {step}/{total_steps}: checkpoint {last_ckpt}; continue with --resume")
    return TrainResult(
        output_dir=output_dir,
        step=step,
        total_steps=total_steps,
        completed=completed,
        bias_names=names,
        biases=biases,
        history=history,
        checkpoint=last_ckpt,
        export=export,
        stop_signal=stop.signal,
        model=model,
        optimizer=optimizer,
    )


class _LazySummaryWriter:
    """TensorBoard's SummaryWriter, created at the first scalar: a run that fails before its first logged step
    (unreadable image, NaN loss) leaves no event file, and does not pay for importing tensorboard."""

    def __init__(self, log_dir: str, purge_step: Optional[int]) -> None:
        self.log_dir, self.purge_step = log_dir, purge_step
        self._writer: Any = None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=self.purge_step)
        self._writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
