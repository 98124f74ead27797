"""Entry point ``nerfstudio.dataparser_configs: extreme3d`` -> ``extreme3d`` (a DataParserSpecification).

Kept light on purpose: nerfstudio loads this module while it is still importing ``method_configs``
(method_configs -> trainer -> pipeline -> datamanager -> dataparser_configs -> discover_dataparsers), so
importing nerfstudio's config modules from here fails with a circular import. Only cameras,
base_dataparser, scene_box and registry_dataparser are imported (via ``extreme3d_dataparser``).

``ns-train`` spelling: tyro selects dataparsers with a positional subcommand (``ns-train splatfacto
[trainer/model options] extreme3d [extreme3d options]``) and rejects ``--pipeline.datamanager.dataparser
extreme3d``. Because ``ns-train`` imports this module before it parses the command line, it rewrites
exactly that flag pair (also ``--pipeline.datamanager.dataparser=extreme3d``) into the positional form,
only when the program is ``ns-train`` -- see ``normalise_ns_train_argv``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import List, Optional, Sequence

from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from ns_extreme.nerfstudio.extreme3d_dataparser import Extreme3DDataParserConfig

NAME = "extreme3d"

extreme3d = DataParserSpecification(
    config=Extreme3DDataParserConfig(),
    description="ns_extreme: extreme-poses datasets, or image folders posed on the fly with bias-aligned VGGT",
)

# ------------------------------------------------------------------------ --pipeline.datamanager.dataparser

DATAPARSER_FLAG = "--pipeline.datamanager.dataparser"
BUILTIN_DATAPARSERS = (
    "nerfstudio-data", "minimal-parser", "arkit-data", "blender-data", "instant-ngp-data", "nuscenes-data",
    "dnerf-data", "phototourism-data", "dycheck-data", "scannet-data", "sdfstudio-data", "nerfosr-data",
    "sitcoms3d-data", "scannetpp-data", "colmap",
)  # fmt: skip
"""nerfstudio 1.1.5's dataparser subcommand names (nerfstudio/configs/dataparser_configs.py)."""
HELP_FLAGS = ("-h", "--help")


def _norm(flag: str) -> str:
    return flag.lower().replace("_", "-")


def extreme3d_option_names() -> frozenset:
    """Option names (normalised, without ``--``) that belong to the extreme3d subcommand, except ``data``
    (``--data`` is also a top-level ns-train option and works before the subcommand)."""

    def flat(cls: type) -> set:
        names = set()
        for f in dataclasses.fields(cls):
            if f.name.startswith("_") or f.name == "data":
                continue
            nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            if nested is not None and dataclasses.is_dataclass(nested):  # nested with OmitArgPrefixes: flat flags
                names.update(flat(nested))
            else:
                names.add(_norm(f.name))
                if f.type in (bool, "bool"):
                    names.add("no-" + _norm(f.name))
        return names

    return frozenset(flat(Extreme3DDataParserConfig))


def _dataparser_names() -> set:
    names = set(BUILTIN_DATAPARSERS) | {NAME}
    try:
        from importlib.metadata import entry_points

        names.update(entry_points(group="nerfstudio.dataparser_configs").names)
    except Exception:  # noqa: BLE001 - best effort
        pass
    for definition in os.environ.get("NERFSTUDIO_DATAPARSER_CONFIGS", "").split(","):
        if "=" in definition:
            names.add(definition.split("=", 1)[0])
    return names


def normalise_ns_train_argv(argv: Sequence[str]) -> Optional[List[str]]:
    """``ns-train METHOD ... --pipeline.datamanager.dataparser extreme3d ...`` -> ``ns-train METHOD ... extreme3d ...``.

    Returns the rewritten argv, or None when nothing is (or can safely be) rewritten. Rules:
    * exactly one ``--pipeline.datamanager.dataparser extreme3d`` or ``...=extreme3d``, with the method as
      the first argument and no dataparser subcommand named anywhere else;
    * the pair is removed; every option is grouped with the values following it (up to the next ``--``
      token); groups whose option belongs to extreme3d (``--orientation-method``, ``--conf-percentile``,
      ... or the long form ``--pipeline.datamanager.dataparser.<option>``) move after ``extreme3d``, all
      other options (trainer / model, and ``--data``) stay before it in their order; ``-h/--help`` goes last
      (so it shows the extreme3d options).
    """
    argv = list(argv)
    args = argv[1:]
    hits = [i for i, a in enumerate(args) if a == DATAPARSER_FLAG or a.startswith(DATAPARSER_FLAG + "=")]
    if len(hits) != 1 or not args or args[0].startswith("-") or hits[0] == 0:
        return None
    i = hits[0]
    if args[i] == DATAPARSER_FLAG:
        if i + 1 >= len(args) or args[i + 1] != NAME:
            return None
        rest = args[1:i] + args[i + 2 :]
    else:
        if args[i].split("=", 1)[1] != NAME:
            return None
        rest = args[1:i] + args[i + 1 :]

    known = _dataparser_names()
    if any(not a.startswith("-") and a in known for a in rest):
        return None  # a dataparser subcommand is given positionally as well: leave it to tyro
    groups: List[List[str]] = []
    for a in rest:
        if a.startswith("--") or a in HELP_FLAGS:
            groups.append([a])
        elif groups:
            groups[-1].append(a)
        else:
            return None  # a positional argument right after the method: not ours to reorder
    ours = extreme3d_option_names()
    before: List[str] = []
    after: List[str] = []
    help_tokens: List[str] = []
    long_prefix = DATAPARSER_FLAG + "."
    for group in groups:
        flag = group[0]
        if flag in HELP_FLAGS:
            help_tokens += group
            continue
        name, eq, value = flag[2:].partition("=")
        if flag.startswith(long_prefix):
            short = name[len(long_prefix) - 2 :]
            if _norm(short) in ours or _norm(short) == "data":
                after += ["--" + short + eq + value] + group[1:]
                continue
        if _norm(name) in ours:
            after += group
        else:
            before += group
    return [argv[0], args[0], *before, NAME, *after, *help_tokens]


def _is_ns_train(argv0: str) -> bool:
    base = os.path.basename(argv0)
    return base == "ns-train" or argv0.replace("\\", "/").endswith("nerfstudio/scripts/train.py")


def _normalise_sys_argv() -> None:
    if not sys.argv or not _is_ns_train(sys.argv[0]):
        return
    rewritten = normalise_ns_train_argv(sys.argv)
    if rewritten is None:
        return
    sys.stderr.write(
        f"{NAME}: reading '{DATAPARSER_FLAG} {NAME}' as the dataparser subcommand: ns-train {' '.join(rewritten[1:])}\n"
    )
    sys.argv[:] = rewritten


_normalise_sys_argv()
