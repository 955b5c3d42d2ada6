"""What a segmentation model's output is, read from its shape: where the channels are (NCHW or NHWC), how many
there are, at which stride of the input, and whether a spec can be right for it.

A spec that cannot be right for the graph is refused here, with one line that says why and what to set, instead of
a run that writes colour stripes: an output whose channel count matches neither layout, class names that do not
match the channels, a spatial size that is not the input's divided by a whole stride (a (1, 256, 256, 1) output
read as NCHW is 256 "classes" on a 256x1 map), a binary kind with more than one channel. Shapes only: the values
are checked by the Segmenter on its first frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..core.errors import ModelFormatError
from .spec import BINARY_KINDS, Layout, ModelSpec, OutputKind, Task
from .tensors import TensorMeta


def channel_axis(layout: Layout) -> int:
    """The channel axis of a rank-4 tensor in `layout`."""
    return 1 if layout is Layout.NCHW else 3


def spatial_axes(layout: Layout) -> tuple[int, int]:
    return (2, 3) if layout is Layout.NCHW else (1, 2)


def expected_channels(spec: ModelSpec) -> int:
    """The channels a spec's scores have: one for the binary kinds, one per class otherwise."""
    return 1 if spec.output_kind in BINARY_KINDS else spec.num_classes


def decision_threshold(spec: ModelSpec) -> float:
    """A binary kind's threshold on its output's own scale: the probability, or its logit log(t / (1 - t))."""
    t = spec.threshold
    return math.log(t / (1.0 - t)) if spec.output_kind is OutputKind.BINARY_LOGIT else t


