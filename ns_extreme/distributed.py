"""Data-parallel helpers for runs started by ``torchrun`` (or ``srun`` with torchrun's environment variables).

Every helper does nothing (or the obvious single-process thing) when no process group is up, so the commands
run unchanged as one plain process. ``init_from_env`` starts the process group when ``WORLD_SIZE`` > 1
(NCCL on CUDA, gloo otherwise) with a collective timeout: a rank that dies makes the others stop with a
``DistributedError`` (a one-line user error) within that time instead of hanging.

A leaf module (it imports only torch, and that only when a helper needs it: the environment helpers run before
torch loads), so align/, posing/ and cli/ can all use it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = [
    "DistributedError",
    "env_world_size",
    "env_rank",
    "local_rank",
    "is_initialized",
    "rank",
    "world_size",
    "is_main_process",
    "init_from_env",
    "destroy",
    "process_group",
    "barrier",
    "all_reduce_sum",
    "all_gather_object",
    "gather_object",
    "broadcast_object",
    "check_same_on_all_ranks",
    "fingerprint",
    "file_fingerprint",
    "shard",
]

DEFAULT_TIMEOUT_S = 1800.0
"""Collective timeout (s): long enough for rank 0 to write a checkpoint of a large run while the others wait."""

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed (a rank died, timed out or disagrees): a user-facing error, not a bug."""


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 without it), readable before the process group starts."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    """``LOCAL_RANK`` set by torchrun: this process's index on its machine (its GPU), 0 without it."""
    return _env_int("LOCAL_RANK", 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    if "torch.distributed" not in sys.modules:  # nothing can have started a process group yet
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return _dist().get_rank() if is_initialized() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Start the default process group from torchrun's environment if ``WORLD_SIZE`` > 1 (NCCL for CUDA
    devices, gloo otherwise); returns whether one is up. Nothing happens in a single process."""
    if env_world_size() <= 1 or is_initialized():
        return is_initialized()
    dist = _dist()
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set: start the command with torchrun "
            "(e.g. `torchrun --standalone --nproc_per_node N ...`)"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        import torch

        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(
            f"rank {env_rank()}: could not join the process group ({_first_line(err)}); "
            "check that every rank was started with the same --nnodes / rendezvous settings"
        ) from None
    return True


def destroy() -> None:
    if is_initialized():
        with contextlib.suppress(Exception):
            _dist().destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[bool]:
    """``init_from_env`` for the duration of a command; the group is destroyed on the way out (errors too)."""
    started = not is_initialized() and init_from_env(device, timeout_s)
    try:
        yield is_initialized()
    finally:
        if started:
            destroy()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def _collective(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except DistributedError:
        raise
    except RuntimeError as err:  # gloo / NCCL errors (DistBackendError is a RuntimeError)
        raise DistributedError(
            f"rank {rank()}: {what} failed ({_first_line(err)}): another rank has stopped, crashed or did not "
            "answer within the collective timeout; see its output for the cause"
        ) from None


def barrier() -> None:
    dist = _dist()
    if is_initialized():
        _collective("barrier", dist.barrier)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (and return it); unchanged in one process."""
    dist = _dist()
    if is_initialized():
        _collective("all-reduce", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    return tensor


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    dist = _dist()
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective("all-gather", lambda: dist.all_gather_object(out, obj))
    return out


def gather_object(obj: T) -> Optional[list[T]]:
    """Every rank's ``obj`` in rank order on rank 0 (None on the others); ``[obj]`` in one process."""
    dist = _dist()
    if not is_initialized():
        return [obj]
    out: Optional[list[Any]] = [None] * world_size() if is_main_process() else None
    _collective("gather", lambda: dist.gather_object(obj, out, dst=0))
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank; ``obj`` in one process."""
    dist = _dist()
    if not is_initialized():
        return obj
    box = [obj]
    _collective("broadcast", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def fingerprint(value: Any) -> str:
    """A short hash of a JSON-serialisable value (keys sorted), to compare set-ups across ranks."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """``fingerprint`` of a file's bytes ("missing" when it cannot be read: the command reports that itself)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return "missing"


def check_same_on_all_ranks(what: str, value: Any) -> None:
    """Raise DistributedError on every rank when the ranks disagree on ``value`` (options, pair lists, ...)."""
    if not is_initialized():
        return
    hashes = all_gather_object(fingerprint(value))
    if len(set(hashes)) > 1:
        differing = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise DistributedError(
            f"the ranks were started with different {what} (rank 0 differs from rank(s) {differing}): start every "
            "rank with the same command line and files"
        )


def shard(items: list[T] | range, rank_: Optional[int] = None, world: Optional[int] = None) -> list[T]:
    """This rank's share of ``items``: every ``world``-th item from position ``rank`` (round-robin)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(items)[r::w]
