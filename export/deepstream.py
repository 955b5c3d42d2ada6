"""NVIDIA DeepStream from a verified artifact: `edgepix export ... --format deepstream --out DIR`.

    DIR/NAME.nvinfer.onnx              the model adapted to nvinfer's pre- and post-processing rules
    DIR/config_infer_primary_NAME.txt  nvinfer's configuration (network-type=2: semantic segmentation)
    DIR/labels.txt                     one class name per line
    DIR/deepstream_app_NAME.txt        a deepstream-app configuration: N sources, nvstreammux, nvinfer,
                                       nvsegvisual, tiler, sink

nvinfer computes `net-scale-factor * (pixel - offsets[c])`: one scalar scale and per-channel offsets. The spec's
normalisation is `(pixel * scale - mean[c]) / std[c] = scale * (pixel - mean[c] / scale) / std[c]`, so
net-scale-factor = scale, offsets = mean / scale, and the per-channel 1 / std becomes a Mul at the graph's input.
nvinfer's segmentation parser takes, per pixel, the channel with the largest value among those above
segmentation-threshold (none above: -1), so the adapted graph ends in a Softmax over the channels: with
probabilities and a threshold of 0 the rule is the model's argmax. Frames are scaled to the network size
bilinearly (scaling-filter=1), as the runtime's Normalizer does; nvinfer's default is nearest.

Before anything is written the adapted graph is checked: nvinfer's rules simulated in numpy on synthetic scenes
(`nvinfer_preprocess`, `nvinfer_class_map`) must give the class maps the original ONNX gives through the runtime's
Normalizer on >= 99.9% of pixels.

Config files follow GLib's key-file syntax, which nvinfer and deepstream-app read with GKeyFile: `key=value`,
lists separated by ';', comments only on lines of their own.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgepix.runtime.core.errors import ExportError
from edgepix.runtime.core.fileio import fsync_folder, fsync_tree
from edgepix.runtime.description.spec import ChannelOrder, Layout, ModelSpec, OutputKind, Precision, ResizeMode, Task

from .workspace import workspace

log = logging.getLogger(__name__)

NETWORK_MODE = {Precision.FP32: 0, Precision.INT8: 1, Precision.FP16: 2}  # nvinfer's network-mode values
PROBS_OUTPUT = "probs"
#: the stream DeepStream installs with its samples, used when no --ds-source is given
SAMPLE_STREAM = "file:///opt/nvidia/deepstream/deepstream/samples/streams/sample_1080p_h264.mp4"
ADAPTATION_MIN_AGREEMENT = 0.999


@dataclass(frozen=True, kw_only=True)
class DeepStreamOptions:
    batch: int = 1  # nvstreammux and nvinfer batch size = number of sources
    precision: Precision = Precision.FP16  # nvinfer's network-mode (TensorRT builds the engine on the device)
    sources: tuple[str, ...] = ()  # file:// or rtsp:// URIs; fewer than `batch`: the sample stream fills in
    gpu_id: int = 0
    mux_size: tuple[int, int] = (1080, 1920)  # (H, W) nvstreammux scales every source to this
    name: str | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "precision", Precision(self.precision))
        except ValueError:
            raise ExportError(f"--precision: expected fp32, fp16 or int8, got {self.precision!r}") from None
        if self.batch < 1:
            raise ExportError(f"--batch: expected a positive number of sources, got {self.batch}")
        if len(self.sources) > self.batch:
            raise ExportError(f"{len(self.sources)} --ds-source given for --batch {self.batch}; one source per "
                              "batch slot")
        for uri in self.sources:
            if not uri.startswith(("file://", "rtsp://")):
                raise ExportError(f"--ds-source {uri!r}: expected a file:///absolute/path or rtsp:// URI")


@dataclass
class DeepStreamResult:
    folder: Path
    onnx: Path
    nvinfer_config: Path
    app_config: Path
    spec: ModelSpec
    agreement: float
    report: object | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DeepStream (--format deepstream; --out is a folder; --batch N sources, --precision "
                             "the network-mode)")
    g.add_argument("--ds-source", action="append", default=[], metavar="URI",
                   help="deepstream-app source (file:///path or rtsp://), repeat for each; the rest of the --batch "
                        "slots get DeepStream's sample stream")


def cmd_export_deepstream(args: argparse.Namespace, make_request) -> int:
    if args.out is None:
        raise ExportError("--format deepstream needs --out DIR, the folder for the model and its configs")
    if args.batch is not None and len(args.batch) != 1:
        raise ExportError(f"--format deepstream takes --batch N (the number of sources), got {args.batch}")
    batch = args.batch[0] if args.batch else max(1, len(args.ds_source))
    options = DeepStreamOptions(batch=batch, precision=Precision(args.precision or "fp16"),
                                sources=tuple(args.ds_source), name=getattr(args, "name", None))
    if args.argmax:
        raise ExportError("--format deepstream ends the graph in a Softmax for nvinfer's parser; drop --argmax")
    source = Path(args.checkpoint)
    if source.suffix.lower() == ".onnx":
        result = write_deepstream_from_onnx(source, args.out, options)
    else:
        request = make_request(argparse.Namespace(**{**vars(args), "format": "onnx"}))  # the format is chosen below
        result = write_deepstream_from_checkpoint(request, args.out, options)
    if result.report is not None and not args.quiet:
        print(result.report.format())
    print(f"wrote {result.folder}: {result.onnx.name} (nvinfer rules reproduce the model on "
          f"{result.agreement:.2%} of pixels), {result.nvinfer_config.name}, {result.app_config.name} "
          f"({options.batch} source(s), network-mode {options.precision.value})")
    return 0


def write_deepstream_from_checkpoint(request, out_dir: str | os.PathLike, options: DeepStreamOptions
                                     ) -> DeepStreamResult:
    """Export the logits ONNX through the parity gate (INT8: symmetric Q/DQ for TensorRT), then adapt it."""
    from .pipeline import ExportFormat, run_export
    from .precision import Int8Target

    fmt, int8 = ExportFormat.ONNX, request.int8
    if options.precision is Precision.INT8:
        fmt, int8 = ExportFormat.ONNX_INT8, replace(request.int8, target=Int8Target.TENSORRT)
    onnx_options = replace(request.onnx, argmax=False, dynamic_batch=True)  # nvinfer batches up to batch-size
    with workspace() as tmp:
        exported = run_export(replace(request, format=fmt, int8=int8, onnx=onnx_options,
                                      out=Path(tmp) / "model.onnx"))
        result = write_deepstream_from_onnx(exported.path, out_dir, options)
    result.report = exported.report
    return result


def write_deepstream_from_onnx(onnx_path: Path, out_dir: str | os.PathLike, options: DeepStreamOptions
                               ) -> DeepStreamResult:
    from edgepix.runtime.description.onnxproto import read_onnx_header

    header = read_onnx_header(onnx_path)
    spec = ModelSpec.from_onnx_metadata(header.metadata, source=str(onnx_path))
    if spec is None:
        raise ExportError(f"{onnx_path} has no edgepix spec; write one with `edgepix spec {onnx_path}` first")
    if spec.task is not Task.SEGMENTATION:
        raise ExportError(f"--format deepstream writes semantic segmentation configs; {onnx_path.name} is a "
                          f"{spec.task.value} model")
    if spec.output_kind is OutputKind.CLASS_MAP:
        raise ExportError(f"{onnx_path.name} ends in ArgMax; nvinfer's parser needs per-class scores: export it "
                          "without --argmax")
    if spec.output_kind is not OutputKind.LOGITS or spec.output_layout is not Layout.NCHW:
        raise ExportError(f"{onnx_path.name} outputs {spec.output_kind.value} in {spec.output_layout.value}; the "
                          "config written here feeds nvinfer NCHW logits (one channel per class): export a model "
                          "that outputs them")
    batch_dim = header.inputs[0].shape[0]
    if options.batch > 1 and isinstance(batch_dim, int) and batch_dim >= 0 and batch_dim != options.batch:
        raise ExportError(f"{onnx_path.name} has a static batch of {batch_dim}, --batch is {options.batch}: "
                          "re-export it with --dynamic-batch (or export from the checkpoint)")
    out_dir = Path(out_dir)
    name = options.name or re.sub(r"[^A-Za-z0-9_.-]", "_", spec.model_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgepix-deepstream-", dir=out_dir) as tmp:
        adapted = Path(tmp) / f"{name}.nvinfer.onnx"
        adapted_spec = adapt_onnx_for_nvinfer(onnx_path, adapted, spec)
        agreement = check_adaptation(onnx_path, spec, adapted, options)
        if agreement < ADAPTATION_MIN_AGREEMENT:
            raise ExportError(f"the nvinfer-adapted graph gives the model's class map on only {agreement:.4%} of "
                              f"pixels (needs {ADAPTATION_MIN_AGREEMENT:.1%}); nothing was written")
        infer_name = f"config_infer_primary_{name}.txt"
        app_name = f"deepstream_app_{name}.txt"
        files = {
            infer_name: nvinfer_config(adapted_spec, onnx_file=adapted.name, options=options),
            "labels.txt": "".join(f"{c}\n" for c in spec.class_names),
            app_name: deepstream_app_config(adapted_spec, infer_config=infer_name, options=options),
        }
        for filename, text in files.items():
            (Path(tmp) / filename).write_text(text, encoding="utf-8")
        fsync_tree(tmp)
        for filename in (adapted.name, *files):
            os.replace(Path(tmp) / filename, out_dir / filename)
        fsync_folder(out_dir)
    return DeepStreamResult(out_dir, out_dir / adapted.name, out_dir / infer_name, out_dir / app_name, adapted_spec,
                            agreement)


# ---- the graph -------------------------------------------------------------------------------------------------


def adapt_onnx_for_nvinfer(src: Path, dst: Path, spec: ModelSpec) -> ModelSpec:
    """Copy `src` to `dst` with 1/std multiplied in at the input and a Softmax over the classes at the output.
    Returns the adapted graph's spec (std 1, output `probs`), which the runtime can still run."""
    from onnx import TensorProto, helper, numpy_helper

    from .to_onnx import require_onnx, set_spec_metadata

    onnx = require_onnx()
    proto = onnx.load(str(src))
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or inputs[0].name != spec.input_name:
        raise ExportError(f"{src.name}: expected one input {spec.input_name!r}, found {[i.name for i in inputs]}")
    input_name, scaled = spec.input_name, spec.input_name + "_std"
    channel_shape = (1, 3, 1, 1) if spec.input_layout is Layout.NCHW else (1, 1, 1, 3)
    inv_std = (1.0 / np.asarray(spec.std, np.float32)).reshape(channel_shape)
    if inputs[0].type.tensor_type.elem_type == TensorProto.FLOAT16:
        inv_std = inv_std.astype(np.float16)
    for node in graph.node:
        node.input[:] = [scaled if n == input_name else n for n in node.input]
    graph.initializer.append(numpy_helper.from_array(inv_std, "edgepix_inv_std"))
    graph.node.insert(0, helper.make_node("Mul", [input_name, "edgepix_inv_std"], [scaled], name="edgepix_inv_std_mul"))

    outputs = list(graph.output)
    logits = next((o for o in outputs if o.name == spec.output_name), None)
    if logits is None:
        raise ExportError(f"{src.name}: no output {spec.output_name!r}; found {[o.name for o in outputs]}")
    graph.node.append(helper.make_node("Softmax", [logits.name], [PROBS_OUTPUT], axis=1, name="edgepix_softmax"))
    probs = helper.make_tensor_value_info(PROBS_OUTPUT, logits.type.tensor_type.elem_type, None)
    probs.type.tensor_type.shape.CopyFrom(logits.type.tensor_type.shape)
    for o in outputs:
        graph.output.remove(o)
    graph.output.append(probs)
    adapted_spec = spec.replace(std=(1.0, 1.0, 1.0), output_name=PROBS_OUTPUT)
    set_spec_metadata(proto, adapted_spec)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst))
    return adapted_spec


