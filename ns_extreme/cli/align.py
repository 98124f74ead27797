"""``ns-extreme-align``: build pair lists (``pairs``), tune the paper's bias subset (``train``), evaluate (``eval``).

Examples::

    ns-extreme-align pairs --sources data/castle data/fountain/sparse/0 --output pairs.json
    ns-extreme-align pairs --sources UnScenePairs.npy --allow-pickle --root /data/megaunscene --output test.json
    ns-extreme-align train --preset configs/align_vggt_paper.yaml --pairs pairs.json --output-dir runs/align
    ns-extreme-align train --preset configs/align_vggt_paper.yaml --pairs pairs.json --output-dir runs/align --resume
    ns-extreme-align eval --pairs test.json --models pretrained aligned mine=runs/align/biases.pth
    ns-extreme-align train --model pi3 --pairs pairs.json --output-dir runs/align_pi3 --gradient-checkpointing
    ns-extreme-align eval --model pi3 --pairs test.json --models pretrained aligned mine=runs/align_pi3/biases.pth

Pair lists do not depend on the backbone: one list serves ``--model vggt`` and ``--model pi3``.

Errors and exit codes follow ``ns_extreme.cli.runtime``: user mistakes (missing or malformed files, bad
checkpoints, bad options) print one red ``error: ...`` line on stderr and exit with code 2 (set
``NS_EXTREME_TRACEBACK=1`` to see the traceback). An interrupted training run (Ctrl-C / SIGTERM) writes a
checkpoint and exits with 128 + the signal number.

Presets: ``--preset FILE`` (YAML, JSON or TOML) supplies option defaults for ``train`` (its ``train:`` section)
and ``eval`` (its ``eval:`` section), loaded into the subcommand's default config (``ns_extreme.cli.presets``);
options on the command line override them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import tyro
from typing_extensions import Annotated

from ns_extreme.align.evaluate import EvalConfig
from ns_extreme.align.train import TrainConfig
from ns_extreme.cli.presets import find_preset, load_preset, preset_default
from ns_extreme.cli.runtime import rearm_interrupt_signals, run_guarded
from ns_extreme.models.registry import MODELS, ModelName

__all__ = ["PairsConfig", "entrypoint", "main", "command_type", "preset_defaults", "build_pairs"]

PROG = "ns-extreme-align"
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ pairs


@dataclass
class PairsConfig:
    """Build a pair list labelled large / small / none by the paper's field-of-view rule, from posed collections,
    or import the paper's UnScenePairs .npy files."""

    sources: tuple[Path, ...]
    """One or more of: a COLMAP model folder (cameras/images .bin or .txt), a scene folder holding sparse/ or
    sparse/0 (read as COLMAP, images in <scene>/images), a transforms.json file or its folder, a MegaUnScene root
    (scenes/<scene>/<recon>/{images,sparse}), or a paper pair file UnScenePairs*.npy (needs --allow-pickle)."""
    output: Path = Path("pairs.json")
    """Pair list to write (JSON, written atomically)."""
    root: Optional[Path] = None
    """Folder the image paths are stored relative to. Default: the source's image folder (several sources: their
    common parent); for .npy imports the MegaUnScene root, or give it later with `--images-root`."""
    images_dir: Optional[Path] = None
    """Image folder of COLMAP model sources (default: <scene>/images beside sparse/)."""
    strategy: Literal["knn-center", "knn-direction", "all"] = "knn-center"
    """Candidate pairs: k nearest views by camera centre, by viewing direction, or all pairs."""
    k: int = 5
    """Neighbours per view for the knn strategies (ExRot / UnScenePairs: 5; UnScenePairs-t: 50)."""
    mutual: bool = False
    """Keep only mutual nearest neighbours (ExRot's graph)."""
    balance: bool = True
    """Keep the same number of pairs in every overlap class present in a scene."""
    max_pairs_per_scene: Optional[int] = None
    """Cap of pairs per scene (reconstruction)."""
    seed: int = 0
    """Seed of the (deterministic) subset selection."""
    allow_pickle: bool = False
    """Allow loading pickled .npy pair files (unpickling can run arbitrary code: only for files you trust)."""
    model: ModelName = "vggt"
    """Backbone the list is for. Mining uses only the cameras, so one list serves train and eval of every model
    and the written file is the same for each; accepted so that a workflow's commands all take --model."""


@dataclass(frozen=True)
class _Source:
    kind: Literal["colmap", "transforms", "megaunscene", "npy"]
    path: Path
    natural_root: Optional[Path]
    scene: str
    images_dir: Optional[Path] = None


