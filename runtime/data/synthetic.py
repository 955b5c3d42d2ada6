"""Synthetic scenes with exact per-pixel masks, from numpy and OpenCV alone.

Training, tests, benchmarks and the `synthetic://` source all draw from here, so a fresh machine can run every
part of edgepix without downloading data. Scenes are deterministic per seed: textured, noisy backgrounds with
overlapping shapes of five classes, each class a shape with its own family of colours (hue varies within the
family, saturation, brightness and shading vary freely), at varied sizes, rotations and aspect ratios, with
occlusion, blur and sensor noise. The mask is rasterised from the same polygons as the image, before blur and
noise, so it is exact: the label of a pixel is the class of the topmost shape covering it.

Two appearances share the layouts (classes, shapes, positions, masks):

- `varied` (the default, for segmentation): colour, shading, background and noise are drawn independently of the
  layout, so a segmenter has to learn shapes and colour families, and nothing about a pixel's colour beyond its
  class's family can be predicted from the mask.
- `lit` (for mask -> image models such as pix2pix): the scene is *rendered from its layout*: a sky-to-ground
  background gradient, one light from the upper left that shades every object and casts its shadow down and to the
  right, class colours with little jitter, mild sensor noise and no blur. Most of the image is then a function of
  the mask that a generator can learn and that painting each class in its mean colour cannot express (gradients,
  shading, shadows). Colours stay inside each class's family, so segmenters trained on `varied` scenes read them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..core.errors import DataError, SinkError
from ..core.fileio import atomic_write_text, write_image
from ..description.spec import default_palette

CLASS_NAMES: tuple[str, ...] = ("background", "ellipse", "rectangle", "triangle", "star", "cross")
PALETTE: tuple[tuple[int, int, int], ...] = default_palette(len(CLASS_NAMES))
# OpenCV hue (0..179) at the centre of each shape class's colour family.
_CLASS_HUES = {1: 0, 2: 60, 3: 115, 4: 25, 5: 150}
_HUE_JITTER = 12
APPEARANCES = ("varied", "lit")
# Lit scenes: the light comes from the upper left (unit vector pointing away from it, in image x/y).
_LIGHT_AWAY = (math.sqrt(0.5), math.sqrt(0.5))


@dataclass(frozen=True)
class SceneConfig:
    size: tuple[int, int] = (256, 256)  # (H, W)
    min_objects: int = 3
    max_objects: int = 8
    min_radius: float = 0.07  # object radius as a fraction of the shorter side
    max_radius: float = 0.20
    blur_probability: float = 0.3
    max_blur_sigma: float = 1.5
    max_noise_sigma: float = 8.0
    clean: bool = False  # no blur, no noise, flat background: for tests that compare pixels with masks
    appearance: str = "varied"  # or "lit": see the module docstring

    def __post_init__(self) -> None:
        if self.appearance not in APPEARANCES:
            raise DataError(f"scene appearance must be one of {', '.join(APPEARANCES)}, got {self.appearance!r}")
        h, w = self.size
        if h < 16 or w < 16:
            raise DataError(f"scene size must be at least 16x16, got {h}x{w}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise DataError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_radius <= self.max_radius < 0.5:
            raise DataError(f"need 0 < min_radius <= max_radius < 0.5, got {self.min_radius}, {self.max_radius}")


@dataclass
class SceneObject:
    """One shape: class, centre and radius in pixels, rotation in degrees, BGR colour, motion per frame."""

    cls: int
    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float
    colour: tuple[int, int, int]
    shade: tuple[float, float]  # linear brightness gradient (direction in radians, strength)
    vx: float = 0.0
    vy: float = 0.0
    spin: float = 0.0

    def polygon(self) -> np.ndarray:
        unit = _UNIT_SHAPES[self.cls]
        pts = unit * np.array([self.radius, self.radius * self.aspect])
        a = math.radians(self.angle)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pts = pts @ rot.T + np.array([self.cx, self.cy])
        # Fixed-point polygon coordinates (shift=4) keep sub-pixel motion smooth in moving scenes.
        return np.round(pts * 16).astype(np.int32)


def _unit_shapes() -> dict[int, np.ndarray]:
    def regular(n: int, start: float = -90.0) -> np.ndarray:
        t = np.radians(start + np.arange(n) * 360.0 / n)
        return np.stack([np.cos(t), np.sin(t)], axis=1)

    star_outer = regular(5)
    star_inner = regular(5, start=-90.0 + 36.0) * 0.45
    star = np.empty((10, 2))
    star[0::2], star[1::2] = star_outer, star_inner
    arm = 0.33
    cross = np.array(
        [(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1), (-arm, 1), (-arm, arm),
         (-1, arm), (-1, -arm), (-arm, -arm)],
        dtype=np.float64,
    )
    return {
        1: regular(64),
        2: np.array([(-1, -0.75), (1, -0.75), (1, 0.75), (-1, 0.75)], dtype=np.float64),
        3: regular(3),
        4: star,
        5: cross,
    }


_UNIT_SHAPES = _unit_shapes()


def _random_colour(rng: np.random.Generator, cls: int) -> tuple[int, int, int]:
    hue = (_CLASS_HUES[cls] + rng.integers(-_HUE_JITTER, _HUE_JITTER + 1)) % 180
    hsv = np.array([[[hue, rng.integers(110, 256), rng.integers(110, 256)]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _lit_colour(rng: np.random.Generator, cls: int) -> tuple[int, int, int]:
    """The class's hue centre, saturated and bright, with a little jitter (lit scenes)."""
    hue = (_CLASS_HUES[cls] + rng.integers(-3, 4)) % 180
    hsv = np.array([[[hue, rng.integers(190, 221), rng.integers(200, 231)]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def random_objects(rng: np.random.Generator, config: SceneConfig, *, max_speed: float = 0.0) -> list[SceneObject]:
    h, w = config.size
    short = min(h, w)
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    lit = config.appearance == "lit"
    objects = []
    for _ in range(n):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        radius = float(rng.uniform(config.min_radius, config.max_radius) * short)
        speed = rng.uniform(0.3, 1.0) * max_speed
        heading = rng.uniform(0, 2 * math.pi)
        objects.append(
            SceneObject(
                cls=cls,
                cx=float(rng.uniform(0.1, 0.9) * w),
                cy=float(rng.uniform(0.1, 0.9) * h),
                radius=radius,
                angle=float(rng.uniform(0, 360)),
                aspect=float(rng.uniform(0.6, 1.0)),
                colour=_lit_colour(rng, cls) if lit else _random_colour(rng, cls),
                shade=((math.atan2(-_LIGHT_AWAY[1], -_LIGHT_AWAY[0]), 0.3) if lit else  # brighter towards the light
                       (float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.0, 0.35)))),
                vx=float(speed * math.cos(heading)),
                vy=float(speed * math.sin(heading)),
                spin=float(rng.uniform(-2.0, 2.0) * (max_speed > 0)),
            )
        )
    return objects


def random_background(rng: np.random.Generator, config: SceneConfig) -> np.ndarray:
    """A smooth low-saturation colour field with fine grain and a few soft blotches: no class looks like it."""
    h, w = config.size
    if config.clean:
        return np.full((h, w, 3), 96, dtype=np.uint8)
    if config.appearance == "lit":
        return lit_background(rng, config)
    cells = int(rng.integers(3, 8))
    coarse = rng.uniform(40, 200, size=(cells, cells, 3)).astype(np.float32)
    grey = coarse.mean(axis=2, keepdims=True)
    coarse = grey + (coarse - grey) * rng.uniform(0.1, 0.5)  # pull colours towards grey
    field_ = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, rng.uniform(3, 12), size=(h // 2 + 1, w // 2 + 1, 1)).astype(np.float32)
    grain = cv2.resize(grain, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
    return np.clip(field_ + grain, 0, 255).astype(np.uint8)


def lit_background(rng: np.random.Generator, config: SceneConfig) -> np.ndarray:
    """Sky to ground: a pale blue-grey top fading through a soft horizon to a darker brown-grey bottom, plus grain."""
    h, w = config.size
    horizon = 0.45 + float(rng.uniform(-0.03, 0.03))
    t = (np.arange(h, dtype=np.float32) / max(h - 1, 1))[:, None]
    sky = np.array([205, 190, 175], np.float32) - 40.0 * t / horizon  # BGR, darker towards the horizon
    ground = np.array([80, 105, 125], np.float32) - 30.0 * (t - horizon) / (1.0 - horizon)
    blend = 1.0 / (1.0 + np.exp(-(t - horizon) * 40.0))  # a soft horizon
    column = sky * (1.0 - blend) + ground * blend + float(rng.uniform(-8, 8))
    image = np.repeat(column[:, None, :], w, axis=1)
    grain = rng.normal(0, 2.0, size=(h, w, 1)).astype(np.float32)
    return np.clip(image + grain, 0, 255).astype(np.uint8)


def _cast_shadow(image: np.ndarray, obj: SceneObject, config: SceneConfig) -> None:
    """Darken where the object's shape falls when shifted away from the light (drawn before the object itself)."""
    h, w = config.size
    shift = 0.25 * obj.radius
    shadow = np.zeros((h, w), dtype=np.uint8)
    poly = obj.polygon() + np.round(np.array(_LIGHT_AWAY) * shift * 16).astype(np.int32)
    cv2.fillPoly(shadow, [poly], color=1, lineType=cv2.LINE_8, shift=4)
    inside = shadow.astype(bool)
    image[inside] = (image[inside].astype(np.float32) * 0.55).astype(np.uint8)


def render_scene(
    objects: list[SceneObject], background: np.ndarray, config: SceneConfig, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `objects` in order over `background`; return (BGR uint8 image, uint8 class mask)."""
    h, w = config.size
    image = background.copy()
    mask = np.zeros((h, w), dtype=np.uint8)
    yy, xx = None, None
    lit = config.appearance == "lit"
    for obj in objects:
        if lit:
            _cast_shadow(image, obj, config)
        poly = obj.polygon()
        cv2.fillPoly(mask, [poly], color=int(obj.cls), lineType=cv2.LINE_8, shift=4)
        direction, strength = obj.shade
        if strength > 0 and not config.clean:
            # Shade the object with a linear gradient so its colour is not flat.
            if yy is None:
                yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            layer = np.zeros((h, w), dtype=np.uint8)
            cv2.fillPoly(layer, [poly], color=1, lineType=cv2.LINE_8, shift=4)
            inside = layer.astype(bool)
            ramp = ((xx[inside] - obj.cx) * math.cos(direction) + (yy[inside] - obj.cy) * math.sin(direction))
            ramp = 1.0 + strength * ramp / max(obj.radius, 1.0)
            colour = np.asarray(obj.colour, dtype=np.float32)
            image[inside] = np.clip(colour[None, :] * ramp[:, None], 0, 255).astype(np.uint8)
        else:
            cv2.fillPoly(image, [poly], color=obj.colour, lineType=cv2.LINE_8, shift=4)
    if lit and not config.clean and rng is not None:  # mild sensor noise only: the rendering is the signal
        noise = rng.normal(0, float(rng.uniform(0.5, 3.0)), size=image.shape).astype(np.float32)
        image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    elif not config.clean and rng is not None:
        if rng.random() < config.blur_probability:
            image = cv2.GaussianBlur(image, (0, 0), sigmaX=float(rng.uniform(0.5, config.max_blur_sigma)))
        sigma = float(rng.uniform(0, config.max_noise_sigma))
        if sigma > 0.5:
            noise = rng.normal(0, sigma, size=image.shape).astype(np.float32)
            image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return image, mask


def make_scene(seed: int, config: SceneConfig = SceneConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One still scene: (BGR uint8 image HxWx3, uint8 mask HxW with values in 0..len(CLASS_NAMES)-1)."""
    rng = np.random.default_rng(seed)
    background = random_background(rng, config)
    objects = random_objects(rng, config)
    return render_scene(objects, background, config, rng)


@dataclass
class MovingScene:
    """A scene whose objects drift, spin and bounce off the borders; `next()` renders the following frame."""

    seed: int = 0
    config: SceneConfig = field(default_factory=SceneConfig)
    max_speed: float = 4.0  # pixels per frame
    frame_index: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._background = random_background(self._rng, self.config)
        self.objects = random_objects(self._rng, self.config, max_speed=self.max_speed)

    def _advance(self) -> None:
        h, w = self.config.size
        for obj in self.objects:
            obj.cx += obj.vx
            obj.cy += obj.vy
            obj.angle = (obj.angle + obj.spin) % 360.0
            if not 0 <= obj.cx <= w:
                obj.vx = -obj.vx
                obj.cx = min(max(obj.cx, 0.0), float(w))
            if not 0 <= obj.cy <= h:
                obj.vy = -obj.vy
                obj.cy = min(max(obj.cy, 0.0), float(h))

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        if self.frame_index > 0:
            self._advance()
        self.frame_index += 1
        return render_scene(self.objects, self._background, self.config, self._rng)

    def frames(self, n: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        count = 0
        while n is None or count < n:
            yield self.next()
            count += 1


# ---- the dataset folder format -------------------------------------------------------------------------


def write_classes_json(path: str | os.PathLike, names=CLASS_NAMES, palette=PALETTE) -> None:
    data = {"names": list(names), "palette": [list(c) for c in palette]}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_dataset(
    out: str | os.PathLike,
    n: int,
    *,
    size: tuple[int, int] = (256, 256),
    seed: int = 0,
    val_fraction: float = 0.2,
    appearance: str = "varied",
    progress=None,
) -> Path:
    """Write `n` scenes in the folder format the trainer reads.

    out/images/00000.png (BGR), out/masks/00000.png (class indices), out/classes.json (names and RGB palette),
    out/train.txt and out/val.txt (one stem per line). Scene i is `make_scene` of seed (seed, i), so a dataset is
    reproducible and the scenes of different seeds do not overlap.
    """
    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    images, masks = out / "images", out / "masks"
    try:
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create dataset folder {out}: {e.strerror or e}") from e
    config = SceneConfig(size=size, appearance=appearance)
    stems = []
    for i in range(n):
        image, mask = make_scene(scene_seed(seed, i), config)
        stem = f"{i:05d}"
        try:
            write_image(images / f"{stem}.png", image)
            write_image(masks / f"{stem}.png", mask)
        except SinkError as e:
            raise DataError(f"cannot write scene {stem} into {out}: {e}") from None
        stems.append(stem)
        if progress is not None:
            progress(1)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    atomic_write_text(out / "train.txt", "".join(s + "\n" for s in stems[: n - n_val]))
    atomic_write_text(out / "val.txt", "".join(s + "\n" for s in stems[n - n_val:]))
    write_classes_json(out / "classes.json")
    return out


def scene_seed(seed: int, index: int) -> int:
    """A distinct 63-bit seed for scene `index` of the dataset with seed `seed`."""
    # int() first: numpy < 2 refuses to shift a uint64 by a Python int
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]) >> 1
