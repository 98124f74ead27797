"""Pair dataset and loader for bias alignment and evaluation.

Each item is one pair run as its own 2-image sequence: both images preprocessed like VGGT's loader
(``preprocess_images`` crop mode at ``image_size``; a pair whose two images come out with different shapes
is padded to the larger height / width with white, centred), the GT world-to-camera rotations of both
views and the pair's overlap label. Batches of pairs with different shapes are padded the same way by
``collate_pairs``.

Augmentation (training only; both off by default here, see ``AugmentConfig``) is a pure function of
``(seed, epoch, pair index)``: results do not depend on the number of workers, on the order pairs are
drawn in, or on whether a run was resumed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ns_extreme.align.pairs import PairFileError, PairList
from ns_extreme.io.images import preprocess_images, resized_size

__all__ = [
    "AugmentConfig",
    "PairDataset",
    "EpochBatchSampler",
    "collate_pairs",
    "load_pair_list",
    "resolve_images_root",
]


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation. Neither option comes from the paper (its augmentation is unknown)."""

    color_jitter: float = 0.0
    """Photometric jitter strength s: brightness, contrast and saturation factors drawn from [1−s, 1+s] per image
    (0 = off)."""
    swap_prob: float = 0.0
    """Probability of presenting the pair in reverse order (image 2 first); the GT rotations are swapped with
    the images, so the target relative rotation becomes its inverse."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {self.color_jitter}")
        if not 0.0 <= self.swap_prob <= 1.0:
            raise ValueError(f"swap_prob must be in [0, 1], got {self.swap_prob}")

    @property
    def enabled(self) -> bool:
        return self.color_jitter > 0 or self.swap_prob > 0


def load_pair_list(path: str | os.PathLike[str]) -> PairList:
    """``PairList.load_json`` with a clear error for a missing file (PairFileError, a ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise PairFileError(
            "pair list not found (build one with `ns-extreme-align pairs --sources ... --output pairs.json`)", file=path
        )
    pairs = PairList.load_json(path)
    if len(pairs) == 0:
        raise PairFileError("the pair list holds no pairs", file=path)
    return pairs


def resolve_images_root(
    pairs: PairList, pair_file: str | os.PathLike[str] | None, override: str | os.PathLike[str] | None
) -> Path:
    """The folder image paths are relative to: ``override`` if given, else the list's ``root``.

    A relative ``root`` is looked up next to the pair-list file first, then from the working directory.
    """
    if override is not None:
        root = Path(override).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--images-root {root} is not a folder")
        return root
    if not pairs.root:
        raise PairFileError(
            "the pair list has no image root (e.g. imported from a paper .npy); "
            "pass --images-root <MegaUnScene folder>",
            file=pair_file,
        )
    root = Path(pairs.root).expanduser()
    if not root.is_absolute() and pair_file is not None and (Path(pair_file).parent / root).is_dir():
        return Path(pair_file).parent / root
    if not root.is_dir():
        raise FileNotFoundError(
            f"image root {root} of pair list {pair_file} is not a folder; pass "
            "--images-root to say where the images are"
        )
    return root


def _seed_for(*parts: int) -> int:
    digest = hashlib.blake2b(" ".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def color_jitter(img: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation jitter of one [3, H, W] image in [0, 1] (random order not used)."""
    b, c, s = (1.0 + strength * (2.0 * torch.rand(3, generator=generator) - 1.0)).tolist()
    img = img * b
    mean = _grayscale(img).mean()
    img = (img - mean) * c + mean
    gray = _grayscale(img)
    img = (img - gray) * s + gray
    return img.clamp(0.0, 1.0)


def pad_to(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-pad ``[..., 3, h, w]`` with white (1.0) to ``height × width`` (VGGT's loader convention)."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    top, left = (height - h) // 2, (width - w) // 2
    return F.pad(images, (left, width - w - left, top, height - h - top), value=1.0)


class PairDataset(Dataset):
    """Items: ``images [2, 3, H, W]`` in [0, 1], ``R_gt [2, 3, 3]`` (w2c, float64), ``overlap``, ``index``,
    ``swapped``.

    Indices are pair indices, or ``(epoch, index)`` tuples (as yielded by ``EpochBatchSampler``) so that the
    augmentation of an item depends on the epoch too.
    """

    def __init__(
        self,
        pairs: PairList,
        images_root: str | os.PathLike[str],
        image_size: int = 518,
        patch_size: int = 14,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        cache: bool = False,
        check_files: bool = True,
    ) -> None:
        if image_size <= 0 or image_size % patch_size:
            raise ValueError(f"image_size must be a positive multiple of the patch size {patch_size}, got {image_size}")
        self.pairs = pairs
        self.root = Path(images_root)
        self.image_size = image_size
        self.patch_size = patch_size
        self.augment = augment or AugmentConfig()
        self.seed = seed
        self.cache = cache
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._R_gt = [torch.from_numpy(np.stack([r.view1.rotation(), r.view2.rotation()])) for r in pairs.records]
        if check_files:
            self.check_files()

    def __len__(self) -> int:
        return len(self.pairs.records)

    def image_paths(self, index: int) -> tuple[Path, Path]:
        rec = self.pairs.records[index]
        return self.root / rec.view1.path, self.root / rec.view2.path

    def expected_shape(self, index: int) -> tuple[int, int]:
        """(H, W) the pair will have after preprocessing, from the sizes stored in the pair list (no file read)."""
        rec = self.pairs.records[index]
        shapes = []
        for v in (rec.view1, rec.view2):
            h, w = resized_size((v.height, v.width), "crop", self.image_size, self.patch_size)
            shapes.append((min(h, self.image_size), w))
        return max(s[0] for s in shapes), max(s[1] for s in shapes)

    def check_files(self) -> None:
        """Raise FileNotFoundError naming the first missing image (and how many are missing)."""
        missing = []
        seen: set[Path] = set()
        for i in range(len(self)):
            for p in self.image_paths(i):
                if p not in seen:
                    seen.add(p)
                    if not p.is_file():
                        missing.append(p)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(seen)} images of the pair list are missing under "
                f"{self.root}, e.g. {missing[0]} "
                "(wrong --images-root?)"
            )

    def load_pair_images(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both preprocessed images ``[2, 3, H, W]`` padded to a common shape (no augmentation), and the mask
        ``[2, 1, H, W]`` of their real (not padding) pixels."""
        if self.cache and index in self._cache:
            return self._cache[index]
        batch = preprocess_images(
            list(self.image_paths(index)), mode="crop", target_size=self.image_size, patch_size=self.patch_size
        )
        valid = torch.from_numpy(np.stack([r.valid_mask_preprocessed() for r in batch.records]))[:, None]
        out = (batch.images, valid)
        if self.cache:
            self._cache[index] = out
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (0, int(key))
        if not 0 <= index < len(self):
            raise IndexError(index)
        images, valid = self.load_pair_images(index)
        R_gt = self._R_gt[index]
        swapped = False
        if self.augment.enabled:
            g = torch.Generator().manual_seed(_seed_for(self.seed, epoch, index))
            if self.augment.swap_prob > 0 and float(torch.rand((), generator=g)) < self.augment.swap_prob:
                images, valid, R_gt, swapped = images.flip(0), valid.flip(0), R_gt.flip(0), True
            if self.augment.color_jitter > 0:
                jittered = torch.stack([color_jitter(img, self.augment.color_jitter, g) for img in images])
                images = torch.where(valid, jittered, images)  # padding stays white
        return {
            "images": images.contiguous(),
            "R_gt": R_gt.contiguous(),
            "overlap": self.pairs.records[index].overlap,
            "index": index,
            "swapped": swapped,
        }


def collate_pairs(
    items: Sequence[dict[str, Any]], pad_shapes: Mapping[int, tuple[int, int, int]] | None = None
) -> dict[str, Any]:
    """Stack items into ``images [B, 2, 3, H, W]`` (white-padded to the largest H / W), ``R_gt [B, 2, 3, 3]``.

    ``pad_shapes`` (data-parallel training) maps a pair index to ``(H, W, size)`` of the global batch it is part
    of: a rank's slice is padded as the whole batch would be, and ``global_size`` says how many pairs it has (an
    empty slice, when the last batch has fewer pairs than ranks, collates to a batch of 0 pairs)."""
    if not items:
        return {"index": torch.zeros(0, dtype=torch.long), "global_size": _global_size(pad_shapes)}
    H = max(it["images"].shape[-2] for it in items)
    W = max(it["images"].shape[-1] for it in items)
    size = len(items)
    if pad_shapes is not None:
        gh, gw, size = pad_shapes[int(items[0]["index"])]
        H, W = max(H, gh), max(W, gw)
    return {
        "global_size": size,
        "images": torch.stack([pad_to(it["images"], H, W) for it in items]),
        "R_gt": torch.stack([it["R_gt"] for it in items]),
        "overlap": [it["overlap"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "swapped": torch.tensor([it["swapped"] for it in items], dtype=torch.bool),
    }


def _global_size(pad_shapes: Mapping[int, tuple[int, int, int]] | None) -> int:
    # an empty slice only occurs in the last (short) batch, whose size the sampler stored under key -1
    return int(pad_shapes[-1][2]) if pad_shapes and -1 in pad_shapes else 0


class EpochBatchSampler:
    """Batches of ``(epoch, index)`` of one epoch: a permutation seeded by ``(seed, epoch)`` (or the list order
    without ``shuffle``), cut into batches of ``batch_size`` (last one smaller), from batch ``start`` on.

    Deterministic, so a resumed run can skip exactly the batches it already trained on. With ``world_size`` > 1
    each global batch is cut into ``world_size`` contiguous slices and rank ``rank`` gets its slice (possibly
    empty in a short last batch): the ranks together see exactly the batches one process would.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        epoch: int,
        seed: int,
        shuffle: bool = True,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.n, self.batch_size, self.epoch, self.seed, self.shuffle, self.start = (
            n,
            batch_size,
            epoch,
            seed,
            shuffle,
            start,
        )
        self.rank, self.world_size = rank, world_size

    @staticmethod
    def batches_per_epoch(n: int, batch_size: int) -> int:
        return -(-n // batch_size)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch, 7919))
        return torch.randperm(self.n, generator=g).tolist()

    def global_batches(self) -> Iterator[list[int]]:
        """The pair indices of each global batch from ``start`` on (all ranks together)."""
        order = self._order()
        for b in range(self.start, self.batches_per_epoch(self.n, self.batch_size)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches():
            k, extra = divmod(len(batch), self.world_size)
            lo = self.rank * k + min(self.rank, extra)
            hi = lo + k + (1 if self.rank < extra else 0)
            yield [(self.epoch, i) for i in batch[lo:hi]]

    def global_pad_shapes(self, expected_shape: Callable[[int], tuple[int, int]]) -> dict[int, tuple[int, int, int]]:
        """Pair index -> ``(H, W, size)`` of its global batch (``expected_shape``: a pair's preprocessed shape),
        for ``collate_pairs(pad_shapes=...)``; key -1 holds the last batch (for empty rank slices)."""
        out: dict[int, tuple[int, int, int]] = {}
        for batch in self.global_batches():
            shapes = [expected_shape(i) for i in batch]
            entry = (max(h for h, _ in shapes), max(w for _, w in shapes), len(batch))
            out.update({i: entry for i in batch})
            out[-1] = entry
        return out

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch(self.n, self.batch_size) - self.start)