# ---- nvinfer's rules, simulated ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NvinferPreprocess:
    """What nvinfer does to a frame, from its config: scale to the network size, colour order, then
    net_scale_factor * (pixel - offsets)."""

    net_scale_factor: float
    offsets: tuple[float, float, float]
    rgb: bool  # model-color-format=0
    size: tuple[int, int]  # (H, W) infer-dims
    nchw: bool


def nvinfer_preprocess_for(spec: ModelSpec) -> NvinferPreprocess:
    return NvinferPreprocess(net_scale_factor=spec.scale, offsets=tuple(m / spec.scale for m in spec.mean),
                             rgb=spec.channel_order is ChannelOrder.RGB, size=tuple(spec.input_size),
                             nchw=spec.input_layout is Layout.NCHW)


def nvinfer_preprocess(frames_bgr: Sequence[np.ndarray], pre: NvinferPreprocess) -> np.ndarray:
    """BGR uint8 frames -> the float32 batch nvinfer feeds (stretch scaling, bilinear: scaling-filter=1)."""
    import cv2

    h, w = pre.size
    batch = []
    for frame in frames_bgr:
        resized = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
        if pre.rgb:
            resized = resized[..., ::-1]
        x = pre.net_scale_factor * (resized.astype(np.float32) - np.asarray(pre.offsets, np.float32))
        batch.append(x.transpose(2, 0, 1) if pre.nchw else x)
    return np.ascontiguousarray(np.stack(batch).astype(np.float32))


