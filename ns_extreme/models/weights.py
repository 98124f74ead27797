"""Finding and reading base weights: Hugging Face ids (cache and offline mode honoured) or local files."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ns_extreme.models.errors import ModelLoadError, WeightsNotFoundError

WEIGHT_FILENAMES = ("model.safetensors", "model.pt", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ResolvedWeights:
    source: str
    """What the user asked for: a Hugging Face id or a path."""
    path: Path
    """The weights file on disk."""


def _how_to_get(repo_id: str) -> str:
    return (
        f"On a machine with internet run `huggingface-cli download {repo_id} model.safetensors`, then either copy "
        "its Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME) here or pass the file with "
        "`--weights /path/to/model.safetensors`."
    )


def _find_in_folder(folder: Path) -> Path:
    for name in WEIGHT_FILENAMES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsNotFoundError(f"no weights file ({', '.join(WEIGHT_FILENAMES)}) in folder {folder}")


def resolve_weights(weights: str | os.PathLike) -> ResolvedWeights:
    """A local file, a local folder holding one of WEIGHT_FILENAMES, or a Hugging Face repository id."""
    text = str(weights)
    path = Path(text).expanduser()
    if path.is_dir():
        return ResolvedWeights(text, _find_in_folder(path))
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ModelLoadError(f"{path}: unsupported weights file type (expected {', '.join(WEIGHT_SUFFIXES)})")
        return ResolvedWeights(text, path)
    if path.suffix in WEIGHT_SUFFIXES or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise WeightsNotFoundError(f"weights file not found: {path}")
    return ResolvedWeights(text, _download(text))


def _download(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    # Cache first: it is instant, while an unreachable hub costs several retries.
    for local_only in (True,) if offline else (True, False):
        for name in WEIGHT_FILENAMES[:2]:
            try:
                return Path(hf_hub_download(repo_id, name, local_files_only=local_only))
            except (LocalEntryNotFoundError, EntryNotFoundError):
                continue
            except RepositoryNotFoundError as err:
                raise WeightsNotFoundError(f"Hugging Face repository {repo_id!r} not found or gated: {err}") from None
    mode = "offline mode (HF_HUB_OFFLINE=1)" if offline else "no network connection to the Hugging Face Hub"
    raise WeightsNotFoundError(f"weights {repo_id!r} are not in the local cache and cannot be downloaded ({mode}). " + _how_to_get(repo_id))


def fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of size + first and last MiB: identifies a multi-GB file in milliseconds."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch file. Torch files are read with weights_only=True (no code runs)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise ModelLoadError(
            f"{path}: cannot be read as a torch weights file with weights_only=True ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). Files that need arbitrary pickled code are refused."
        ) from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path}: expected a dict of tensors (a state dict)")
    return obj


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    expected: dict[str, torch.Size], given: dict[str, torch.Tensor], ignored_prefixes: tuple[str, ...], source: str
) -> dict[str, torch.Tensor]:
    """Strict key/shape check. Returns the tensors to load; raises ModelLoadError naming offending keys."""
    used = {k: v for k, v in given.items() if not k.startswith(ignored_prefixes)}
    missing = set(expected) - set(used)
    unexpected = set(used) - set(expected)
    mis_shaped = [f"{k} {tuple(used[k].shape)} != {tuple(expected[k])}" for k in set(used) & set(expected) if used[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} keys with the wrong shape: {_listing(mis_shaped, 4)}")
    if problems:
        raise ModelLoadError(f"{source} does not fit this model (wrong model or config?): " + "; ".join(problems))
    return used
