"""Validation inputs for the parity gates, torch-free: synthetic scenes, a folder of the user's images (with their
masks when a dataset's masks/ folder has them), and the runtime's own pre-processing of them. The PyTorch gate
(export/verify.py) and the TFLite conversion's gate (export/tflite.py) take their inputs from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgepix.runtime.core.errors import DataError
from edgepix.runtime.core.formats import IMAGE_SUFFIXES
from edgepix.runtime.data.synthetic import SceneConfig, make_scene, scene_seed
from edgepix.runtime.description.spec import ModelSpec

# Seeds of verification scenes: far from the training (0) and validation (1) seeds of `train seg`.
VERIFY_SEED = 7_000_003


@dataclass
class Sample:
    image: np.ndarray  # BGR uint8
    mask: np.ndarray | None  # class indices, same H x W as image, or None when unlabelled


def synthetic_samples(n: int, size: tuple[int, int], *, seed: int = VERIFY_SEED) -> list[Sample]:
    config = SceneConfig(size=size)
    return [Sample(*make_scene(scene_seed(seed, i), config)) for i in range(n)]


def folder_samples(folder: str | os.PathLike, n: int) -> list[Sample]:
    """Up to `n` images from a folder (or the images/ of a dataset folder), with masks/ when present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    masks_dir = folder / "masks" if (folder / "masks").is_dir() else None
    stems_file = folder / "val.txt"
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if stems_file.exists():
        wanted = set(stems_file.read_text().split())
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {images_dir}")
    samples = []
    for p in paths[:n]:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"cannot read image {p}")
        mask = None
        if masks_dir is not None:
            mask_path = masks_dir / f"{p.stem}.png"
            mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED) if mask_path.exists() else None
            if mask is not None and mask.ndim != 2:
                mask = None  # colour masks are the trainer's business; the gate uses index masks only
        samples.append(Sample(image, mask))
    return samples


def preprocess(image: np.ndarray, spec: ModelSpec, size: tuple[int, int] | None = None) -> np.ndarray:
    """BGR uint8 image -> a batch of one float32 input in the spec's layout, exactly as the runtime's Segmenter
    feeds it."""
    from edgepix.runtime.tasks.imageops import Normalizer

    return Normalizer(spec, size or spec.input_size)([image])[0]
