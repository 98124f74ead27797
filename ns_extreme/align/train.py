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
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
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

from ns_extreme import distributed
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
from ns_extreme.runtime import DeviceName, auto_precision_name, resolve_device

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
    "Trainer",
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

    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision of the forward pass; the biases, the optimizer and the loss stay float32. auto: bf16 on
    GPUs with bfloat16 (Ampere+) and CPUs with AMX / AVX-512 BF16 (the same rule as every command's --dtype
    auto), else fp32. Never fp16: it would need loss scaling."""
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
    logger: Literal["tensorboard", "wandb"] = "tensorboard"
    """Where the training curves go: TensorBoard event files in output_dir, or a Weights & Biases run in
    output_dir/wandb (needs `pip install wandb`; offline unless WANDB_MODE=online, sync later with `wandb sync`)."""
    collective_timeout: float = 1800.0
    """Under torchrun: seconds a rank waits for the others in a collective before it stops with an error (a rank
    that died or hangs); must cover rank 0 writing a checkpoint."""
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
        world = distributed.env_world_size()
        if self.batch_size % world:
            raise ValueError(
                f"--batch-size {self.batch_size} (the global batch) does not divide over {world} ranks: use a "
                f"multiple of {world}, e.g. {max(world, self.batch_size // world * world)}"
            )
        if self.collective_timeout <= 0:
            raise ValueError(f"--collective-timeout must be positive, got {self.collective_timeout}")
        if self.logger == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ValueError("--logger wandb needs the wandb package (pip install wandb), or use --logger tensorboard")
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
    run_config: dict[str, Any],
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
            "config": json.dumps(run_config),
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
    subclasses for user mistakes (bad pair list, missing images, bad checkpoint, ...).

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this: the process group is started here and closed on
    the way out (see ``Trainer``)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    with distributed.process_group(device, cfg.collective_timeout):
        trainer = Trainer(cfg, device, console)
        trainer.setup()
        return trainer.train()


class Trainer:
    """One training run, in the shape of nerfstudio's ``Trainer``: ``setup`` (data, model, optimizer, resume),
    ``train_step`` (one optimizer step on a global batch), ``save_checkpoint`` / ``load_checkpoint``, ``train``.

    Data parallel over the ranks of the process group (if any): each global batch of ``batch_size`` pairs is
    split into contiguous rank slices, each rank's loss is its pairs' sum divided by the *global* batch size and
    the bias gradients are summed over the ranks (one all-reduce of the few trainable tensors, as DDP's single
    bucket would), so every rank takes the same step as one process on the whole batch, to float round-off.
    Only rank 0 logs, shows progress and writes files.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, console: Any = None) -> None:
        self.cfg = cfg
        self.device = device
        precision = auto_precision_name(device) if cfg.dtype == "auto" else cfg.dtype
        self.autocast_bf16 = precision == "bf16"
        self.console = console if distributed.is_main_process() else None
        self.spec = get_spec(cfg.model)
        self.output_dir = Path(cfg.output_dir)
        self.world_size = distributed.world_size()
        self.rank = distributed.rank()
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.resume_path: Optional[Path] = None

    # -------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.cfg
        existing = find_checkpoints(self.output_dir)
        if existing and not cfg.resume:
            raise FileExistsError(
                f"{self.output_dir} already holds training checkpoints (newest step {existing[-1][0]}); "
                "pass --resume to continue, or choose another --output-dir"
            )
        check_output_location(self.output_dir, "--output-dir", inside=True)  # before the model loads
        distributed.check_same_on_all_ranks(
            "options or pair lists", {"options": cfg.to_json(), "pairs": distributed.file_fingerprint(cfg.pairs)}
        )
        self.resume_path = existing[-1][1] if (cfg.resume and existing) else None
        ckpt = read_train_checkpoint(self.resume_path) if self.resume_path is not None else None

        pairs = load_pair_list(cfg.pairs)
        if cfg.max_pairs is not None:
            pairs.records = pairs.records[: cfg.max_pairs]
        root = resolve_images_root(pairs, cfg.pairs, cfg.images_root)
        self.dataset = PairDataset(
            pairs,
            root,
            image_size=cfg.image_size,
            augment=AugmentConfig(cfg.color_jitter, cfg.swap_prob),
            seed=cfg.seed,
            cache=cfg.cache_images,
        )

        self.model = load_model(
            cfg.model,
            weights=cfg.weights,
            alignment=cfg.init_alignment,
            device=self.device,
            dtype=torch.float32,
            config=model_config_for(cfg.model, cfg.model_size),
            seed=cfg.seed,
        )
        model = self.model
        self.names = select_bias_names(model, cfg.model, cfg.bias_set)
        self.params = dict(model.named_parameters())
        model.requires_grad_(False)
        for n in self.names:
            self.params[n].requires_grad_(True)
        self.trainable = [self.params[n] for n in self.names]
        if {n for n, p in model.named_parameters() if p.requires_grad} != set(self.names):
            raise RuntimeError("internal error: parameters outside the bias set require gradients")
        model.eval()  # no dropout / batch norm in these backbones; eval keeps inference behaviour identical
        model.set_gradient_checkpointing(cfg.gradient_checkpointing)

        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.per_epoch = EpochBatchSampler.batches_per_epoch(len(self.dataset), cfg.batch_size)
        self.total_steps = cfg.epochs * self.per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg.warmup_steps, self.total_steps, cfg.schedule, cfg.min_lr_ratio),
        )
        if ckpt is not None:
            self.load_checkpoint(ckpt, self.resume_path)
        else:
            if cfg.resume:
                say(self.console, f"--resume: no checkpoint in {self.output_dir / 'checkpoints'}, starting from step 0")
            random.seed(cfg.seed)
            np.random.seed(cfg.seed % (2**32))
            torch.manual_seed(cfg.seed)
        self.resumed = ckpt is not None
        self.stop_at = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)

        if distributed.is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.output_dir / "config.json", self.run_config())
        n_params = sum(p.numel() for p in self.trainable)
        say(
            self.console,
            f"{model.load_report.summary()}\n"
            f"training {n_params:,} parameters in {len(self.names)} tensors on the relative-rotation loss"
            + (" + first-camera anchor" if self.spec.reference_frame else " (no anchor term)")
            + f"; {len(self.dataset)} pairs, {self.per_epoch} steps/epoch, "
            f"{cfg.epochs} epochs = {self.total_steps} steps"
            + (f" (stopping at {self.stop_at})" if self.stop_at < self.total_steps else "")
            + (f"; resuming at step {self.step}" if self.resumed else "")
            + (
                f"; {self.world_size} ranks, {cfg.batch_size // self.world_size} "
                + ("pair" if cfg.batch_size == self.world_size else "pairs")
                + " each per step"
                if self.world_size > 1
                else ""
            ),
        )

    def run_config(self) -> dict[str, Any]:
        """The run's configuration as written to config.json (and into checkpoints)."""
        return {**self.cfg.to_json(), "world_size": self.world_size}

    # -------------------------------------------------------------------------------------------- checkpoints

    def load_checkpoint(self, ckpt: dict[str, Any], path: Optional[Path]) -> None:
        """Restore biases, optimizer, scheduler, RNG and step (from a run with any number of ranks)."""
        _check_resume_compatible(ckpt, self.cfg, self.names, self.total_steps, path)
        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(ckpt["biases"][n].to(self.params[n]))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Optional[Path]:
        """Rank 0 writes ``checkpoints/step-N.ckpt`` atomically (the other ranks hold the same state)."""
        if not distributed.is_main_process():
            return None
        return _write_checkpoint(
            self.output_dir,
            self.step,
            self.step // self.per_epoch,
            self.model,
            self.names,
            self.optimizer,
            self.scheduler,
            self.cfg,
            self.total_steps,
            self.run_config(),
        )

    # -------------------------------------------------------------------------------------------- one step

    def _loader(self, epoch: int, start: int) -> torch.utils.data.DataLoader:
        sampler = EpochBatchSampler(
            len(self.dataset),
            self.cfg.batch_size,
            epoch,
            self.cfg.seed,
            shuffle=True,
            start=start,
            rank=self.rank,
            world_size=self.world_size,
        )
        # every rank pads its slice to the shape of the whole global batch, as one process would pad it
        shapes = sampler.global_pad_shapes(self.dataset.expected_shape)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=functools.partial(collate_pairs, pad_shapes=shapes),
            num_workers=self.cfg.num_workers,
            worker_init_fn=_ignore_sigint if self.cfg.num_workers > 0 else None,
        )

    def train_step(self, batch: dict[str, Any], stop: Any = False) -> tuple[dict[str, float], bool]:
        """One optimizer step on this rank's slice of a global batch; returns the step's record (global numbers)
        and whether any rank was asked to stop (``stop``: this rank's flag, read after the backward pass)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        n_local = len(batch["index"])
        n_global = int(batch["global_size"])
        self.optimizer.zero_grad(set_to_none=True)
        loss_local = torch.zeros((), device=self.device)
        rel_sum = anchor_sum = torch.zeros((), device=self.device)
        if n_local:
            images = batch["images"].to(self.device, non_blocking=True)
            R_gt = batch["R_gt"].to(self.device, torch.float32)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
                out = self.model(images, heads=CAMERA_HEADS)
            loss = rotation_loss(self.spec.w2c_rotations(out), R_gt, self.spec.reference_frame, cfg.loss_iterations)
            # the batch mean over this rank's pairs, reweighted to their share of the global batch
            loss_local = loss.loss if n_local == n_global else loss.loss * (n_local / n_global)
            loss_local.backward()
            rel_sum, anchor_sum = torch.rad2deg(loss.rel_error).sum(), torch.rad2deg(loss.anchor_error).sum()
        stats = torch.stack([loss_local.detach().float(), rel_sum.float(), anchor_sum.float()]).cpu().double()
        # the stop flag is read after the backward pass: a signal that arrived during this step ends the run here
        stats = torch.cat([stats, torch.tensor([float(bool(stop))], dtype=torch.float64)])
        if self.world_size > 1:
            self._all_reduce_gradients()
            stats = distributed.all_reduce_sum(stats.to(self.device)).cpu()
        total_loss = float(stats[0])
        if not math.isfinite(total_loss):
            raise FloatingPointError(
                f"non-finite loss at step {self.step} (NaN/Inf in the model outputs): check --weights and "
                "--init-alignment, lower --lr, or use --dtype fp32"
            )
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip))
        else:
            grad_norm = float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.trainable]))
            )
        if not math.isfinite(grad_norm):
            # e.g. π³'s SVD camera head when its 3x3 output is already orthonormal to float precision:
            # stop before the optimizer writes NaN into the biases (and into the next checkpoint)
            raise FloatingPointError(
                f"non-finite gradient at step {self.step} (loss {total_loss:.4g}): stopped before updating the "
                "biases, earlier checkpoints are intact; check --weights and --init-alignment, lower --lr, or "
                "use --dtype fp32"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        record = {
            "step": self.step,
            "loss": total_loss,
            "rel_error_deg": float(stats[1]) / n_global,
            "anchor_error_deg": float(stats[2]) / n_global,
            "lr": lr,
            "grad_norm": grad_norm,
            "seconds": time.perf_counter() - t0,
        }
        return record, bool(stats[3] > 0)

    def _all_reduce_gradients(self) -> None:
        """Sum the trainable biases' gradients over the ranks in one flat buffer."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p in self.trainable:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    # -------------------------------------------------------------------------------------------- the loop

    def train(self) -> TrainResult:
        cfg = self.cfg
        main = distributed.is_main_process()
        # a resumed run drops the logged points after its checkpoint (written by the steps it repeats)
        purge = self.step + 1 if self.resumed else None
        logger = _make_logger(cfg, self.output_dir, purge, self.run_config(), main)
        stop = _StopFlag()
        stopped = False
        last_ckpt: Optional[Path] = self.resume_path
        bar = None
        if cfg.progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.stop_at, initial=min(self.step, self.stop_at), desc="align", unit="step", dynamic_ncols=True
            )
        try:
            with stop.installed():
                while self.step < self.stop_at and not stopped:
                    epoch, start = divmod(self.step, self.per_epoch)
                    for batch in self._loader(epoch, start):
                        record, stopped = self.train_step(batch, stop=stop)
                        self.history.append(record)
                        if self.step % cfg.log_every == 0 or self.step == self.stop_at:
                            for key in ("loss", "rel_error_deg", "anchor_error_deg", "lr", "grad_norm"):
                                logger.add_scalar(f"train/{key}", record[key], self.step)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(
                                loss=f"{record['loss']:.4f}", err=f"{record['rel_error_deg']:.1f}°", refresh=False
                            )
                        if self.step % cfg.checkpoint_every == 0 and self.step < self.stop_at:
                            last_ckpt = self.save_checkpoint() or last_ckpt
                        if self.step >= self.stop_at or stopped:
                            break
                found = find_checkpoints(self.output_dir)
                if main and found and found[-1][0] == self.step:
                    last_ckpt = found[-1][1]
                else:
                    last_ckpt = self.save_checkpoint() or last_ckpt
        finally:
            if bar is not None:
                bar.close()
            logger.flush()
            logger.close()

        biases = bias_state_dict(self.model, self.names)
        completed = not stopped
        export = None
        if completed:
            export = self.output_dir / "biases.pth"
            if main:
                write_bias_checkpoint(export, biases)
            say(
                self.console,
                f"done at step {self.step}/{self.total_steps}: tuned biases in {export} "
                f"(load with --alignment {export})",
            )
        else:
            say(
                self.console,
                f"interrupted at step {self.step}/{self.total_steps}: checkpoint {last_ckpt}; continue with --resume",
            )
        distributed.barrier()  # every rank returns once rank 0's files are complete
        if not main:
            last_ckpt = self.output_dir / "checkpoints" / f"step-{self.step:06d}.ckpt"
        return TrainResult(
            output_dir=self.output_dir,
            step=self.step,
            total_steps=self.total_steps,
            completed=completed,
            bias_names=self.names,
            biases=biases,
            history=self.history,
            checkpoint=last_ckpt,
            export=export,
            stop_signal=stop.signal if stop.signal is not None else (signal.SIGTERM if stopped else None),
            model=self.model,
            optimizer=self.optimizer,
        )


