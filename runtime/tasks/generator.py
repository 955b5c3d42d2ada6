"""Generators without torch: noise -> image (DCGAN-style) and image -> image (pix2pix-style).

    from edgepix.runtime import NoiseGenerator, tile_grid
    with NoiseGenerator.load("dcgan.onnx") as gen:
        images = list(gen.generate(64, batch_size=16, seed=0))   # HxWx3 uint8 BGR each
    cv2.imwrite("grid.png", tile_grid(images, cols=8))

Noise: the latent size comes from the spec (and the input may be (N, L) or (N, L, 1, 1)). Latent i of seed s is
drawn from its own generator, `np.random.default_rng([s, i]).standard_normal(L)` in float32, so an image depends
only on (seed, index): the same images come out at any batch size, and a run can resume at any index.

Output: `output_kind = image` is a float (N, C, H, W) tensor in `spec.output_range` (e.g. [-1, 1] after tanh),
mapped linearly to 0..255 and rounded; `image_uint8` means the graph already did that and passes through. The
spec's channel order says whether the model's channels are RGB (converted to BGR) or BGR. NHWC outputs (last
dim 3) and single-channel outputs are handled too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..core.errors import InputError, ModelFormatError
from ..description.spec import ChannelOrder, ModelSpec, OutputKind, Task
from .imageops import Normalizer
from .model import input_meta, open_model, output_meta, pad_batch, split_overrides, static_batch, tile_count
from .processor import Prepared, prepare, to_frame_geometry


class _Generator:
    task: Task

    def __init__(self, backend: Backend, spec: ModelSpec) -> None:
        if spec.task is not self.task:
            raise ModelFormatError(f"{backend.path.name} is a {spec.task.value} model, not {self.task.value}")
        self.backend, self.spec = backend, spec
        self._in = input_meta(backend, spec)
        self._out = output_meta(backend, spec)
        self.static_batch = static_batch(self._in)
        lo, hi = spec.output_range or (0.0, 255.0)
        self._a = np.float32(255.0 / (hi - lo))
        self._b = np.float32(-lo * 255.0 / (hi - lo) + 0.5)  # + 0.5: the uint8 cast truncates, so this rounds
        self.last_ms: dict[str, float] = {}

    @classmethod
    def _open(cls, model, backend: str, overrides: dict[str, Any], options: dict[str, Any], **init: Any):
        more, backend_options = split_overrides(dict(options))
        overrides = {**more, **overrides}
        b, spec = open_model(model, backend, task=cls.task, overrides=overrides, backend_options=backend_options)
        try:
            return cls(b, spec, **init)
        except BaseException:
            if not isinstance(model, Backend):
                b.close()
            raise

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends `run` calls (the FrameProcessor protocol)."""
        return (self.backend,)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self.static_batch and n != self.static_batch:
            batch = pad_batch(batch, self.static_batch)
        return self.backend.infer({self._in.name: batch})[self._out.name][:n]

    def to_images(self, raw: np.ndarray) -> list[np.ndarray]:
        """Model output (N, C, H, W) or (N, H, W, C), C in {1, 3} -> HxWx3 uint8 BGR images."""
        if raw.ndim != 4:
            raise ModelFormatError(f"{self.backend.path.name}: expected an image output of rank 4, got shape "
                                   f"{raw.shape}")
        nhwc = raw.shape[1] not in (1, 3) and raw.shape[3] in (1, 3)
        images = []
        for x in raw:
            planes = [x[..., c] for c in range(x.shape[2])] if nhwc else list(x)
            h, w = planes[0].shape
            out = np.empty((h, w, 3), np.uint8)
            order = (2, 1, 0) if self.spec.channel_order is ChannelOrder.RGB else (0, 1, 2)
            for c, plane in enumerate(planes if len(planes) == 3 else planes * 3):
                dst = order[c]
                if self.spec.output_kind is OutputKind.IMAGE_UINT8 or plane.dtype == np.uint8:
                    out[..., dst] = plane
                else:
                    v = np.multiply(plane, self._a, dtype=np.float32)
                    np.add(v, self._b, out=v)
                    np.clip(v, 0.0, 255.0, out=v)
                    out[..., dst] = v  # unsafe cast truncates; +0.5 above made it round
            images.append(out)
        return images

    def describe(self) -> str:
        s = self.spec
        batch = f"static batch {self.static_batch}" if self.static_batch else "dynamic batch"
        size = f", input {s.input_size[0]}x{s.input_size[1]} {s.input_layout.value}" if s.input_size else ""
        return f"{s.model_name}: {s.task.value}{size}, {batch}, backend {self.backend.description}"

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoiseGenerator(_Generator):
    """Latent vectors -> images."""

    task = Task.GENERATION_NOISE

    def __init__(self, backend: Backend, spec: ModelSpec) -> None:
        super().__init__(backend, spec)
        shape = self._in.shape
        if len(shape) not in (2, 4) or (len(shape) == 4 and (self._in.dim(2), self._in.dim(3)) not in
                                        ((1, 1), (None, None))):
            raise ModelFormatError(f"{backend.path.name}: expected a latent input (N, L) or (N, L, 1, 1), found "
                                   f"{self._in.describe()}")
        if self._in.dim(1) not in (None, spec.latent_size):
            raise ModelFormatError(f"{backend.path.name}: the spec says latent size {spec.latent_size}, the input is "
                                   f"{self._in.describe()}")
        self.latent_size: int = spec.latent_size  # type: ignore[assignment]
        self._latent_rank = len(shape)

    @classmethod
    def load(cls, model: str | os.PathLike | Backend, backend: str = "auto", *,
             output_range: tuple[float, float] | None = None, **options: Any) -> NoiseGenerator:
        """Load a noise -> image generator. Keywords other than spec overrides go to the backend."""
        return cls._open(model, backend, {"output_range": output_range}, options)

    def latents(self, n: int, *, seed: int = 0, start: int = 0) -> np.ndarray:
        """Latent vectors start .. start+n-1 of `seed`, float32 (n, L)."""
        z = np.empty((n, self.latent_size), np.float32)
        for i in range(n):
            z[i] = np.random.default_rng([seed, start + i]).standard_normal(self.latent_size, dtype=np.float32)
        return z

    def generate_from(self, z: np.ndarray) -> list[np.ndarray]:
        """Images for the latent vectors `z` (n, L), in one inference call (chunked for a static batch)."""
        z = np.asarray(z)
        if z.ndim != 2 or z.shape[1] != self.latent_size or z.dtype != np.float32:
            raise InputError(f"latents: expected float32 (n, {self.latent_size}), got {z.dtype.name} {z.shape}")
        feed = z.reshape(z.shape[0], self.latent_size, 1, 1) if self._latent_rank == 4 else z
        step = self.static_batch or len(feed)
        images: list[np.ndarray] = []
        for s in range(0, len(feed), step):
            images.extend(self.to_images(self._run(np.ascontiguousarray(feed[s:s + step]))))
        return images

    def generate(self, n: int, batch_size: int = 8, *, seed: int = 0, start: int = 0) -> Iterator[np.ndarray]:
        """Yield `n` HxWx3 uint8 BGR images, running `batch_size` latents per call (a static-batch model uses its
        own batch size). Image i depends only on (seed, start + i)."""
        if n < 0 or batch_size < 1:
            raise InputError(f"generate: expected n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        step = self.static_batch or batch_size
        for s in range(0, n, step):
            k = min(step, n - s)
            t0 = time.perf_counter()
            z = self.latents(k, seed=seed, start=start + s)
            t1 = time.perf_counter()
            feed = z.reshape(k, self.latent_size, 1, 1) if self._latent_rank == 4 else z
            raw = self._run(feed)
            t2 = time.perf_counter()
            images = self.to_images(raw)
            t3 = time.perf_counter()
            self.last_ms = {"latents": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3,
                            "batch": float(k)}
            yield from images


class ImageGenerator(_Generator):
    """Image -> image, with the spec's pre-processing (resize, channel order, scale/mean/std). A FrameProcessor
    (runtime.tasks.processor), so the stream pipeline runs it on every source into every sink."""

    task = Task.GENERATION_IMAGE

    def __init__(self, backend: Backend, spec: ModelSpec, *, max_batch: int | None = None,
                 to_frame_size: bool = False) -> None:
        super().__init__(backend, spec)
        if max_batch is not None and max_batch < 1:
            raise InputError(f"max_batch: expected a positive integer or None, got {max_batch!r}")
        self.normalizer = Normalizer(spec, spec.input_size)
        self.max_batch = self.static_batch or max_batch
        self.to_frame_size = to_frame_size  # outputs at the input's size (else the model's, letterbox cropped)

    @classmethod
    def load(cls, model: str | os.PathLike | Backend, backend: str = "auto", *,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             output_range: tuple[float, float] | None = None, max_batch: int | None = None,
             to_frame_size: bool = False, **options: Any) -> ImageGenerator:
        """Load an image -> image generator. Keywords other than spec overrides go to the backend."""
        return cls._open(model, backend, {"mean": mean, "std": std, "output_range": output_range}, options,
                         max_batch=max_batch, to_frame_size=to_frame_size)

    # ---- stages (the FrameProcessor protocol) --------------------------------------------------------------

    def preprocess(self, frames: Sequence[np.ndarray], *, out: np.ndarray | None = None) -> Prepared:
        """BGR frames -> the model's input tensor (see runtime.tasks.processor.prepare)."""
        return prepare(self.normalizer, self.static_batch, frames, out)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """The backend call on a prepared tensor; returns the raw output images."""
        return self.backend.infer({self._in.name: tensor})[self._out.name]

    def postprocess(self, raw: np.ndarray, prepared: Prepared, *, to_frame_size: bool | None = None
                    ) -> list[np.ndarray]:
        """Raw output -> one HxWx3 uint8 BGR image per frame (padding slots dropped, letterbox border cropped)."""
        resize = self.to_frame_size if to_frame_size is None else to_frame_size
        return [to_frame_geometry(image, g, resize=resize)
                for image, g in zip(self.to_images(raw[:prepared.n]), prepared.geometries)]

    def render(self, frame: np.ndarray, result: np.ndarray) -> np.ndarray:
        """What the sinks get: the generated image."""
        return result

    # ---- all stages ----------------------------------------------------------------------------------------

    def generate(self, image: np.ndarray, *, to_frame_size: bool | None = None) -> np.ndarray:
        """One BGR uint8 image in, one out (at the model's size, or the input's with `to_frame_size`)."""
        return self.generate_batch([image], to_frame_size=to_frame_size)[0]

    def generate_batch(self, images: Sequence[np.ndarray], *, to_frame_size: bool | None = None
                       ) -> list[np.ndarray]:
        """Images of any sizes, in chunks of `max_batch` (a static-batch model: its batch; default: all at once)."""
        step = self.max_batch or max(1, len(images))
        outputs: list[np.ndarray] = []
        for s in range(0, len(images), step):
            prepared = self.preprocess(images[s:s + step])
            t1 = time.perf_counter()
            raw = self.run(prepared.tensor)
            t2 = time.perf_counter()
            outputs.extend(self.postprocess(raw, prepared, to_frame_size=to_frame_size))
            self.last_ms = {"preprocess": prepared.ms, "infer": (t2 - t1) * 1e3,
                            "postprocess": (time.perf_counter() - t2) * 1e3, "batch": float(prepared.n)}
        return outputs


def tile_grid(images: Sequence[np.ndarray], cols: int | None = None, *, pad: int = 2,
              pad_value: int = 0) -> np.ndarray:
    """Tile same-sized HxWx3 images into one grid image, row by row (cols defaults to ceil(sqrt(n)));
    `pad` pixels of `pad_value` between and around tiles."""
    if len(images) == 0:
        raise InputError("tile_grid: expected at least one image, got none")
    first = np.asarray(images[0])
    for i, im in enumerate(images):
        if im.shape != first.shape or im.dtype != first.dtype:
            raise InputError(f"tile_grid: image {i} is {im.dtype.name} {im.shape}, expected {first.dtype.name} "
                             f"{first.shape} like image 0")
    if cols is not None and cols < 1:
        raise InputError(f"tile_grid: cols must be positive, got {cols}")
    cols, rows = tile_count(len(images), cols)
    h, w = first.shape[:2]
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, *first.shape[2:]), pad_value, first.dtype)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = im
    return grid
