"""Segmentation datasets: the `edgepix data synth` folder format, Pascal VOC, and synthetic scenes made on the fly.

A *source* knows where samples are and how to read them: `load(i)` returns (BGR uint8 image HxWx3, uint8 class-index
mask HxW) plus a name for error messages. `SegmentationDataset` wraps a source with a transform (augmentation for
training, resize for validation) and turns samples into tensors.

Folder sources are scanned before training starts (`scan()`): every image must have a mask and the reverse, every
image header must be readable, every mask is decoded once to check its size against its image and its values
against the classes. Problems raise a one-line `DataError` naming the file and the value.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset as _TorchDataset

from edgepix.runtime.core.errors import DataError
from edgepix.runtime.core.formats import IMAGE_SUFFIXES, MASK_SUFFIXES
from edgepix.runtime.data.synthetic import CLASS_NAMES, PALETTE, SceneConfig, make_scene, scene_seed
from edgepix.runtime.description.spec import default_palette

IGNORE_INDEX = 255
# The held-out synthetic scenes: a seed no training run uses by default, the same for every run so that runs with
# different --seed values are compared on the same scenes. Training refuses this seed.
SYNTHETIC_VAL_SEED = 2**31 - 1

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


@dataclass(frozen=True)
class ClassInfo:
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # RGB, one per class
    ignore_index: int | None = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.names)


# ---- reading files -------------------------------------------------------------------------------------


def read_image(path: Path) -> np.ndarray:
    """BGR uint8 HxWx3; grey and 16-bit images are converted; unreadable files raise DataError."""
    data = np.fromfile(str(path), dtype=np.uint8) if path.exists() else None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if image is None:
        raise DataError(f"{path}: cannot read image (missing, empty or not an image file); replace or remove it")
    return image


def read_mask(path: Path, classes: ClassInfo) -> np.ndarray:
    """A class-index mask (uint8 HxW) from a class-index PNG, a palette PNG or an RGB colour PNG.

    - single channel (8- or 16-bit): the values are the class indices;
    - palette PNG (colour type 3): the indices into the file's own palette, whatever its colours
      (Pascal VOC masks are such files, with 255 = ignore);
    - three or four channels: each RGB colour is looked up in the dataset palette (classes.json).
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read mask ({e.strerror or e})") from e
    png_palette = _png_palette(raw) if raw[:8] == b"\x89PNG\r\n\x1a\n" else None
    mask = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED) if raw else None
    if mask is None:
        raise DataError(f"{path}: cannot read mask (not an image file); replace or remove it")
    if png_palette is not None:  # OpenCV expands palette PNGs to BGR: map the colours back to their indices
        return _colours_to_indices(mask, png_palette, path, what="the file's own palette")
    if mask.ndim == 2:
        if mask.dtype != np.uint8:
            big = int(mask.max())
            if big > 255:
                raise DataError(f"{path}: mask value {big} does not fit a class index (max 255); "
                                "save masks as 8-bit class indices")
            mask = mask.astype(np.uint8)
        return mask
    if mask.dtype != np.uint8:
        raise DataError(f"{path}: colour masks must be 8-bit, got {mask.dtype}; save it as an 8-bit RGB PNG")
    if mask.shape[2] == 4:
        mask = mask[:, :, :3]
    palette = list(classes.palette)
    if classes.ignore_index is not None and classes.ignore_index >= len(palette):
        # Colour masks may mark ignored pixels with the VOC ignore colour (224, 224, 192) or white.
        extra = {classes.ignore_index: default_palette(256)[255]}
        return _colours_to_indices(mask, palette, path, what="the palette in classes.json", extra=extra)
    return _colours_to_indices(mask, palette, path, what="the palette in classes.json")


