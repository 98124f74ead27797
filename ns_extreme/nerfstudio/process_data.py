"""``ns-process-data`` with nerfstudio's stock subcommands unchanged plus ``extreme-poses``.

nerfstudio 1.1.5 has no plugin hook for ``ns-process-data`` (``nerfstudio.scripts.process_data.Commands`` is
a hard-coded union), so ns_extreme installs a console script of the same name pointing here, and the
conflict-free alias ``ns-extreme-process-data`` pointing to the same function. Both offer the same
subcommands: everything nerfstudio offers (images, video, polycam, metashape, realitycapture, record3d,
odm, aria) plus ``extreme-poses``. If nerfstudio's process-data module cannot be imported (e.g. open3d
without ``libusb-1.0.so.0``), only ``extreme-poses`` is offered, with a warning. A command line that starts
with ``extreme-poses`` never imports nerfstudio's process-data module (faster start, immune to that failure).

Caveat (pip behaviour): installing ns_extreme replaces nerfstudio's ``bin/ns-process-data``; reinstalling
nerfstudio restores nerfstudio's; uninstalling ns_extreme deletes the script (reinstall nerfstudio to get
it back). ``ns-extreme-process-data`` is never affected.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence, Union

import tyro
from typing_extensions import Annotated

from ns_extreme.cli.process import OUT_OF_MEMORY, ExtremePoses
from ns_extreme.cli.runtime import command_is_verbose, run_guarded

EXTREME_POSES = Annotated[ExtremePoses, tyro.conf.subcommand(name="extreme-poses")]
SUBCOMMAND = "extreme-poses"


def build_commands(warn: bool = True) -> Optional[Any]:
    """The tyro union of nerfstudio's subcommands and ours, or None when nerfstudio's cannot be imported."""
    try:
        from nerfstudio.scripts.process_data import Commands
    except Exception as e:  # noqa: BLE001 - any import failure of the optional part
        if warn:
            from rich.console import Console

            Console(stderr=True, soft_wrap=True).print(
                f"[yellow]warning:[/yellow] nerfstudio's process-data subcommands are unavailable "
                f"({type(e).__name__}: {e}); only {SUBCOMMAND} is offered"
            )
        return None
    return Union[Commands, EXTREME_POSES]


def entrypoint(args: Optional[Sequence[str]] = None) -> None:
    """Console-script entry of ``ns-process-data`` and ``ns-extreme-process-data``."""
    tyro.extras.set_accent_color("bright_yellow")
    argv = list(sys.argv[1:] if args is None else args)
    # `extreme-poses ...` needs nothing from nerfstudio: skip importing its process-data module (open3d,
    # ~3 s) so our command starts faster and works even when that import is broken.
    commands = None if argv[:1] == [SUBCOMMAND] else build_commands()
    parsed: list[Any] = []

    def go() -> None:
        if commands is None:  # only extreme-poses (its name is optional when nerfstudio's commands are missing)
            rest = argv[1:] if argv[:1] == [SUBCOMMAND] else argv
            parsed.append(tyro.cli(ExtremePoses, args=rest, prog=f"{_prog()} {SUBCOMMAND}"))
        else:
            parsed.append(tyro.cli(commands, args=argv, prog=_prog()))
        cmd = parsed[0]
        if isinstance(cmd, ExtremePoses):
            cmd.main()
            return
        # Stock subcommands: exactly nerfstudio's own handling (nerfstudio.scripts.process_data.entrypoint).
        from nerfstudio.utils.rich_utils import CONSOLE

        try:
            cmd.main()
        except (RuntimeError, ValueError) as e:
            CONSOLE.log("[bold red]" + e.args[0])

    code = run_guarded(go, verbose=lambda: command_is_verbose(parsed), out_of_memory=OUT_OF_MEMORY)
    if code:
        sys.exit(code)


def _prog() -> str:
    import os

    return os.path.basename(sys.argv[0]) or "ns-process-data"


def get_parser_fn():
    """The argparse parser (for sphinx docs, like nerfstudio's own ``get_parser_fn``)."""
    commands = build_commands(warn=False)
    return tyro.extras.get_parser(ExtremePoses if commands is None else commands)  # type: ignore[arg-type]


if __name__ == "__main__":
    entrypoint()
