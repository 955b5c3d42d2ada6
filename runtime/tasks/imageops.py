"""Image operations shared by the Segmenter and the generators: frame checks, resize geometry, the fused
normalisation into a model's input tensor, and the fast per-pixel argmax and confidence of logits.

Everything stays in uint8 or float32 (never float64) and runs in OpenCV or in numpy ufuncs writing into
preallocated buffers, because on a 2-core device every millisecond spent here is taken from the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..core.errors import InputError
from ..description.spec import ChannelOrder, Layout, ModelSpec, ResizeMode

# ---- frames --------------------------------------------------------------------------------------------------


def as_bgr(frame: object, *, name: str = "frame") -> np.ndarray:
    """Return `frame` as a contiguous HxWx3 uint8 BGR array.

    Grayscale (HxW or HxWx1) and BGRA (HxWx4) frames are converted; anything else (floats, other channel
    counts, empty images, non-arrays) raises InputError that states the expected and the actual shape and dtype.
    """
    expected = "a uint8 BGR image of shape (H, W, 3) (or grayscale (H, W), (H, W, 1), or BGRA (H, W, 4))"
    if not isinstance(frame, np.ndarray):
        raise InputError(f"{name}: expected {expected}, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        hint = ("; if it holds 0..1 floats, convert with (np.clip(img, 0, 1) * 255).round().astype(np.uint8)"
                if frame.dtype.kind == "f" else "; convert it to uint8")
        raise InputError(f"{name}: expected {expected}, got dtype {frame.dtype.name} with shape {frame.shape}{hint}")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (1, 3, 4)):
        if frame.shape[0] < 1 or frame.shape[1] < 1:
            raise InputError(f"{name}: expected a non-empty image, got shape {frame.shape}")
        frame = np.ascontiguousarray(frame)
        if frame.ndim == 2 or frame.shape[2] == 1:
            return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        if frame.shape[2] == 4:
            return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
        return frame
    raise InputError(f"{name}: expected {expected}, got shape {frame.shape}")


# ---- geometry ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where a frame of `frame_hw` landed inside a model input of `input_hw`.

    With stretch resize the content fills the input (top = left = 0, content_hw = input_hw). With letterbox the
    frame is scaled by one factor to fit, centred, and the border is padded: content_hw is the scaled frame and
    (top, left) its offset. Post-processing crops the content back out and resizes it to the frame.
    """

    frame_hw: tuple[int, int]
    input_hw: tuple[int, int]
    content_hw: tuple[int, int]
    top: int = 0
    left: int = 0

    @property
    def padded(self) -> bool:
        return self.content_hw != self.input_hw