def _colours_to_indices(
    bgr: np.ndarray, palette: Sequence[Sequence[int]], path: Path, *, what: str,
    extra: dict[int, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    if bgr.ndim == 2:  # a palette PNG that OpenCV returned as grey (all-grey palette): values are the colours
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    elif bgr.shape[2] == 4:  # a palette with transparency comes back as BGRA; alpha carries no class
        bgr = bgr[:, :, :3]
    keys = (bgr[:, :, 2].astype(np.int32) << 16) | (bgr[:, :, 1].astype(np.int32) << 8) | bgr[:, :, 0]
    table: dict[int, int] = {}
    for index, (r, g, b) in enumerate(palette):
        table.setdefault((int(r) << 16) | (int(g) << 8) | int(b), index)
    for index, (r, g, b) in (extra or {}).items():
        table.setdefault((int(r) << 16) | (int(g) << 8) | int(b), index)
    colours = np.array(sorted(table), dtype=np.int32)
    indices = np.array([table[int(c)] for c in colours], dtype=np.uint8)
    pos = np.clip(np.searchsorted(colours, keys), 0, len(colours) - 1)
    found = colours[pos] == keys
    if not found.all():
        y, x = np.argwhere(~found)[0]
        key = int(keys[y, x])
        rgb = (key >> 16, (key >> 8) & 255, key & 255)
        raise DataError(
            f"{path}: colour RGB{rgb} at pixel (x={x}, y={y}) is not in {what}; expected a class colour or a "
            "class-index mask"
        )
    return indices[pos]


def _png_palette(raw: bytes) -> list[tuple[int, int, int]] | None:
    """The PLTE chunk of an indexed-colour PNG, or None when the PNG is not indexed."""
    if len(raw) < 33 or raw[12:16] != b"IHDR" or raw[25] != 3:
        return None
    pos = 8
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        if kind == b"PLTE":
            data = raw[pos + 8:pos + 8 + length]
            return [tuple(data[i:i + 3]) for i in range(0, len(data) - 2, 3)]  # type: ignore[misc]
        if kind == b"IDAT":
            break
        pos += 12 + length
    return None


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the PNG or JPEG header without decoding; other formats are decoded. DataError if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror or e})") from e
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        if w and h:
            return int(h), int(w)
    elif head[:2] == b"\xff\xd8":
        size = _jpeg_size(path)
        if size is not None:
            return size
    else:
        return read_image(path).shape[:2]
    raise DataError(f"{path}: cannot read image (corrupt or truncated header); replace or remove it")


def _jpeg_size(path: Path) -> tuple[int, int] | None:
    with open(path, "rb") as f:
        f.read(2)
        while True:
            byte = f.read(1)
            while byte and byte != b"\xff":
                byte = f.read(1)
            while byte == b"\xff":
                byte = f.read(1)
            if not byte:
                return None
            marker = byte[0]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                continue
            length_bytes = f.read(2)
            if len(length_bytes) < 2:
                return None
            length = struct.unpack(">H", length_bytes)[0]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                data = f.read(5)
                if len(data) < 5:
                    return None
                h, w = struct.unpack(">HH", data[1:5])
                return (h, w) if h and w else None
            f.seek(length - 2, os.SEEK_CUR)


def read_classes_json(path: Path) -> ClassInfo:
    """`{"names": [...], "palette": [[r, g, b], ...]?, "ignore_index": 255?}`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or "names" not in data:
        raise DataError(f'{path}: expected {{"names": [...], "palette": [[r, g, b], ...]}}, got {str(data)[:80]}')
    names = data["names"]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: 'names' must list at least 2 non-empty class names, got {names!r}")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: class names must be unique, got {names!r}")
    if len(names) > 255:
        raise DataError(f"{path}: at most 255 classes fit 8-bit masks, got {len(names)}")
    palette = data.get("palette")
    if palette is None:
        palette = [list(c) for c in default_palette(len(names))]
    ok = isinstance(palette, list) and len(palette) == len(names) and all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette
    )
    if not ok:
        raise DataError(f"{path}: 'palette' must give one [r, g, b] (0..255) per class ({len(names)}), "
                        f"got {str(palette)[:80]}")
    ignore = data.get("ignore_index", IGNORE_INDEX)
    if ignore is not None and (not isinstance(ignore, int) or 0 <= ignore < len(names) or not 0 <= ignore <= 255):
        raise DataError(f"{path}: 'ignore_index' must be null or a value in {len(names)}..255, got {ignore!r}")
    return ClassInfo(tuple(names), tuple(tuple(c) for c in palette), ignore)


# ---- sources -------------------------------------------------------------------------------------------


class SegmentationSource:
    """Where samples live. Subclasses set `classes` and implement `__len__`, `load(i)` and `name(i)`."""

    classes: ClassInfo

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def scan(self, *, workers: int | None = None) -> None:
        """Check every sample before training; raise DataError on the first problem. Nothing to check by default."""


class PairedFileSource(SegmentationSource):
    """Image files with mask files (the folder format and Pascal VOC)."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], classes: ClassInfo, *, description: str) -> None:
        if not pairs:
            raise DataError(f"{description}: no samples; expected image/mask pairs")
        self.pairs = list(pairs)
        self.classes = classes
        self.description = description

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, index: int) -> str:
        return str(self.pairs[index][0])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        mask = read_mask(mask_path, self.classes)
        if image.shape[:2] != mask.shape:
            raise DataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} "
                            f"is {image.shape[1]}x{image.shape[0]}; masks must match their images pixel for pixel")
        return image, mask

    def scan(self, *, workers: int | None = None) -> None:
        """Decode every mask once and read every image header: sizes, values and readability."""
        n_classes, ignore = self.classes.num_classes, self.classes.ignore_index

        def check(pair: tuple[Path, Path]) -> None:
            image_path, mask_path = pair
            h, w = image_size(image_path)
            mask = read_mask(mask_path, self.classes)
            if mask.shape != (h, w):
                raise DataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                f"{image_path.name} is {w}x{h}; masks must match their images pixel for pixel")
            counts = np.bincount(mask.ravel(), minlength=256)
            bad = [v for v in np.flatnonzero(counts) if v >= n_classes and v != ignore]
            if bad:
                valid = f"0..{n_classes - 1}" + (f" or {ignore} (ignore)" if ignore is not None else "")
                raise DataError(f"{mask_path}: mask value {bad[0]} is not a class (expected {valid}; "
                                f"{counts[bad[0]]} pixels); fix the mask or add the class to the class list")

        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:  # OpenCV decodes without the GIL
            for _ in pool.map(check, self.pairs):
                pass


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
            if p.stem in found:
                raise DataError(f"{folder}: two files share the stem {p.stem!r} ({found[p.stem].name}, {p.name}); "
                                "keep one")
            found[p.stem] = p
    return found


