"""What every ns_extreme console script shares: exit codes, which errors are the user's, signal handling.

``run_guarded`` (a function) and ``run_cli`` (a tyro command class with a ``main()``) give every command
(``ns-process-data extreme-poses``, ``ns-extreme-align``, ``ns-extreme-view``) the same behaviour:

* a user error (one of ``user_error_types()``, running out of memory, or such an error raised inside a
  DataLoader worker process) prints one red ``error: ...`` line on stderr and exits with ``EXIT_USER_ERROR``;
  any other exception is a bug and keeps its traceback;
* ``--verbose`` (commands that have it) or the environment variable ``NS_EXTREME_TRACEBACK=1`` print the
  traceback before that line;
* Ctrl-C / SIGTERM / SIGHUP raise ``KeyboardInterrupt`` so that ``finally`` blocks remove staged outputs, then
  exit with 128 + the signal number (130 / 143 / 129);
* a closed stdout pipe (``... | head``) ends the command quietly with 128 + SIGPIPE (141), as shell tools do.

No heavy imports here (rich and the helpers are imported when needed): a mistyped path is reported before torch
loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any, Callable, Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE (not defined on Windows)
TRACEBACK_ENV = "NS_EXTREME_TRACEBACK"
"""Set to 1 to print the traceback of user errors (like ``--verbose``), in every command."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user (bugs keep their traceback)."""
    types: list[type[BaseException]] = [
        ValueError,  # includes ModelLoadError, ImageReadError, PairFileError
        OSError,  # files and folders: not found, exists (OutputExistsError), permissions, disk full, ...
        FloatingPointError,  # NaN / Inf model outputs in ns-extreme-align eval
    ]
    backbone = sys.modules.get("ns_extreme.posing.backbone")  # not imported (torch!) just to name its error
    if backbone is not None:
        types.append(backbone.NonFiniteOutputError)
    distributed = sys.modules.get("ns_extreme.distributed")  # a rank died / timed out / disagrees (torchrun)
    if distributed is not None:
        types.append(distributed.DistributedError)
    return tuple(types)


def _type_names(types: Sequence[type]) -> set[str]:
    """Names of ``types`` and of all their subclasses."""
    names: set[str] = set()
    pending = list(types)
    while pending:
        t = pending.pop()
        if t.__name__ not in names:
            names.add(t.__name__)
            pending += t.__subclasses__()
    return names


_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process")


def _worker_error_message(exc: BaseException) -> Optional[str]:
    """A user error raised inside a DataLoader worker comes back as a RuntimeError whose message holds the
    worker's traceback (torch's ExceptionWrapper); recover the original one-line message, or None."""
    text = str(exc)
    m = _WORKER_ERROR.match(text)
    if m is None or m.group(1) not in _type_names(user_error_types()):
        return None
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    prefix = re.match(r"^[\w.]+(Error|Exception): ", last)
    return last[prefix.end() :] if prefix else last


def user_error_message(exc: BaseException, out_of_memory: str = "out of memory") -> Optional[str]:
    """The one line to show for a user error, or None for a bug. ``out_of_memory``: the command's advice for
    MemoryError and torch's OutOfMemoryError (a RuntimeError)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return out_of_memory
    if isinstance(exc, user_error_types()):
        from ns_extreme.io.atomic import describe_os_error

        return describe_os_error(exc)
    return _worker_error_message(exc)


def traceback_requested() -> bool:
    """True when ``NS_EXTREME_TRACEBACK`` is set to anything but empty or 0."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def print_error(message: str) -> None:
    """One red ``error: <message>`` line on stderr (newlines folded, no wrapping)."""
    from rich.console import Console
    from rich.markup import escape

    one_line = " ".join(str(message).split()) or "unknown error"
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/bold red] {escape(one_line)}", highlight=False)


# ------------------------------------------------------------------------------------------------ signals


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGHUP turned into an exception, so that ``finally`` blocks and staging clean-up run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


TERMINATING_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While active, SIGTERM / SIGHUP raise ``Interrupted`` (a KeyboardInterrupt) like Ctrl-C does.

    Python's default for them is to die on the spot, which would skip the clean-up of staging folders and
    temporary files. Handlers installed inside (e.g. the trainer's stop flag) take precedence while they
    are active. Only in the main thread (signal handlers cannot be set elsewhere).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {}
    for s in TERMINATING_SIGNALS:
        if signal.getsignal(s) is signal.SIG_IGN:  # e.g. nohup: keep ignoring
            continue
        previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def rearm_interrupt_signals() -> None:
    """Re-register the Python handlers of SIGTERM / SIGHUP with the OS.

    Call after importing native libraries that install their own C-level handlers behind Python's back:
    pycolmap's glog does so for SIGTERM at import (a stack dump, then abort), which would kill the process
    without any clean-up.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for s in TERMINATING_SIGNALS:
        handler = signal.getsignal(s)
        if callable(handler) or handler in (signal.SIG_DFL, signal.SIG_IGN):
            signal.signal(s, handler)


def interrupted_exit_code(exc: BaseException) -> int:
    """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


# ------------------------------------------------------------------------------------------------ running


def run_guarded(
    fn: Callable[[], Optional[int]],
    verbose: Callable[[], bool] = lambda: False,
    out_of_memory: str = "out of memory",
) -> int:
    """Call ``fn`` under the rules of the module docstring; returns the exit code (``fn``'s own, None = 0).

    ``verbose()`` is asked after a user error: when true the traceback is printed before the error line.
    SystemExit (tyro's own usage errors, ``--help``) passes through unchanged.
    """
    from ns_extreme.malloc import return_freed_memory_to_os

    return_freed_memory_to_os()  # a model forward allocates and frees GBs of multi-MB tensors
    try:
        with interrupt_on_signals():
            return fn() or 0
    except KeyboardInterrupt as exc:
        from rich.console import Console

        name = f" ({exc.args[0]})" if isinstance(exc, Interrupted) else ""
        Console(stderr=True).print(f"[bold red]interrupted[/bold red]{name}; no file was left half-written")
        return interrupted_exit_code(exc)
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # also silences the flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # noqa: BLE001 - bugs are re-raised below
        message = user_error_message(exc, out_of_memory)
        if message is None:
            raise
        if verbose() or traceback_requested():
            traceback.print_exc()
        print_error(message)
        return EXIT_USER_ERROR


def run_cli(
    cls: Any, args: Optional[Sequence[str]] = None, out_of_memory: str = "out of memory", **tyro_kwargs: Any
) -> int:
    """Parse ``args`` (default: ``sys.argv[1:]``) into ``cls`` with tyro, call ``.main()``; returns the exit code.

    Errors raised while parsing (option validation in ``__post_init__``) are user errors too; the parsed
    command's ``verbose`` field, if it has one, asks for tracebacks.
    """
    import tyro

    parsed: list[Any] = []

    def go() -> Optional[int]:
        parsed.append(tyro.cli(cls, args=args, **tyro_kwargs))
        return parsed[0].main()

    return run_guarded(go, verbose=lambda: command_is_verbose(parsed), out_of_memory=out_of_memory)


def command_is_verbose(parsed: Sequence[Any]) -> bool:
    """Whether the parsed command (if parsing got that far) has ``verbose=True``."""
    return bool(parsed and getattr(parsed[0], "verbose", False))


# ------------------------------------------------------------------------------------------------ JSON


def jsonable(obj: Any) -> Any:
    """Dataclasses, mappings and sequences as plain JSON values; anything else as ``str(obj)``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
