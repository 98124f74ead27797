"""Atomic file and folder writes: a failed or interrupted run never leaves a half-written output.

Files are written to a temporary sibling (same folder, so `os.replace` is atomic), fsynced, then
renamed over the target. Folders are built in a hidden sibling (`.<name>.tmp-XXXX`) and renamed
into place only when the whole body succeeded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "OutputExistsError",
    "OutputWriteError",
    "describe_os_error",
    "check_output_location",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "staged_output_dir",
    "torch_save_atomic",
]


class OutputExistsError(FileExistsError):
    """The output already exists and overwriting was not requested."""


class OutputWriteError(OSError):
    """Writing an output failed (disk full, quota, permissions, ...); the message names the output and the fix.
    Nothing half-written is left behind. ``errno`` is the original error's; the original OSError is the
    ``__cause__``."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


_OS_ERROR_HINTS = {
    errno.ENOSPC: "no space left on device (free some space or write somewhere else)",
    errno.EDQUOT: "disk quota exceeded (free some space or write somewhere else)",
    errno.EFBIG: "file too large for this file system or for the file-size limit (`ulimit -f`)",
    errno.EROFS: "read-only file system (write somewhere else)",
    errno.EACCES: "permission denied (choose a folder you can write to, or fix its permissions)",
    errno.EPERM: "operation not permitted (choose a folder you can write to, or fix its permissions)",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EMFILE: "too many open files (raise `ulimit -n`)",
    errno.EIO: "input/output error (failing disk or network drive?)",
}


def describe_os_error(exc: BaseException) -> str:
    """One line for an OSError: ``<file>: <what happened and how to fix it>``; our own messages unchanged."""
    if not isinstance(exc, OSError) or exc.errno is None or isinstance(exc, OutputWriteError):
        return str(exc) or type(exc).__name__
    what = _OS_ERROR_HINTS.get(exc.errno, exc.strerror or str(exc))
    where = exc.filename if exc.filename is not None else None
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {what}" if where is not None else what


def check_output_location(out: str | os.PathLike[str], option: str = "output", inside: bool = False) -> None:
    """Fail early (before minutes of work) if ``out`` could not be created: its nearest existing ancestor must
    be a folder we can create entries in (probed with a temporary folder, removed at once). ``inside``: ``out``
    is a folder that is written into (a training run), so an existing ``out`` is probed itself. Raises
    NotADirectoryError / PermissionError / OSError naming ``option``, the folder and the fix."""
    out = Path(out).absolute()
    parent = out if inside and out.is_dir() else out.parent
    while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{option} {out}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as exc:
        why = _OS_ERROR_HINTS.get(exc.errno, exc.strerror or str(exc)) if exc.errno is not None else str(exc)
        kind = PermissionError if isinstance(exc, PermissionError) else OSError
        raise kind(f"{option} {out}: cannot write in {parent}: {why}") from None


def _write_failed(exc: OSError, target: Path, inside: Path | None = None) -> OutputWriteError:
    what = _OS_ERROR_HINTS.get(exc.errno, exc.strerror or str(exc)) if exc.errno is not None else str(exc)
    detail = ""
    if inside is not None and exc.filename:
        with contextlib.suppress(ValueError, TypeError):
            detail = f" while writing {Path(os.fsdecode(exc.filename)).relative_to(inside)}"
    return OutputWriteError(exc.errno, f"could not write {target}{detail}: {what}; nothing was written")


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # fallback: read by setting, then restore at once
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in `folder` (best effort; not supported on every OS/filesystem)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _explain_creation_failure(exc: OSError, target: Path) -> None:
    """Raise a user-facing error when the folder or temporary file for ``target`` could not be created for a
    known reason; return (the caller re-raises ``exc``) otherwise."""
    if isinstance(exc, FileExistsError):  # mkdir(exist_ok=True) on a file
        raise OutputWriteError(
            errno.ENOTDIR, f"could not write {target}: {target.parent} is a file, not a folder"
        ) from exc
    if exc.errno in _OS_ERROR_HINTS:
        raise _write_failed(exc, target) from exc


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temp file next to `path`, fsync it, then `os.replace` it onto `path`."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = (target.stat().st_mode & 0o7777) if target.is_file() else (0o666 & ~_current_umask())
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    except OSError as exc:
        _explain_creation_failure(exc, target)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError) and exc.errno in _OS_ERROR_HINTS:
            raise _write_failed(exc, target) from exc
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (no newline translation); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Serialise `obj` as JSON (NaN/Infinity rejected: they are not JSON) and write it atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def torch_save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """`torch.save(obj, path)` through a temp file, so a crash never leaves a truncated checkpoint."""
    import torch  # local: keeps this module importable without paying for torch

    return _atomic_write(path, lambda f: torch.save(obj, f))


def _refuse_existing(final: Path, overwrite: bool) -> None:
    if not (final.exists() or final.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"output folder already exists: {final} (pass --overwrite to replace it)")
    if final.is_symlink() or not final.is_dir():
        raise OutputExistsError(f"output path exists and is not a folder, refusing to replace it: {final}")


@contextlib.contextmanager
def staged_output_dir(final_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling folder to fill; publish it as `final_dir` if the body succeeds.

    An existing `final_dir` is refused on enter (before any work) unless `overwrite`; with
    `overwrite` the old folder is moved aside, the new one renamed in, then the old one deleted
    (restored if the rename fails). On any exception, KeyboardInterrupt included, the staging
    folder is removed and the exception re-raised; `final_dir` is left as it was.
    """
    final = Path(final_dir).absolute()
    _refuse_existing(final, overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        _explain_creation_failure(exc, final)
        raise
    try:
        os.chmod(staging, 0o777 & ~_current_umask())
        yield staging
        _refuse_existing(final, overwrite)  # something may have appeared while we worked
        _publish(staging, final)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        cause = exc.__cause__ if isinstance(exc, OutputWriteError) else exc  # a file written atomically inside
        if isinstance(cause, OSError) and not isinstance(cause, OutputWriteError) and cause.errno in _OS_ERROR_HINTS:
            raise _write_failed(cause, final, staging) from cause
        raise


def _publish(staging: Path, final: Path) -> None:
    """Rename `staging` to `final`, moving an existing `final` aside first and deleting it after."""
    aside: Path | None = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        os.rename(final, aside)
    try:
        os.rename(staging, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        raise
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
        if aside.exists():
            warnings.warn(f"could not delete the replaced output {aside}; remove it by hand", stacklevel=4)