def nvinfer_class_map(scores: np.ndarray, threshold: float) -> np.ndarray:
    """nvinfer's semantic-segmentation parser on (N, C, H, W) scores: per pixel the channel with the largest value
    among those above `threshold` (the first on ties), -1 where none is above."""
    above = scores > threshold
    masked = np.where(above, scores, -np.inf)
    classes = masked.argmax(axis=1).astype(np.int32)
    classes[~above.any(axis=1)] = -1
    return classes


def check_adaptation(original: Path, spec: ModelSpec, adapted: Path, options: DeepStreamOptions, *,
                     n: int = 8) -> float:
    """Pixel agreement between the original ONNX through the runtime's Normalizer + argmax and the adapted ONNX
    through nvinfer's simulated rules, on synthetic scenes of a camera-like size."""
    import onnxruntime as ort

    from edgepix.runtime.data.synthetic import SceneConfig, make_scene
    from edgepix.runtime.tasks.imageops import Normalizer, argmax_classes

    if spec.resize is ResizeMode.LETTERBOX:
        log.warning("letterbox models: nvinfer pads with black (maintain-aspect-ratio=1, symmetric-padding=1), "
                    "the runtime with %d; only the border differs", spec.pad_value)
    frames = [np.ascontiguousarray(make_scene(7_000_001 + i, SceneConfig(size=(288, 384)))[0]) for i in range(n)]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    reference = ort.InferenceSession(str(original), so, providers=["CPUExecutionProvider"])
    candidate = ort.InferenceSession(str(adapted), so, providers=["CPUExecutionProvider"])
    normalizer = Normalizer(spec, tuple(spec.input_size))
    pre = nvinfer_preprocess_for(spec)
    agree = total = 0
    for frame in frames:  # one at a time: the original may have a static batch of 1
        x = normalizer.empty(1)
        normalizer.fill(frame, x[0])
        expected = argmax_classes(reference.run([spec.output_name], {spec.input_name: x})[0][0])
        probs = candidate.run([PROBS_OUTPUT], {spec.input_name: nvinfer_preprocess([frame], pre)})[0]
        got = nvinfer_class_map(probs, 0.0)[0]
        agree += int((got == expected).sum())
        total += expected.size
    return agree / total