def letterbox_geometry(frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> Geometry:
    """The letterbox placement: scale r = min(H/h, W/w), size round(h*r) x round(w*r), centred (the extra pixel
    of an odd border goes to the bottom/right). Training code should letterbox the same way."""
    (h, w), (H, W) = frame_hw, input_hw
    r = min(H / h, W / w)
    nh, nw = min(H, max(1, round(h * r))), min(W, max(1, round(w * r)))
    return Geometry(frame_hw, input_hw, (nh, nw), (H - nh) // 2, (W - nw) // 2)


def stretch_geometry(frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> Geometry:
    return Geometry(tuple(frame_hw), tuple(input_hw), tuple(input_hw))  # type: ignore[arg-type]


# ---- pre-processing ------------------------------------------------------------------------------------------


class Normalizer:
    """Turns BGR uint8 frames into a model's float32 input, one fused pass per channel.

    The spec's `scale`, `mean` and `std` fold into one multiply-add per channel, `u * a + b` with
    a = scale / std and b = -mean / std (float32). Because the input is uint8, that function has only 256 values
    per channel: they are tabulated once, and each channel is one `cv2.LUT` from the resized uint8 plane straight
    into its slice of the (preallocated) NCHW tensor, bit-identical to evaluating `u * a + b` in float32 and
    about twice as fast as numpy ufuncs. The channel swap (BGR -> RGB) is a choice of source plane; letterbox
    content is written into the tensor's centre region in place and the border set to the normalised pad value.
    NHWC models get one 3-channel LUT into the interleaved tensor.
    """

    def __init__(self, spec: ModelSpec, input_hw: tuple[int, int]) -> None:
        self.spec = spec
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        std = np.asarray(spec.std, dtype=np.float32)
        self.a = (np.float32(spec.scale) / std).astype(np.float32)
        self.b = (-np.asarray(spec.mean, dtype=np.float32) / std).astype(np.float32)
        # model channel c reads BGR plane src[c]
        self.src = (2, 1, 0) if spec.channel_order is ChannelOrder.RGB else (0, 1, 2)
        self.nchw = spec.input_layout is Layout.NCHW
        self.letterbox = spec.resize is ResizeMode.LETTERBOX
        self.pad = (np.float32(spec.pad_value) * self.a + self.b).astype(np.float32)  # per model channel
        u = np.arange(256, dtype=np.float32)
        self.luts = [np.ascontiguousarray(u * self.a[c] + self.b[c], dtype=np.float32) for c in range(3)]
        # NHWC: one table per interleaved channel; RGB models get the frame converted to RGB first.
        self.lut3 = np.ascontiguousarray(np.stack(self.luts, axis=-1).reshape(1, 256, 3))

    def tensor_shape(self, n: int) -> tuple[int, int, int, int]:
        H, W = self.input_hw
        return (n, 3, H, W) if self.nchw else (n, H, W, 3)

    def empty(self, n: int) -> np.ndarray:
        return np.empty(self.tensor_shape(n), dtype=np.float32)

    def geometry(self, frame_hw: tuple[int, int]) -> Geometry:
        if self.letterbox:
            return letterbox_geometry(frame_hw, self.input_hw)
        return stretch_geometry(frame_hw, self.input_hw)

    def fill(self, frame: np.ndarray, out: np.ndarray) -> Geometry:
        """Write one BGR uint8 frame (already checked with `as_bgr`) into `out`, one sample of the input tensor
        ((3, H, W) for NCHW, (H, W, 3) for NHWC, float32). Returns where the content landed."""
        g = self.geometry(frame.shape[:2])
        nh, nw = g.content_hw
        if (nh, nw) == tuple(frame.shape[:2]):
            resized = frame
        else:
            resized = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
        top, left = g.top, g.left
        if self.nchw:
            planes = cv2.split(resized)
            for c in range(3):
                dst = out[c]
                if g.padded:
                    self._fill_border(dst, g, self.pad[c])
                    dst = dst[top:top + nh, left:left + nw]
                _lut_into(planes[self.src[c]], self.luts[c], dst)
        else:
            if g.padded:
                for c in range(3):
                    self._fill_border(out[..., c], g, self.pad[c])
            src = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB) if self.src[0] == 2 else resized
            _lut_into(src, self.lut3, out[top:top + nh, left:left + nw] if g.padded else out)
        return g

    @staticmethod
    def _fill_border(plane: np.ndarray, g: Geometry, value: np.float32) -> None:
        (nh, nw), top, left = g.content_hw, g.top, g.left
        plane[:top] = value
        plane[top + nh:] = value
        plane[top:top + nh, :left] = value
        plane[top:top + nh, left + nw:] = value

    def __call__(self, frames: list[np.ndarray], out: np.ndarray | None = None) -> tuple[np.ndarray, list[Geometry]]:
        """Normalise a list of BGR uint8 frames into a (N, ...) float32 tensor (`out` if given)."""
        if out is None:
            out = self.empty(len(frames))
        return out, [self.fill(f, out[i]) for i, f in enumerate(frames)]


def _lut_into(src: np.ndarray, lut: np.ndarray, dst: np.ndarray) -> None:
    """cv2.LUT into `dst` (a view of the input tensor). OpenCV writes into strided row views in place; should a
    build ever hand back a new array instead, copy it in."""
    res = cv2.LUT(src, lut, dst=dst)
    if res is not dst and not np.shares_memory(res, dst):
        dst[...] = res


# ---- post-processing -----------------------------------------------------------------------------------------


def argmax_classes(logits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel argmax of (C, H, W) float scores -> (H, W) uint8 (int32 above 255 classes).

    For up to 255 classes this runs as C-1 OpenCV passes (compare, min, max) over bands of 128 rows, about 10x
    faster than numpy's argmax over axis 0 at 512x512; ties go to the lowest class index, as numpy and PyTorch
    do. Class c only ever replaces a lower index, so `index = max(index, c where score_c > best)` is the
    running argmax.
    """
    C = logits.shape[0]
    if C > 255 or logits.dtype not in (np.float32, np.float16) or logits.ndim != 3:
        return logits.argmax(axis=0).astype(np.uint8 if C <= 256 else np.int32)
    scores = logits if logits.dtype == np.float32 else logits.astype(np.float32)
    H = scores.shape[1]
    index = np.zeros(scores.shape[1:], np.uint8) if out is None else out
    if out is not None:
        index.fill(0)
    # Bands of rows keep the running maximum and the masks in cache while the C planes stream past.
    mask = np.empty((min(H, _ARGMAX_ROWS), scores.shape[2]), np.uint8)
    for y in range(0, H, _ARGMAX_ROWS):
        best = scores[0, y:y + _ARGMAX_ROWS].copy()
        idx, m = index[y:y + _ARGMAX_ROWS], mask[:best.shape[0]]
        for c in range(1, C):
            plane = scores[c, y:y + _ARGMAX_ROWS]
            cv2.compare(plane, best, cv2.CMP_GT, dst=m)  # 255 where class c beats the best so far
            cv2.min(m, c, dst=m)  # -> c or 0
            cv2.max(idx, m, dst=idx)
            cv2.max(best, plane, dst=best)
    return index


_ARGMAX_ROWS = 128


def softmax_confidence(logits: np.ndarray) -> np.ndarray:
    """The softmax probability of the winning class, per pixel: 1 / sum_c exp(l_c - max_c l), float32 (H, W)."""
    scores = logits if logits.dtype == np.float32 else logits.astype(np.float32)
    top = scores[0].copy()
    for c in range(1, scores.shape[0]):
        cv2.max(top, scores[c], dst=top)
    total = np.zeros(top.shape, np.float32)
    tmp = np.empty(top.shape, np.float32)
    for c in range(scores.shape[0]):
        cv2.subtract(scores[c], top, dst=tmp)
        cv2.exp(tmp, dst=tmp)
        cv2.add(total, tmp, dst=total)
    return np.reciprocal(total, out=total)


def content_region(g: Geometry, map_hw: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of a model-resolution map (of size `map_hw`, which may differ from the input size
    when the model outputs a smaller map) that hold the frame's content."""
    sy, sx = map_hw[0] / g.input_hw[0], map_hw[1] / g.input_hw[1]
    top, left = round(g.top * sy), round(g.left * sx)
    h = max(1, min(map_hw[0] - top, round(g.content_hw[0] * sy)))
    w = max(1, min(map_hw[1] - left, round(g.content_hw[1] * sx)))
    return slice(top, top + h), slice(left, left + w)


def map_to_frame(model_map: np.ndarray, g: Geometry, *, nearest: bool = True) -> np.ndarray:
    """Crop the content out of a model-resolution map (class map or confidence) and resize it to the frame.

    Class maps use INTER_NEAREST_EXACT: it samples the model pixel whose centre is nearest to each frame pixel's
    centre, the inverse of the centre-aligned bilinear resize of the input (plain INTER_NEAREST is shifted by
    half a model pixel towards the top-left).
    """
    rows, cols = content_region(g, model_map.shape[:2])
    content = model_map[rows, cols]
    h, w = g.frame_hw
    if content.shape[:2] == (h, w):
        return np.ascontiguousarray(content)
    interp = cv2.INTER_NEAREST_EXACT if nearest else cv2.INTER_LINEAR
    if content.dtype not in (np.uint8, np.float32, np.uint16, np.int16):
        content = content.astype(np.int32 if nearest else np.float32)
        if nearest:  # OpenCV does not resize int32 with nearest-exact; index arithmetic does it exactly
            ys = np.minimum(((np.arange(h) + 0.5) * content.shape[0] / h).astype(np.int64), content.shape[0] - 1)
            xs = np.minimum(((np.arange(w) + 0.5) * content.shape[1] / w).astype(np.int64), content.shape[1] - 1)
            return content[ys[:, None], xs[None, :]]
    return cv2.resize(np.ascontiguousarray(content), (w, h), interpolation=interp)
