"""Data for the generators: unconditional image sets (DCGAN) and paired A -> B sets (pix2pix).

Unconditional (`open_image_source`):
- `synthetic`: the synthetic scenes' images (`SyntheticSource`, the same scenes segmentation trains on);
- a folder of images (searched recursively; a dataset folder's `images/` when there is one).

Paired (`open_pair_source`), A is the generator's input and B its target:
- `synthetic`, or a segmentation dataset (the `edgepix data synth` layout, Pascal VOC): A = the class mask
  painted with the class palette (a BGR image), B = the scene image. This is "mask -> scene";
- `A/` + `B/` folders with matching file stems (optionally under `train/` and `val/`);
- side-by-side AB images (pix2pix's own datasets: each file is A | B, twice as wide as high), in `train/`, `val/`
  or the folder itself.
Splits: `val` folders when present, else `train.txt`/`val.txt`, else a fixed 10% of stems chosen by a hash of the
stem (the same rule as the segmentation folders), so the split does not change when files are added.

Tensors: images are normalised with the model's spec (`edgepix.train.transforms.normalize`: channel order,
scale, mean, std; pix2pix and DCGAN use mean = std = 0.5, i.e. [-1, 1]). Augmentation draws from
`np.random.default_rng([seed, epoch, index])`, so it does not depend on workers, processes or resumption.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from edgepix.runtime.core.errors import DataError
from edgepix.runtime.core.formats import IMAGE_SUFFIXES
from edgepix.runtime.description.spec import ModelSpec

from .data import (
    SYNTHETIC_VAL_SEED,
    ClassInfo,
    SegmentationSource,
    SyntheticSource,
    _stem_hash,
    open_source,
    read_image,
)
from .transforms import normalize

VAL_FRACTION = 0.1


# ---- colourised masks ---------------------------------------------------------------------------------


def colorize_mask(mask: np.ndarray, palette: Sequence[Sequence[int]], *, ignore_colour=(0, 0, 0)) -> np.ndarray:
    """Class-index mask (HxW) -> BGR uint8 image painted with the RGB `palette`; values outside it get
    `ignore_colour` (RGB)."""
    table = np.zeros((256, 3), np.uint8)
    table[:] = ignore_colour[::-1]
    for i, (r, g, b) in enumerate(palette):
        table[i] = (b, g, r)
    return table[mask]


# ---- unconditional sources -----------------------------------------------------------------------------


class ImageSource:
    """Images for an unconditional GAN. `load(i)` -> BGR uint8 HxWx3."""

    description = "images"

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> np.ndarray:
        raise NotImplementedError


class FolderImages(ImageSource):
    def __init__(self, paths: Sequence[Path], *, description: str) -> None:
        if not paths:
            raise DataError(f"{description}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        self.paths, self.description = list(paths), description

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])


class SegmentationImages(ImageSource):
    """The images of a segmentation source (synthetic scenes or a dataset folder); masks are ignored."""

    def __init__(self, source: SegmentationSource, *, description: str) -> None:
        self.source, self.description = source, description

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int) -> np.ndarray:
        return self.source.load(index)[0]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def open_image_source(data: str | os.PathLike, split: str = "train", *, seed: int = 0, synthetic_n: int = 2000,
                      synthetic_val_n: int = 200, size: tuple[int, int] = (64, 64),
                      appearance: str = "varied") -> ImageSource:
    """`synthetic`, a dataset folder (its images/), or any folder of images (searched recursively).
    `appearance` picks the synthetic scenes' look (runtime.data.synthetic); folders ignore it."""
    if str(data) == "synthetic":
        source = open_source("synthetic", split, seed=seed, synthetic_n=synthetic_n, synthetic_val_n=synthetic_val_n,
                             synthetic_size=size, synthetic_appearance=appearance)
        return SegmentationImages(source, description=f"synthetic {appearance} scenes [{split}]")
    root = Path(data)
    if not root.exists():
        raise DataError(f"data folder not found: {root} (expected a folder of images or 'synthetic')")
    if not root.is_dir():
        raise DataError(f"--data must be a folder of images or 'synthetic', got a file: {root}")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return SegmentationImages(open_source(root, split), description=f"{root} [{split}]")
    if (root / split).is_dir():
        return FolderImages(_image_files(root / split), description=f"{root / split}")
    files = _image_files(root)
    if split in ("train", "val") and not (root / "train").is_dir():
        chosen = [p for p in files if (_stem_hash(p.stem) < VAL_FRACTION) == (split == "val")]
        if chosen or split == "val":
            files = chosen
    return FolderImages(files, description=f"{root} [{split}]")


# ---- paired sources ------------------------------------------------------------------------------------


class PairSource:
    """A -> B pairs. `load(i)` -> (A BGR uint8, B BGR uint8, class-index mask or None).

    `a_is_label`: A is a colourised mask, so it is only ever resized with nearest-neighbour interpolation.
    `classes`: the class names and palette when A is a colourised mask (for specs and consistency scores).
    """

    a_is_label = False
    classes: ClassInfo | None = None
    description = "pairs"

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        raise NotImplementedError