def _read_split(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read split file ({e.strerror or e})") from e
    stems = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    # A split file may list file names instead of stems.
    return [Path(s).stem if Path(s).suffix.lower() in IMAGE_SUFFIXES else s for s in stems]


def folder_source(root: str | os.PathLike, split: str, *, val_fraction: float = 0.1) -> PairedFileSource:
    """The `edgepix data synth` layout: images/, masks/ (same stems), classes.json, optional train.txt/val.txt.

    Without split files, a fixed share (`val_fraction`) of the stems, chosen by a hash of the stem, is the
    validation split, so the split does not change when files are added.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"--data must be a folder or 'synthetic', got a file: {root}")
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"{root}: expected sub-folders images/ and masks/ (the `edgepix data synth` layout), "
                            f"{d.name}/ is missing")
    classes_path = root / "classes.json"
    if not classes_path.exists():
        raise DataError(f"{root}: classes.json is missing; write "
                        '{"names": ["background", ...], "palette": [[0, 0, 0], ...]} there')
    classes = read_classes_json(classes_path)
    images = _files_by_stem(images_dir, IMAGE_SUFFIXES)
    masks = _files_by_stem(masks_dir, MASK_SUFFIXES)
    if not images:
        raise DataError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)}); the data folder is empty")
    lonely_images = sorted(set(images) - set(masks))
    if lonely_images:
        raise DataError(f"{images[lonely_images[0]]}: image has no mask in {masks_dir} "
                        f"({len(lonely_images)} images lack masks); add masks/{lonely_images[0]}.png or remove it")
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_masks:
        raise DataError(f"{masks[lonely_masks[0]]}: mask has no image in {images_dir} "
                        f"({len(lonely_masks)} masks lack images); add the image or remove the mask")
    split_file = root / f"{split}.txt"
    if split_file.exists():
        stems = _read_split(split_file)
        missing = [s for s in stems if s not in images]
        if missing:
            raise DataError(f"{split_file}: lists {missing[0]!r}, which has no image in {images_dir} "
                            f"({len(missing)} missing)")
    elif split in ("train", "val") and not (root / "train.txt").exists() and not (root / "val.txt").exists():
        stems = [s for s in images if (_stem_hash(s) < val_fraction) == (split == "val")]
    else:
        raise DataError(f"{root}: split file {split}.txt is missing (found: "
                        f"{', '.join(p.name for p in sorted(root.glob('*.txt'))) or 'none'})")
    if not stems:
        raise DataError(f"{root}: the {split} split is empty; list stems in {split}.txt")
    return PairedFileSource([(images[s], masks[s]) for s in stems], classes, description=f"{root} [{split}]")


def _stem_hash(stem: str) -> float:
    return (zlib.crc32(stem.encode("utf-8")) & 0xFFFFFFFF) / 2**32


def voc_source(root: str | os.PathLike, split: str) -> PairedFileSource:
    """Pascal VOC: JPEGImages/*.jpg, SegmentationClass/*.png (palette PNGs, 255 = ignore),
    ImageSets/Segmentation/{split}.txt. `root` is the VOC2012 folder or a VOCdevkit folder above it."""
    root = Path(root)
    if not (root / "JPEGImages").is_dir():
        candidates = sorted(p for p in root.glob("VOC*") if (p / "JPEGImages").is_dir())
        candidates += sorted(p for p in root.glob("VOCdevkit/VOC*") if (p / "JPEGImages").is_dir())
        if not candidates:
            raise DataError(f"{root}: not a Pascal VOC folder (expected JPEGImages/, SegmentationClass/ and "
                            "ImageSets/Segmentation/)")
        root = candidates[-1]
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.exists():
        raise DataError(f"{root}: split file ImageSets/Segmentation/{split}.txt is missing")
    pairs = []
    for stem in _read_split(split_file):
        image = root / "JPEGImages" / f"{stem}.jpg"
        mask = root / "SegmentationClass" / f"{stem}.png"
        if not image.exists():
            raise DataError(f"{split_file}: lists {stem!r} but {image} does not exist")
        if not mask.exists():
            raise DataError(f"{image}: image has no mask; expected {mask}")
        pairs.append((image, mask))
    classes = ClassInfo(VOC_CLASSES, default_palette(len(VOC_CLASSES)), IGNORE_INDEX)
    return PairedFileSource(pairs, classes, description=f"{root} [{split}]")


def is_voc(root: Path) -> bool:
    return (root / "JPEGImages").is_dir() or any((p / "JPEGImages").is_dir() for p in root.glob("VOC*")) or any(
        (p / "JPEGImages").is_dir() for p in root.glob("VOCdevkit/VOC*")
    )


class SyntheticSource(SegmentationSource):
    """Synthetic scenes `make_scene(scene_seed(seed, i))`, rendered on first use and kept in memory.

    `pregenerate()` renders them all up front (in a few worker threads), so training pays the ~7 ms per scene once.
    """

    def __init__(self, n: int, *, seed: int, size: tuple[int, int] = (256, 256), appearance: str = "varied") -> None:
        if n < 1:
            raise DataError(f"synthetic datasets need at least 1 scene, got {n}")
        self.n, self.seed, self.size = n, seed, tuple(size)
        self.config = SceneConfig(size=self.size, appearance=appearance)
        self.classes = ClassInfo(CLASS_NAMES, PALETTE, IGNORE_INDEX)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def name(self, index: int) -> str:
        return f"synthetic {self.config.appearance} scene {index} (seed {self.seed})"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        sample = self._cache.get(index)
        if sample is None:
            sample = make_scene(scene_seed(self.seed, index), self.config)
            self._cache[index] = sample
        return sample

    def pregenerate(self, *, workers: int = 1, progress=None) -> None:
        todo = [i for i in range(self.n) if i not in self._cache]

        def render(i: int) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
            return i, make_scene(scene_seed(self.seed, i), self.config)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, sample in pool.map(render, todo):
                self._cache[i] = sample
                if progress is not None:
                    progress(1)


def open_source(
    data: str | os.PathLike, split: str, *, seed: int = 0, synthetic_n: int = 2000, synthetic_val_n: int = 200,
    synthetic_size: tuple[int, int] = (256, 256), synthetic_appearance: str = "varied",
) -> SegmentationSource:
    """`data` is 'synthetic', a Pascal VOC folder or a folder in the `edgepix data synth` layout."""
    if str(data) == "synthetic":
        if split == "train":
            if seed == SYNTHETIC_VAL_SEED:
                raise DataError(f"--seed {seed} is reserved for the held-out synthetic scenes; choose another seed")
            return SyntheticSource(synthetic_n, seed=seed, size=synthetic_size, appearance=synthetic_appearance)
        return SyntheticSource(synthetic_val_n, seed=SYNTHETIC_VAL_SEED, size=synthetic_size,
                               appearance=synthetic_appearance)
    root = Path(data)
    if not root.exists():
        raise DataError(f"data folder not found: {root} (expected a dataset folder or 'synthetic')")
    if root.is_dir() and is_voc(root):
        return voc_source(root, split)
    return folder_source(root, split)


# ---- torch datasets ------------------------------------------------------------------------------------


class SegmentationDataset(_TorchDataset):
    """Samples of a source, transformed and normalised: (float32 3xHxW image, uint8 HxW mask) tensors.

    Random augmentation draws from `np.random.default_rng([seed, epoch, index])`, so a sample's augmentation does
    not depend on the worker that loads it, on the number of workers or processes, or on whether the run was
    resumed: call `set_epoch(epoch)` before iterating.
    """

    def __init__(self, source: SegmentationSource, transform, spec, *, seed: int = 0) -> None:
        self.source, self.transform, self.spec, self.seed = source, transform, spec, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        from .transforms import normalize

        image, mask = self.source.load(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, mask = self.transform(image, mask, rng)
        return torch.from_numpy(normalize(image, self.spec)), torch.from_numpy(np.ascontiguousarray(mask))


def collate(batch):
    """Stack images; stack masks when they share a size, else keep a list (evaluation at original resolution)."""
    images = torch.stack([b[0] for b in batch])
    masks = [b[1] for b in batch]
    if all(m.shape == masks[0].shape for m in masks):
        return images, torch.stack(masks)
    return images, masks
