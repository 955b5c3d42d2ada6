"""Joint image + mask transforms in numpy/OpenCV, and the input normalisation the runtime applies.

Masks are only ever resized with INTER_NEAREST, padded with the ignore index, cropped and flipped: a mask value is
always a value that was in the mask. Images are resized with INTER_LINEAR, as the runtime resizes frames.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from edgepix.runtime.description.spec import ModelSpec
from edgepix.runtime.tasks.imageops import Normalizer


def normalize(image_bgr: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """BGR uint8 HxWx3 (already at the model's size) -> float32 3xHxW, by the runtime's own `Normalizer`.

    Training feeds the network exactly what the deployed model will get: the channel order, scale and mean/std of
    the spec, computed by the same code (`x * (scale / std) - mean / std` in float32, tabulated per channel).
    """
    h, w = image_bgr.shape[:2]
    out = np.empty((3, h, w), dtype=np.float32)
    _normalizer(spec, (h, w)).fill(np.ascontiguousarray(image_bgr), out)
    return out


def preprocess(image_bgr: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """A frame as the runtime feeds it: stretch to spec.input_size (INTER_LINEAR), then normalise -> 3xHxW."""
    out = np.empty((3, *spec.input_size), dtype=np.float32)
    _normalizer(spec, spec.input_size).fill(np.ascontiguousarray(image_bgr), out)
    return out


@functools.lru_cache(maxsize=16)
def _normalizer(spec: ModelSpec, hw: tuple[int, int]) -> Normalizer:
    return Normalizer(spec, hw)


@dataclass(frozen=True)
class AugmentConfig:
    """Random scale (relative to the model's input size), crop, horizontal flip and colour jitter."""

    scale: tuple[float, float] = (0.75, 1.5)
    hflip: bool = True
    brightness: float = 0.25  # multiply by 1 +- this
    contrast: float = 0.25  # blend with the mean grey by 1 +- this
    saturation: float = 0.25  # scale HSV saturation by 1 +- this
    hue: float = 0.0  # shift HSV hue by +- this many degrees (0..180 scale); 0 keeps colour-coded classes intact
    jitter_probability: float = 0.8

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"augment scale range must satisfy 0 < low <= high, got {self.scale}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"augment {name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.hue <= 90:
            raise ValueError(f"augment hue must be in [0, 90], got {self.hue}")


class TrainTransform:
    """Random scale + crop to the model's input size, flip, colour jitter. Seeded per call for reproducibility."""

    def __init__(self, size: tuple[int, int], config: AugmentConfig = AugmentConfig(), *,
                 ignore_index: int | None = 255, pad_value: int = 114) -> None:
        self.size = tuple(size)
        self.config = config
        self.ignore_index = ignore_index
        self.pad_value = pad_value

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.size
        c = self.config
        s = float(rng.uniform(*c.scale))
        # The stretch to the input size (what the runtime does) times the random scale.
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        if (sh, sw) != image.shape[:2]:
            image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, (sw, sh), interpolation=cv2.INTER_NEAREST)
        if sh < h or sw < w:
            ph, pw = max(0, h - sh), max(0, w - sw)
            top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
            border = (top, ph - top, left, pw - left)
            if self.ignore_index is None:  # no label for padding: mirror image and mask alike
                image = cv2.copyMakeBorder(image, *border, cv2.BORDER_REFLECT_101)
                mask = cv2.copyMakeBorder(mask, *border, cv2.BORDER_REFLECT_101)
            else:
                image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=(self.pad_value,) * 3)
                mask = cv2.copyMakeBorder(mask, *border, cv2.BORDER_CONSTANT, value=self.ignore_index)
        y0 = int(rng.integers(0, image.shape[0] - h + 1))
        x0 = int(rng.integers(0, image.shape[1] - w + 1))
        image, mask = image[y0:y0 + h, x0:x0 + w], mask[y0:y0 + h, x0:x0 + w]
        if c.hflip and rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if rng.random() < c.jitter_probability:
            image = colour_jitter(image, rng, c)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, c: AugmentConfig) -> np.ndarray:
    x = image.astype(np.float32)
    if c.brightness:
        x *= float(rng.uniform(1 - c.brightness, 1 + c.brightness))
    if c.contrast:
        grey = float(x.mean())
        x = (x - grey) * float(rng.uniform(1 - c.contrast, 1 + c.contrast)) + grey
    x = np.clip(x, 0, 255)
    if c.saturation or c.hue:
        hsv = cv2.cvtColor(x.astype(np.uint8), cv2.COLOR_BGR2HSV).astype(np.float32)
        if c.saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * float(rng.uniform(1 - c.saturation, 1 + c.saturation)), 0, 255)
        if c.hue:
            hsv[..., 0] = (hsv[..., 0] + float(rng.uniform(-c.hue, c.hue))) % 180
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)
    return x.astype(np.uint8)


class EvalTransform:
    """Stretch the image to the model's input size; keep the mask at its own resolution (IoU is measured there)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = tuple(size)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None):
        h, w = self.size
        if image.shape[:2] != (h, w):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        return image, mask
