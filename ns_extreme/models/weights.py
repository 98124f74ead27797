"""Finding and reading base weights: Hugging Face ids (cache and offline mode honoured) or local files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

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
    """The weights file of a Hugging Face repository: from the cache, else downloaded once (fails in seconds
    when the Hub cannot be reached; see ``ns_extreme.models.hub``)."""
    from ns_extreme.models import hub

    names = WEIGHT_FILENAMES[:2]
    with hub.quiet_hub():
        found = hub.cached_file(repo_id, names)
    if found is not None:
        return found
    if hub.hub_offline():
        reason = "offline mode (HF_HUB_OFFLINE=1)"
    else:
        try:
            return hub.download(repo_id, hub.find_on_hub(repo_id, names))
        except hub.HubUnreachableError as err:
            reason = str(err)
    raise WeightsNotFoundError(
        f"weights {repo_id!r} are not in the local cache and cannot be downloaded ({reason}). " + _how_to_get(repo_id)
    )


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


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_SAFETENSORS_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file (absolute byte offsets)."""

    dtype: torch.dtype
    shape: torch.Size
    start: int
    end: int


def _not_safetensors(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: not a readable safetensors file ({why})")


def safetensors_index(path: Path) -> dict[str, TensorEntry]:
    """Names, dtypes, shapes and offsets from a safetensors header (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _not_safetensors(path, "file too short")
            n = int.from_bytes(prefix, "little")
            if n <= 1 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise _not_safetensors(path, f"bad header length {n}")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as err:
        raise _not_safetensors(path, str(err)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _not_safetensors(path, f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "header is not a JSON object")
    base = 8 + n
    index: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = torch.Size(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise _not_safetensors(path, f"bad header entry for {name!r}: {err!r}") from None
        nbytes = shape.numel() * dtype.itemsize
        if begin < 0 or end - begin != nbytes or base + end > size:
            raise _not_safetensors(
                path, f"tensor {name!r} does not fit the file (offsets {begin}..{end}, {nbytes} bytes expected)"
            )
        index[name] = TensorEntry(dtype, shape, base + begin, base + end)
    return index


class WeightsReader:
    """Reads a weights file one tensor at a time, converting each to the dtype asked for.

    safetensors files are read with plain file reads into the final tensor (no memory map whose pages
    would count as resident memory, no full state dict in memory): loading a model this way peaks at the
    size of the loaded model plus one source tensor. Torch files are memory-mapped (``torch.load(mmap=True)``).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = None
        self._buffer: Optional[torch.Tensor] = None
        if self.path.suffix == ".safetensors":
            self._index = safetensors_index(self.path)
            self._tensors: dict[str, torch.Tensor] = {}
            self.shapes = {k: e.shape for k, e in self._index.items()}
        else:
            self._index = {}
            self._tensors = _load_torch_file(self.path)
            self.shapes = {k: v.shape for k, v in self._tensors.items()}

    def __enter__(self) -> "WeightsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buffer = None
        self._tensors = {}

    def _read_into(self, entry: TensorEntry, out: torch.Tensor) -> None:
        if self._file is None:
            self._file = open(self.path, "rb")
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        self._file.seek(entry.start)
        done = 0
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                raise _not_safetensors(self.path, "file ended inside a tensor")
            done += n

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Tensor ``name`` as ``dtype`` (default: as stored), on the CPU.

        From safetensors: a new tensor owned by the caller. From torch files in their stored dtype: the tensor
        ``torch.load`` gave (for zip files a private, copy-on-write memory map of the file), not a copy, which
        would double the peak memory of loading; callers must not modify it in place."""
        if name in self._tensors:
            t = self._tensors[name]
            return t if dtype is None or not t.is_floating_point() else t.to(dtype)
        entry = self._index[name]
        if dtype is None or dtype == entry.dtype or not entry.dtype.is_floating_point:
            out = torch.empty(entry.shape, dtype=entry.dtype)
            if out.numel():
                self._read_into(entry, out)
            return out
        # Convert through one reusable buffer in the file's dtype.
        nbytes = entry.end - entry.start
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        src = self._buffer[:nbytes].view(entry.dtype).view(entry.shape)
        if src.numel():
            self._read_into(entry, src)
        return src.to(dtype)


def torch_load_failure(path: Path, what: str, err: Exception) -> ModelLoadError:
    """One-line reason a ``torch.load(weights_only=True)`` failed, without torch's advice to disable the check."""
    if isinstance(err, pickle.UnpicklingError):
        reason = "it contains pickled Python objects, which could run code when loaded; only plain tensors are accepted"
    else:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'damaged file'}"
    return ModelLoadError(f"{path}: refused as a {what} ({reason}; read with torch.load weights_only=True)")


ZIP_LOCAL_HEADER = b"PK\x03\x04"


def _is_zip_format(path: Path) -> bool:
    """Whether a torch file is in the zip format (torch >= 1.6), decided as torch.load does: by its first bytes.
    (``zipfile.is_zipfile`` looks for an end-of-archive record anywhere in the last 64 KiB, so a legacy file
    whose last tensor happens to contain those bytes would pass it, and then fail ``torch.load(mmap=True)``.)"""
    try:
        with open(path, "rb") as f:
            return f.read(len(ZIP_LOCAL_HEADER)) == ZIP_LOCAL_HEADER
    except OSError:
        return False


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    # Zip-format files are memory-mapped; the legacy (pre-1.6) format cannot be, so it is read normally.
    mmap = _is_zip_format(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise torch_load_failure(path, "torch weights file", err) from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path}: expected a dict of tensors (a state dict)")
    return obj


def read_state_dict(path: Path, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors or torch file (floating-point ones converted to ``dtype`` if given).
    Torch files are read with weights_only=True (no code runs). ``load_model`` streams instead."""
    with WeightsReader(Path(path)) as reader:
        return {name: reader.read(name, dtype) for name in reader.shapes}


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    expected: Mapping[str, torch.Size],
    given: Mapping[str, Union[torch.Tensor, torch.Size]],
    ignored_prefixes: tuple[str, ...],
    source: str,
) -> dict[str, Union[torch.Tensor, torch.Size]]:
    """Strict key/shape check of tensors or of their shapes. Returns the entries to load; raises
    ModelLoadError naming offending keys."""
    used = {k: v for k, v in given.items() if not k.startswith(ignored_prefixes)}
    shape = {k: torch.Size(v.shape if isinstance(v, torch.Tensor) else v) for k, v in used.items()}
    missing = set(expected) - set(used)
    unexpected = set(used) - set(expected)
    mis_shaped = [
        f"{k} {tuple(shape[k])} != {tuple(expected[k])}" for k in set(used) & set(expected) if shape[k] != expected[k]
    ]
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