class MaskToImagePairs(PairSource):
    """Segmentation samples as pairs: A = palette-coloured mask, B = image, plus the mask itself."""

    a_is_label = True

    def __init__(self, source: SegmentationSource, *, description: str) -> None:
        self.source, self.description = source, description
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        image, mask = self.source.load(index)
        return colorize_mask(mask, self.classes.palette), image, mask


class FolderPairs(PairSource):
    """A/ and B/ folders with matching stems."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], *, description: str, direction: str = "AtoB") -> None:
        if not pairs:
            raise DataError(f"{description}: no A/B pairs found")
        self.pairs, self.description, self.swap = list(pairs), description, direction == "BtoA"

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        a_path, b_path = self.pairs[index]
        a, b = read_image(a_path), read_image(b_path)
        if a.shape[:2] != b.shape[:2]:
            b = cv2.resize(b, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
        return (b, a, None) if self.swap else (a, b, None)


class SideBySidePairs(PairSource):
    """Images holding A | B side by side (the left half is A)."""

    def __init__(self, paths: Sequence[Path], *, description: str, direction: str = "AtoB") -> None:
        if not paths:
            raise DataError(f"{description}: no side-by-side AB images found")
        self.paths, self.description, self.swap = list(paths), description, direction == "BtoA"

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        ab = read_image(self.paths[index])
        h, w = ab.shape[:2]
        if w < 2 or w % 2:
            raise DataError(f"{self.paths[index]}: a side-by-side AB image needs an even width (A | B), got {w}x{h}")
        a, b = ab[:, : w // 2], ab[:, w // 2:]
        return (b, a, None) if self.swap else (a, b, None)


def _stems(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in out:
                raise DataError(f"{folder}: two files share the stem {p.stem!r} ({out[p.stem].name}, {p.name})")
            out[p.stem] = p
    return out


def _split_stems(root: Path, stems: Sequence[str], split: str) -> list[str]:
    split_file = root / f"{split}.txt"
    if split_file.exists():
        wanted = [s.strip() for s in split_file.read_text(encoding="utf-8").splitlines() if s.strip()]
        missing = [s for s in wanted if s not in stems]
        if missing:
            raise DataError(f"{split_file}: lists {missing[0]!r}, which is not in the A/B folders")
        return wanted
    return [s for s in stems if (_stem_hash(s) < VAL_FRACTION) == (split == "val")]


def _ab_folder_pairs(root: Path, split: str, direction: str) -> FolderPairs:
    base = root / split if (root / split / "A").is_dir() else root
    a_files, b_files = _stems(base / "A"), _stems(base / "B")
    if not a_files:
        raise DataError(f"{base / 'A'}: no images; expected A/ and B/ folders of images with matching names")
    lonely = sorted(set(a_files) ^ set(b_files))
    if lonely:
        where = "B" if lonely[0] in a_files else "A"
        raise DataError(f"{base}: {lonely[0]!r} has no partner in {where}/ ({len(lonely)} unmatched files); "
                        "A/ and B/ must hold files with the same names")
    stems = sorted(a_files)
    if base == root:
        stems = _split_stems(root, stems, split)
    if not stems:
        raise DataError(f"{root}: the {split} split of the A/B pairs is empty")
    return FolderPairs([(a_files[s], b_files[s]) for s in stems], description=f"{base} [{split}]",
                       direction=direction)


def open_pair_source(data: str | os.PathLike, split: str = "train", *, seed: int = 0, synthetic_n: int = 2000,
                     synthetic_val_n: int = 200, size: tuple[int, int] = (256, 256),
                     direction: str = "AtoB", appearance: str = "lit") -> PairSource:
    """Pairs for pix2pix from `synthetic`, a segmentation dataset, A/ + B/ folders or side-by-side AB images.
    `appearance` picks the synthetic scenes' look (runtime.data.synthetic); folders ignore it."""
    if direction not in ("AtoB", "BtoA"):
        raise DataError(f"--direction must be AtoB or BtoA, got {direction!r}")
    if str(data) == "synthetic":
        source = open_source("synthetic", split, seed=seed, synthetic_n=synthetic_n, synthetic_val_n=synthetic_val_n,
                             synthetic_size=size, synthetic_appearance=appearance)
        return MaskToImagePairs(source, description=f"synthetic mask -> {appearance} scene [{split}]")
    root = Path(data)
    if not root.exists():
        raise DataError(f"data folder not found: {root} (expected A/ + B/ folders, AB images, a segmentation "
                        "dataset or 'synthetic')")
    if not root.is_dir():
        raise DataError(f"--data must be a folder or 'synthetic', got a file: {root}")
    if (root / "A").is_dir() or (root / split / "A").is_dir():
        return _ab_folder_pairs(root, split, direction)
    if (root / "images").is_dir() or (root / "JPEGImages").is_dir() or any(root.glob("VOC*")):
        return MaskToImagePairs(open_source(root, split), description=f"{root} mask -> image [{split}]")
    folder = root / split if (root / split).is_dir() else root
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if folder == root:
        files = [p for p in files if (_stem_hash(p.stem) < VAL_FRACTION) == (split == "val")]
    return SideBySidePairs(files, description=f"{folder} (A|B images) [{split}]", direction=direction)