def _has_colmap_model(d: Path) -> bool:
    return any((d / f"cameras.{e}").is_file() and (d / f"images.{e}").is_file() for e in ("bin", "txt"))


def _classify(path: Path, images_dir: Optional[Path]) -> _Source:
    if not path.exists():
        raise FileNotFoundError(f"source not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".npy":
            return _Source("npy", path, None, path.stem)
        if path.suffix.lower() == ".json":
            return _Source("transforms", path, path.parent, path.parent.name)
        raise ValueError(f"source {path}: expected a .npy pair file, a transforms.json or a folder")
    if _has_colmap_model(path):
        scene_dir = path.parent.parent if path.parent.name == "sparse" else path.parent
        imgs = images_dir or scene_dir / "images"
        return _Source("colmap", path, imgs, scene_dir.name, imgs)
    for model in (path / "sparse", path / "sparse" / "0"):
        if _has_colmap_model(model):
            imgs = images_dir or path / "images"
            return _Source("colmap", model, imgs, path.name, imgs)
    if (path / "transforms.json").is_file():
        return _Source("transforms", path / "transforms.json", path, path.name)
    if (path / "scenes").is_dir():
        return _Source("megaunscene", path, path, path.name)
    raise ValueError(
        f"source {path}: not a COLMAP model, a scene folder with sparse/, a "
        "transforms.json dataset or a MegaUnScene root"
    )


def _read_source(path: Path, what: str, read: Any) -> Any:
    """Run a collection reader; malformed files give one error naming the file (not a bare KeyError / JSON
    parser message)."""
    try:
        return read()
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: invalid JSON in {what} ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(f"{path}: malformed {what} ({type(err).__name__}: {err})") from None
    except ValueError as err:
        if str(path) in str(err) or path.name in str(err):
            raise
        raise ValueError(f"{path}: {err}") from None
    except RuntimeError as err:  # pycolmap reports unreadable binary models as RuntimeError
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: cannot read the {what} ({first})") from None


def build_pairs(cfg: PairsConfig, console: Any = None) -> Path:
    """Run the ``pairs`` subcommand; returns the written pair-list path."""
    from ns_extreme.align.pairs import (
        PairList,
        import_unscene_pairs,
        mine_pairs,
        scan_megaunscene,
        views_from_colmap,
        views_from_transforms,
    )

    if not cfg.sources:
        raise ValueError("--sources needs at least one source")
    if cfg.k < 1:
        raise ValueError(f"--k must be >= 1, got {cfg.k}")
    if cfg.max_pairs_per_scene is not None and cfg.max_pairs_per_scene < 1:
        raise ValueError(f"--max-pairs-per-scene must be >= 1, got {cfg.max_pairs_per_scene}")
    sources = [_classify(Path(p).expanduser(), cfg.images_dir) for p in cfg.sources]
    npy = [s for s in sources if s.kind == "npy"]
    if npy and len(sources) > len(npy) and cfg.root is None:
        raise ValueError(
            "mixing .npy pair files with other sources needs --root (the folder all image paths are relative to)"
        )
    if cfg.root is not None:
        root = Path(cfg.root).expanduser().absolute()
    elif npy:
        root = None
    else:
        naturals = [str(s.natural_root.absolute()) for s in sources if s.natural_root is not None]
        root = Path(os.path.commonpath(naturals))

    def rebase(views: list, base: Path) -> list:
        if root is None or base.absolute() == root:
            return views
        out = []
        for v in views:
            rel = os.path.relpath(os.path.abspath(base / v.path), root).replace(os.sep, "/")
            if rel == ".." or rel.startswith("../"):
                raise ValueError(f"image {base / v.path} is outside --root {root}")
            out.append(dataclasses.replace(v, path=rel))
        return out

    records = []
    lines = []
    for s in sources:
        if s.kind == "npy":
            imported = import_unscene_pairs(s.path, cfg.allow_pickle, root="" if root is None else str(root))
            records += imported.records
            lines.append(f"{s.path}: imported {len(imported)} pairs {imported.counts()}")
            continue
        if s.kind == "megaunscene":
            scenes = [(sv.scene, sv.views) for sv in scan_megaunscene(s.path)]
            base = s.path
        elif s.kind == "colmap":
            assert s.images_dir is not None
            if not s.images_dir.is_dir():
                raise FileNotFoundError(
                    f"images folder of COLMAP model {s.path} not found: {s.images_dir} (pass --images-dir)"
                )
            scenes = [
                (s.scene, _read_source(s.path, "COLMAP model", lambda s=s: views_from_colmap(s.path, s.images_dir)))
            ]
            base = s.images_dir
        else:
            scenes = [(s.scene, _read_source(s.path, "transforms.json", lambda s=s: views_from_transforms(s.path)))]
            base = s.path.parent
        rearm_interrupt_signals()  # reading COLMAP models imports pycolmap, whose glog takes over SIGTERM
        for scene, views in scenes:
            views = rebase(views, base)
            mined = mine_pairs(
                views,
                scene,
                strategy=cfg.strategy,
                k=cfg.k,
                max_pairs=cfg.max_pairs_per_scene,
                balance=cfg.balance,
                seed=cfg.seed,
                mutual=cfg.mutual,
            )
            records += mined
            counts = {c: sum(r.overlap == c for r in mined) for c in ("large", "small", "none")}
            lines.append(f"{scene}: {len(views)} views -> {len(mined)} pairs {counts}")
    pair_list = PairList(root="" if root is None else str(root), records=records)
    if not records:
        raise ValueError("no pairs found (too few posed views? try --strategy all or a larger --k)")
    out = pair_list.save_json(cfg.output)
    if console is not None:
        for line in lines:
            console.print(line, highlight=False, markup=False)
        console.print(
            f"wrote {len(pair_list)} pairs {pair_list.counts()} to {out}"
            + ("" if root is not None else " (no root: pass --images-root to train/eval)"),
            highlight=False,
            markup=False,
        )
    return out


# ------------------------------------------------------------------------------------------------ entry point

PRESET_SECTIONS: dict[str, type] = {"train": TrainConfig, "eval": EvalConfig}
"""Subcommands that take ``--preset``, by name (the preset file's section names)."""


def command_type(defaults: Optional[Mapping[str, Any]] = None) -> Any:
    """The tyro union of the subcommands; ``defaults`` maps a subcommand name to its default config instance."""

    def sub(name: str, cls: type) -> Any:
        if defaults and name in defaults:
            return Annotated[cls, tyro.conf.subcommand(name, default=defaults[name])]
        return Annotated[cls, tyro.conf.subcommand(name)]

    return Union[sub("pairs", PairsConfig), sub("train", TrainConfig), sub("eval", EvalConfig)]


def preset_defaults(argv: Sequence[str]) -> dict[str, Any]:
    """``{subcommand: default config}`` from the ``--preset FILE`` of a train / eval command line (else empty)."""
    name = next((a for a in argv if a in ("pairs", *PRESET_SECTIONS)), None)
    if name not in PRESET_SECTIONS:
        return {}
    path = find_preset(argv[list(argv).index(name) + 1 :])
    if path is None:
        return {}
    values = load_preset(path, name)
    return {name: preset_default(PRESET_SECTIONS[name], values, source=f"preset {path} [{name}]")}


OUT_OF_MEMORY = (
    "out of memory; try a smaller --batch-size or --image-size, --gradient-checkpointing or --dtype bf16 (train), "
    "--dtype bf16 (eval on a GPU)"
)
DESCRIPTION = (
    "Bias alignment of 3D foundation models for extreme-view relative pose (Ext-3DFMs, arXiv 2511.22686): "
    "`pairs` builds labelled pair lists, `train` tunes the paper's bias subset with the rotation-only geodesic loss, "
    "`eval` reports MRE / RA15 / RA30 per overlap class. Backbones: "
    + ", ".join(f"`--model {name}`" for name in MODELS)
    + " (default: vggt)."
)


def run(cfg: Any) -> int:
    """Run a parsed subcommand config; returns the exit code."""
    from rich.console import Console

    console = Console(soft_wrap=True)
    if isinstance(cfg, PairsConfig):
        build_pairs(cfg, console)
        return 0
    if isinstance(cfg, TrainConfig):
        from ns_extreme.align.train import train

        result = train(cfg, console=console)
        if not result.completed:
            return 128 + int(result.stop_signal or signal.SIGINT)
        return 0
    if isinstance(cfg, EvalConfig):
        from ns_extreme.align.evaluate import evaluate

        result = evaluate(cfg, console=console)
        if cfg.view and result is not None:  # None: a rank other than 0 under torchrun
            from ns_extreme.viewer.pairs_browser import serve_pairs_browser

            serve_pairs_browser(result.report_path, host=cfg.view_host, port=cfg.view_port, say=console.print)
        return 0
    raise TypeError(f"unknown command config {type(cfg).__name__}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run, return the exit code (user errors -> 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def parse_and_run() -> int:
        command = command_type(preset_defaults(argv))
        return run(tyro.cli(command, args=argv, prog=PROG, description=DESCRIPTION))

    return run_guarded(parse_and_run, out_of_memory=OUT_OF_MEMORY)


def entrypoint() -> None:
    """Console script ``ns-extreme-align``."""
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