def whole_stride(input_hw: Sequence[int], output_hw: Sequence[int | None]) -> int | None:
    """The one whole number s with output = input / s along both axes (rounded either way, as strided convolutions
    of odd sizes do), or None when there is none. Unknown (dynamic) output sides agree with any stride."""
    strides = set()
    for n_in, n_out in zip(input_hw, output_hw):
        if n_out is None:
            continue
        if n_out < 1 or n_out > n_in:
            return None
        s = round(n_in / n_out)
        if n_out not in (n_in // s, -(-n_in // s)):
            return None
        strides.add(s)
    if len(strides) > 1:
        return None
    return strides.pop() if strides else 0  # 0: nothing known, any stride


def _hw(out: TensorMeta, layout: Layout) -> tuple[int | None, int | None]:
    a, b = spatial_axes(layout)
    return out.dim(a), out.dim(b)


def layout_fits(out: TensorMeta, layout: Layout, input_hw: Sequence[int], *, fixed_input: bool,
                channels: Sequence[int] | None = None) -> bool:
    """Whether a rank-4 output read in `layout` has a possible channel count (`channels`, when given) and a
    spatial size that is the input's divided by a whole stride (when the input's size is fixed)."""
    c = out.dim(channel_axis(layout))
    if channels is not None and c is not None and c not in channels:
        return False
    return not fixed_input or whole_stride(input_hw, _hw(out, layout)) is not None


def infer_output_layout(out: TensorMeta, *, input_layout: Layout, input_hw: Sequence[int], fixed_input: bool,
                        channels: Sequence[int] | None = None) -> Layout:
    """The layout of a rank-4 float output. Only a layout whose channel dim is fixed is a candidate (class counts
    are not dynamic; spatial sides often are): the one candidate whose reading fits (see `layout_fits`), or the
    only candidate (`check_output` then says what is wrong), else the input's layout (both fit, or nothing is
    known)."""
    known = [layout for layout in (Layout.NCHW, Layout.NHWC) if out.dim(channel_axis(layout)) is not None]
    fits = [layout for layout in known
            if layout_fits(out, layout, input_hw, fixed_input=fixed_input, channels=channels)]
    if len(fits) == 1:
        return fits[0]
    return known[0] if len(known) == 1 else input_layout


def check_output(spec: ModelSpec, out: TensorMeta, *, source: str) -> None:
    """ModelFormatError (one line: what the spec says, what the graph has, what to set) unless a segmentation
    spec can describe this output."""
    if spec.task is not Task.SEGMENTATION:
        return
    kind = spec.output_kind
    if kind is OutputKind.CLASS_MAP:
        _check_class_map(spec, out, source)
        return
    if out.dtype.kind != "f":
        raise ModelFormatError(f"{source}: output_kind {kind.value} needs a float output, the graph's is "
                               f"{out.describe()}; set output_kind=class_map if it holds class indices")
    if len(out.shape) != 4:
        raise ModelFormatError(f"{source}: expected a rank-4 segmentation output (N, C, H, W) or (N, H, W, C), "
                               f"found {out.describe()}")
    layout, want = spec.output_layout, expected_channels(spec)
    c = out.dim(channel_axis(layout))
    fixed_input = not spec.dynamic_size
    hint = _layout_hint(out, layout, spec, want)
    where = f"{out.describe()} read as {layout.value}"
    if c is not None and c != want:
        if kind in BINARY_KINDS:
            raise ModelFormatError(f"{source}: output_kind {kind.value} has one channel, {where} has {c}"
                                   + (hint or f"; set output_kind={'probabilities' if c > 1 else kind.value} "
                                      f"and classes= with {c} names"))
        if c == 1 and not hint:
            hint = ("; a one-channel output is binary: set output_kind=binary_probability (after a sigmoid) or "
                    "binary_logit, with classes=background,NAME")
        raise ModelFormatError(f"{source}: the spec lists {spec.num_classes} classes, the output has {c} "
                               f"channel{'s' if c != 1 else ''} ({where}){hint or f'; set classes= with {c} names'}")
    if not fixed_input:
        return
    h, w = _hw(out, layout)
    stride = whole_stride(spec.input_size, (h, w))
    if stride is None:
        size = f"{h or '?'}x{w or '?'}"
        hint = hint or "; this is not a map of the input: check output_layout and the input size"
        raise ModelFormatError(f"{source}: {where} is a {size} map for a {spec.input_size[0]}x{spec.input_size[1]} "
                               f"input, not the input divided by a whole stride{hint}")
    if stride and stride != spec.output_stride:
        raise ModelFormatError(f"{source}: the spec says output_stride {spec.output_stride}, {where} is at 1/{stride} "
                               f"of the {spec.input_size[0]}x{spec.input_size[1]} input; set output_stride={stride}")


def _layout_hint(out: TensorMeta, layout: Layout, spec: ModelSpec, want: int) -> str:
    """What to set when the output fits the other layout (and not the spec's): '' when it does not."""
    other = Layout.NHWC if layout is Layout.NCHW else Layout.NCHW
    fixed = not spec.dynamic_size
    if out.dim(channel_axis(other)) is None:  # a dynamic dim is no evidence for channels there
        return ""
    if layout_fits(out, other, spec.input_size, fixed_input=fixed, channels=(want,)):
        return f"; read as {other.value} it fits: set output_layout={other.value}"
    if fixed and layout_fits(out, other, spec.input_size, fixed_input=True) and not layout_fits(
            out, layout, spec.input_size, fixed_input=True):
        c = out.dim(channel_axis(other))
        what = ("output_kind=binary_probability (after a sigmoid) or binary_logit with classes=background,NAME"
                if c == 1 else f"classes= with {c} names")
        return (f"; read as {other.value} it is a {c}-channel map of the input: set output_layout={other.value} "
                f"and {what}")
    return ""


def _check_class_map(spec: ModelSpec, out: TensorMeta, source: str) -> None:
    if out.dtype.kind not in "iu":
        raise ModelFormatError(f"{source}: output_kind class_map needs an integer output, the graph's is "
                               f"{out.describe()}; set output_kind=logits, probabilities, binary_probability or "
                               "binary_logit")
    rank = len(out.shape)
    single = out.dim(channel_axis(spec.output_layout)) if rank == 4 else 1
    if rank not in (3, 4) or single not in (1, None):
        raise ModelFormatError(f"{source}: expected a class map (N, H, W), (N, 1, H, W) or (N, H, W, 1), found "
                               f"{out.describe()}" + ("; set output_layout=NHWC" if rank == 4 and out.dim(3) == 1
                                                      else ""))