# ---- key files ---------------------------------------------------------------------------------------------------


def _number(value: float) -> str:
    if not math.isfinite(value):
        raise ExportError(f"cannot write {value} into a DeepStream config")
    return f"{value:.12g}"  # 103.53, not 103.53000000000002


def _key_file(groups: list[tuple[str, list[tuple[str, object]] | list[str]]]) -> str:
    """GKeyFile text: [group] then key=value lines; a plain string in a group's list is a comment line."""
    lines: list[str] = []
    for group, entries in groups:
        if lines:
            lines.append("")
        lines.append(f"[{group}]")
        for entry in entries:
            if isinstance(entry, str):
                lines.append(f"# {entry}")
                continue
            key, value = entry
            if isinstance(value, (list, tuple)):
                value = ";".join(_number(v) if isinstance(v, float) else str(v) for v in value)
            elif isinstance(value, float):
                value = _number(value)
            text = str(value)
            if "\n" in text or text != text.strip():
                raise ExportError(f"DeepStream config value for {key} cannot hold newlines or edge spaces: {text!r}")
            lines.append(f"{key}={text}")
    return "\n".join(lines) + "\n"


def engine_file_name(onnx_file: str, options: DeepStreamOptions) -> str:
    """The name nvinfer gives the engine it builds from `onnx_file`, so the second start reuses it."""
    return f"{onnx_file}_b{options.batch}_gpu{options.gpu_id}_{options.precision.value}.engine"