def _make_logger(cfg: TrainConfig, output_dir: Path, purge_step: Optional[int], config: dict[str, Any], main: bool):
    if not main:
        return _NullLogger()
    if cfg.logger == "wandb":
        return _WandbLogger(output_dir, config, resumed=purge_step is not None)
    return _LazySummaryWriter(str(output_dir), purge_step=purge_step)


class _NullLogger:
    """What ranks other than 0 log to."""

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _WandbLogger:
    """Weights & Biases run in ``output_dir/wandb`` (offline unless ``WANDB_MODE`` says otherwise: sync later with
    ``wandb sync``); started at the first scalar, like the TensorBoard writer."""

    def __init__(self, output_dir: Path, config: dict[str, Any], resumed: bool) -> None:
        self.output_dir, self.config, self.resumed = output_dir, config, resumed
        self._run: Any = None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._run is None:
            import wandb

            self._run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "ns-extreme-align"),
                name=self.output_dir.name,
                dir=str(self.output_dir),
                config=self.config,
                mode=os.environ.get("WANDB_MODE", "offline"),
                resume="allow" if self.resumed else None,
                id=_wandb_run_id(self.output_dir),
            )
        self._run.log({tag: value}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()


def _wandb_run_id(output_dir: Path) -> str:
    """One W&B run per output folder, so that a resumed run continues its curves."""
    return "align-" + hashlib.sha256(str(output_dir.absolute()).encode()).hexdigest()[:12]


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