# ---- transforms and torch datasets ----------------------------------------------------------------------


def resize_center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale so the image covers `size` (H, W), then crop the centre: no stretching of unconditional samples."""
    h, w = size
    ih, iw = image.shape[:2]
    s = max(h / ih, w / iw)
    nh, nw = max(h, round(ih * s)), max(w, round(iw * s))
    if (nh, nw) != (ih, iw):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    y0, x0 = (nh - h) // 2, (nw - w) // 2
    return image[y0:y0 + h, x0:x0 + w]


class UnconditionalDataset(Dataset):
    """Images at the model's size in the spec's normalisation, with optional random horizontal flips."""

    def __init__(self, source: ImageSource, spec: ModelSpec, *, flip: bool = True, seed: int = 0,
                 cache: bool = True) -> None:
        self.source, self.spec, self.flip, self.seed = source, spec, flip, seed
        self.epoch = 0
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def image(self, index: int) -> np.ndarray:
        """The BGR uint8 image at the model's size (cached: resizing is the expensive part)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = resize_center_crop(self.source.load(index), self.spec.input_size)
        if self._cache is not None:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.image(index)
        if self.flip and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5:
            image = image[:, ::-1]
        return torch.from_numpy(normalize(np.ascontiguousarray(image), self.spec))


class PairedDataset(Dataset):
    """(A, B) tensors at the model's size in the spec's normalisation, plus the class mask when there is one.

    Training augmentation (`train=True`), as in pix2pix: resize to `load_size` (>= the model's size), take the same
    random crop of A and B, and flip both horizontally half the time. Colourised masks (A of mask -> image data)
    are resized with nearest-neighbour interpolation so that every pixel keeps a palette colour.
    """

    def __init__(self, source: PairSource, spec: ModelSpec, *, train: bool, load_size: int | None = None,
                 flip: bool = True, seed: int = 0) -> None:
        self.source, self.spec, self.train, self.flip, self.seed = source, spec, train, flip, seed
        h, w = spec.input_size
        self.load_size = (h, w) if not train or load_size is None else (max(h, load_size), max(w, load_size))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def _resize(self, a: np.ndarray, b: np.ndarray, m: np.ndarray | None, size: tuple[int, int]):
        h, w = size
        if a.shape[:2] != (h, w):
            a = cv2.resize(a, (w, h), interpolation=cv2.INTER_NEAREST if self.source.a_is_label else cv2.INTER_LINEAR)
        if b.shape[:2] != (h, w):
            b = cv2.resize(b, (w, h), interpolation=cv2.INTER_AREA if b.shape[0] > h else cv2.INTER_LINEAR)
        if m is not None and m.shape[:2] != (h, w):
            m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
        return a, b, m

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(A, B, mask) as BGR uint8 images at the model's size, augmented when training."""
        a, b, m = self.source.load(index)
        a, b, m = self._resize(a, b, m, self.load_size)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            h, w = self.spec.input_size
            lh, lw = self.load_size
            y0, x0 = int(rng.integers(0, lh - h + 1)), int(rng.integers(0, lw - w + 1))
            a, b = a[y0:y0 + h, x0:x0 + w], b[y0:y0 + h, x0:x0 + w]
            m = None if m is None else m[y0:y0 + h, x0:x0 + w]
            if self.flip and rng.random() < 0.5:
                a, b = a[:, ::-1], b[:, ::-1]
                m = None if m is None else m[:, ::-1]
        return np.ascontiguousarray(a), np.ascontiguousarray(b), None if m is None else np.ascontiguousarray(m)

    def __getitem__(self, index: int):
        a, b, m = self.sample(index)
        mask = torch.from_numpy(m.astype(np.int64)) if m is not None else torch.full(a.shape[:2], -1, dtype=torch.int64)
        return torch.from_numpy(normalize(a, self.spec)), torch.from_numpy(normalize(b, self.spec)), mask


def pregenerate(source, *, workers: int = 2) -> None:
    """Render synthetic scenes up front (a no-op for file sources)."""
    inner = getattr(source, "source", None)
    if isinstance(inner, SyntheticSource):
        inner.pregenerate(workers=workers)


def load_all(loader, n: int, *, workers: int = 2) -> list:
    """The first `n` items of `loader(i)` computed on a few threads (OpenCV releases the GIL)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(loader, range(n)))


__all__ = [
    "SYNTHETIC_VAL_SEED", "colorize_mask", "open_image_source", "open_pair_source", "UnconditionalDataset",
    "PairedDataset", "resize_center_crop", "pregenerate", "load_all",
]