def nvinfer_config(spec: ModelSpec, *, onnx_file: str, options: DeepStreamOptions) -> str:
    pre = nvinfer_preprocess_for(spec)
    h, w = spec.input_size
    letterbox = spec.resize is ResizeMode.LETTERBOX
    entries: list = [
        f"{spec.model_name}: semantic segmentation, {spec.num_classes} classes, input {h}x{w}",
        ("gpu-id", options.gpu_id),
        "nvinfer feeds net-scale-factor * (pixel - offsets); 1/std is inside the ONNX",
        ("net-scale-factor", float(pre.net_scale_factor)),
        ("offsets", [float(o) for o in pre.offsets]),
        "0: RGB, 1: BGR",
        ("model-color-format", 0 if pre.rgb else 1),
        ("onnx-file", onnx_file),
        ("model-engine-file", engine_file_name(onnx_file, options)),
        ("labelfile-path", "labels.txt"),
        ("batch-size", options.batch),
        "0: FP32, 1: INT8, 2: FP16",
        ("network-mode", NETWORK_MODE[options.precision]),
        "2: semantic segmentation",
        ("network-type", 2),
        ("infer-dims", [3, h, w]),
        ("network-input-order", 0 if pre.nchw else 1),
        ("num-detected-classes", spec.num_classes),
        ("output-blob-names", PROBS_OUTPUT),
        "0: NCHW scores",
        ("segmentation-output-order", 0),
        "the graph ends in a Softmax: every pixel's best class is above 0, so the parser's rule is the argmax",
        ("segmentation-threshold", 0.0),
        ("maintain-aspect-ratio", 1 if letterbox else 0),
    ]
    if letterbox:
        entries.append(("symmetric-padding", 1))
    entries += [
        "1: bilinear, as the runtime scales frames (nvinfer's default 0 is nearest)",
        ("scaling-filter", 1),
        ("interval", 0),
        ("gie-unique-id", 1),
        ("process-mode", 1),
    ]
    return _key_file([("property", entries)])


def deepstream_app_config(spec: ModelSpec, *, infer_config: str, options: DeepStreamOptions) -> str:
    sources = list(options.sources) + [SAMPLE_STREAM] * (options.batch - len(options.sources))
    live = any(uri.startswith("rtsp://") for uri in sources)
    rows = max(1, int(math.floor(math.sqrt(options.batch))))
    columns = int(math.ceil(options.batch / rows))
    mux_h, mux_w = options.mux_size
    h, w = spec.input_size
    groups: list = [
        ("application", [("enable-perf-measurement", 1), ("perf-measurement-interval-sec", 5)]),
        ("tiled-display", [("enable", 1), ("rows", rows), ("columns", columns), ("width", 1280), ("height", 720),
                           ("gpu-id", options.gpu_id)]),
    ]
    for i, uri in enumerate(sources):
        groups.append((f"source{i}", [
            "type 3: URI (file or network), 4: RTSP",
            ("enable", 1), ("type", 4 if uri.startswith("rtsp://") else 3), ("uri", uri), ("num-sources", 1),
            ("gpu-id", options.gpu_id)]))
    groups += [
        ("streammux", [
            "every source is scaled to this size and batched; push a partial batch after 40 ms",
            ("gpu-id", options.gpu_id), ("live-source", 1 if live else 0), ("batch-size", options.batch),
            ("batched-push-timeout", 40000), ("width", mux_w), ("height", mux_h), ("enable-padding", 0)]),
        ("primary-gie", [("enable", 1), ("gpu-id", options.gpu_id), ("batch-size", options.batch),
                         ("gie-unique-id", 1), ("config-file", infer_config)]),
        ("segvisual", [("enable", 1), ("gpu-id", options.gpu_id), ("batch-size", options.batch), ("width", w),
                       ("height", h)]),
        ("osd", [("enable", 0)]),
        ("sink0", ["type 1: fakesink (measure), 2: display, 3: file, 4: RTSP out",
                   ("enable", 1), ("type", 1), ("sync", 0), ("gpu-id", options.gpu_id)]),
        ("tests", [("file-loop", 0)]),
    ]
    return _key_file(groups)
