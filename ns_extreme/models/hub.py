"""Weights from the Hugging Face Hub: the local cache first, then one quick metadata request, then one download.

Left to itself, ``hf_hub_download`` retries an unreachable Hub with back-off (about 24 s per file name) and
logs every attempt (twice once a command has called ``logging.basicConfig``). Here the cache is looked up
without any request, ``HF_HUB_OFFLINE`` is read when asked (not when huggingface_hub was imported), and the
Hub gets one request per candidate file, without retries and under one deadline, before anything is
downloaded; the download itself then shows huggingface_hub's one progress bar.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ns_extreme.models.errors import WeightsNotFoundError

PROBE_TIMEOUT_S = 4.0
"""Seconds the Hub may take, name resolution included, to answer the metadata requests made before a download.
``HF_HUB_ETAG_TIMEOUT``, when set, replaces it (slow links)."""

_TRUE = ("1", "true", "yes", "on")


class HubUnreachableError(ConnectionError):
    """The Hub did not answer (no network, name resolution failed, timeout, server error); the message says why."""


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now, or huggingface_hub's own offline flag (read when it was imported)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def probe_timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT_S)
    except ValueError:
        return PROBE_TIMEOUT_S


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub's log messages below ERROR and its Python warnings off: failures reach us as exceptions."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hub_logger.setLevel(level)


def cached_file(repo_id: str, filenames: Sequence[str]) -> Optional[Path]:
    """The first of ``filenames`` in the local Hugging Face cache (revision ``main``), without any request."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _call_with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """``fn()`` in a daemon thread; TimeoutError after ``seconds`` (name resolution ignores socket timeouts)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome["error"] = err

    thread = threading.Thread(target=target, name="hub-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _head(url: str, timeout: float) -> None:
    from huggingface_hub import get_hf_file_metadata

    kwargs: dict[str, Any] = {"timeout": timeout}
    if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters:  # huggingface_hub >= 1.0
        kwargs["retry_on_errors"] = False
    get_hf_file_metadata(url, **kwargs)


def _first_on_hub(repo_id: str, filenames: Sequence[str], timeout: float) -> Optional[str]:
    from huggingface_hub import hf_hub_url

    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError

    for name in filenames:
        try:
            _head(hf_hub_url(repo_id, name), timeout)
            return name
        except EntryNotFoundError:
            continue
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def find_on_hub(repo_id: str, filenames: Sequence[str], timeout: Optional[float] = None) -> str:
    """The first of ``filenames`` that repository ``repo_id`` has, asked with one request per name, no retries.

    Raises HubUnreachableError when the Hub does not answer within ``timeout`` seconds in all (default:
    ``probe_timeout()``) or answers with a server error, and WeightsNotFoundError when the repository is
    missing, gated, or has none of the files.
    """
    try:
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError

    seconds = probe_timeout() if timeout is None else timeout
    not_found = f"Hugging Face repository {repo_id!r} not found or gated"
    try:
        with quiet_hub():
            found = _call_with_deadline(lambda: _first_on_hub(repo_id, filenames, seconds), seconds)
    except RepositoryNotFoundError as err:  # also GatedRepoError
        raise WeightsNotFoundError(f"{not_found}: {_first_line(err)}") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise WeightsNotFoundError(f"{not_found}: {_first_line(err)}") from None
        raise HubUnreachableError(f"the Hub at {hub_endpoint()} answered: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - network errors, timeouts, proxies (httpx or requests): unreachable
        reason = f"cannot reach the Hugging Face Hub at {hub_endpoint()}: {_first_line(err)}"
        raise HubUnreachableError(reason) from None
    if found is None:
        raise WeightsNotFoundError(f"Hugging Face repository {repo_id!r} has none of {', '.join(filenames)}")
    return found


def download(repo_id: str, filename: str) -> Path:
    """Download one file into the Hugging Face cache (huggingface_hub's progress bar; resumes partial files)."""
    from huggingface_hub import hf_hub_download

    try:
        with quiet_hub():
            return Path(hf_hub_download(repo_id, filename))
    except Exception as err:  # noqa: BLE001 - a dropped connection mid-download surfaces as any of several types
        raise WeightsNotFoundError(
            f"downloading {filename} of {repo_id!r} failed ({type(err).__name__}: {_first_line(err)}); "
            "run the command again to resume the download"
        ) from None
