"""Triton Inference Server model repositories from a verified artifact: `edgepix export ... --format triton`.

    REPO/NAME/config.pbtxt     platform, max_batch_size, inputs/outputs, dynamic batching, instances, the spec
    REPO/NAME/labels.txt       one class name per line (label_filename of the output)
    REPO/NAME/1/model.onnx     (onnxruntime_onnx) the gated ONNX, spec in its metadata
    REPO/NAME/1/model_smXY.plan (tensorrt_plan) one TensorRT engine per compute capability (cc_model_filenames)
    REPO/NAME/1/model.py       (backend python) the edgepix runtime inside the server (export/triton_model.py),
                               beside model.onnx: frames in and class maps or images out, or the ONNX's tensors

Which backend serves the model: `--triton-backend onnxruntime` (the default: the onnxruntime_onnx platform, CPU or
GPU, with the TensorRT accelerator on GPUs), TensorRT engines as tensorrt_plan, or `--triton-backend python`: the
edgepix runtime on ONNX Runtime's CPU provider, run by the server's Python, the only one that can take raw frames
(`--triton-io frames`); `--triton-io tensors` (the default) serves the ONNX's own inputs and outputs.

From a checkpoint the ONNX goes through the parity gate (export.pipeline.run_export) with a dynamic batch when
`max_batch > 0`; an existing .onnx is copied after its spec is checked against its graph. Triton's `dims` leave
out the batch dimension when `max_batch_size > 0`, so that dimension must be dynamic in the model: a static-batch
ONNX or engine with `--max-batch N > 0` is refused (re-export with --dynamic-batch, or pass --max-batch 0).

Segmentation graphs end in ArgMax + Cast(uint8) by default (`--no-argmax` keeps the logits): a 19x512x1024 float32
logits tensor is 40 MB per frame on the wire, its class map 0.5 MB. The spec JSON is a model parameter
(`edgepix.spec`), which the `triton` runtime backend reads from the server's model configuration.

The model folder is assembled beside its final place and renamed into it, so a Triton server polling the
repository never loads a half-written model.
"""

from __future__ import annotations

import argparse
import enum
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgepix.runtime.core.errors import ExportError
from edgepix.runtime.core.fileio import fsync_folder, fsync_tree
from edgepix.runtime.core.formats import ENGINE_SUFFIXES
from edgepix.runtime.description.spec import ONNX_METADATA_KEY, SCORE_KINDS, ModelSpec, OutputKind, Precision, Task

log = logging.getLogger(__name__)

#: the model parameter that carries the ModelSpec JSON (the same key as in the ONNX metadata)
SPEC_PARAMETER = ONNX_METADATA_KEY
#: Python-backend models: what a request carries (ServedIO) and ONNX Runtime's threads per instance
IO_PARAMETER = "edgepix.io"
THREADS_PARAMETER = "edgepix.threads"
#: the frames API's tensors
FRAMES_INPUT, FRAMES_OUTPUT_CLASS_MAP, FRAMES_OUTPUT_IMAGE = "frames", "class_map", "image"
#: the Python backend's model, copied as REPO/NAME/1/model.py
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")
LABELS_FILE = "labels.txt"

# numpy dtype names -> Triton's model-configuration data types (model_config.proto DataType)
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
}


class InstanceKind(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


class ServingBackend(str, enum.Enum):
    """The Triton backend that runs an ONNX model."""

    ONNXRUNTIME = "onnxruntime"  # platform onnxruntime_onnx
    PYTHON = "python"  # backend python: export/triton_model.py runs the edgepix runtime


class ServedIO(str, enum.Enum):
    """What a request carries."""

    TENSORS = "tensors"  # the ONNX's inputs and outputs
    FRAMES = "frames"  # BGR uint8 frames in; class maps or images out (the Python backend only)


class TrtAccelerator(str, enum.Enum):
    """ONNX Runtime's TensorRT execution provider inside Triton's onnxruntime backend, at this precision."""

    FP16 = "fp16"
    INT8 = "int8"


@dataclass(frozen=True, kw_only=True)
class TritonOptions:
    name: str | None = None  # the model's name in the repository; None: from the spec (fastscnn, fastscnn_int8)
    max_batch: int = 8  # max_batch_size; 0: no batching by Triton, dims are the full shapes
    instances: int = 1  # instance_group count
    kind: InstanceKind | None = None  # None: GPU, or CPU for the Python backend (the runtime runs on the CPU there)
    backend: ServingBackend = ServingBackend.ONNXRUNTIME
    io: ServedIO = ServedIO.TENSORS
    trt_accelerator: TrtAccelerator | None = None
    argmax: bool = True  # segmentation: serve the uint8 class map rather than the logits
    queue_delay_us: int = 100  # dynamic batching: how long a request may wait for others to fill a batch
    cpu_threads: int | None = None  # CPU instances: intra-op threads each; None: see cpu_thread_count

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "backend", ServingBackend(self.backend))
            object.__setattr__(self, "io", ServedIO(self.io))
            default_kind = InstanceKind.CPU if self.backend is ServingBackend.PYTHON else InstanceKind.GPU
            object.__setattr__(self, "kind", InstanceKind(self.kind if self.kind is not None else default_kind))
            if self.trt_accelerator is not None:
                object.__setattr__(self, "trt_accelerator", TrtAccelerator(self.trt_accelerator))
        except ValueError as e:
            raise ExportError(f"Triton options: {e}") from None
        if self.max_batch < 0:
            raise ExportError(f"--max-batch: expected 0 (no batching) or a positive batch size, got {self.max_batch}")
        if self.instances < 1:
            raise ExportError(f"--instances: expected a positive count, got {self.instances}")
        if self.queue_delay_us < 0:
            raise ExportError(f"queue delay: expected >= 0 microseconds, got {self.queue_delay_us}")
        if self.cpu_threads is not None and self.cpu_threads < 0:
            raise ExportError(f"--cpu-threads: expected >= 0 (0: ONNX Runtime's choice), got {self.cpu_threads}")
        if self.trt_accelerator is not None and self.kind is InstanceKind.CPU:
            raise ExportError("--trt-accelerator needs GPU instances; drop it or use --kind gpu")
        if self.backend is ServingBackend.PYTHON and self.kind is InstanceKind.GPU:
            raise ExportError("--triton-backend python runs the edgepix runtime on ONNX Runtime's CPU provider: use "
                              "--kind cpu (on GPU servers serve the model with --triton-backend onnxruntime, or an "
                              "engine)")
        if self.backend is ServingBackend.PYTHON and self.trt_accelerator is not None:
            raise ExportError("--trt-accelerator applies to --triton-backend onnxruntime on GPU instances")
        if self.io is ServedIO.FRAMES and self.backend is not ServingBackend.PYTHON:
            raise ExportError("--triton-io frames needs --triton-backend python: the pre- and post-processing that "
                              "turn frames into tensors run in the edgepix runtime inside the server")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ExportError(f"--name {self.name!r}: use letters, digits, '_', '-' and '.' (it is a folder name "
                              "and a URL path segment)")

    def cpu_thread_count(self) -> int:
        """One instance: 0, ONNX Runtime's default (every physical core); several: 1 each, so K instances running
        at once do not fight over the cores (raise it with --cpu-threads on a big server)."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        return 0 if self.instances == 1 else 1


@dataclass(frozen=True)
class TensorConfig:
    """One input or output as config.pbtxt describes it: dims without the batch dimension when batching."""

    name: str
    data_type: str  # TYPE_FP32, ...
    dims: tuple[int, ...]  # -1 for a dynamic dimension


@dataclass
class TritonResult:
    model_dir: Path
    platform: str
    spec: ModelSpec
    config: str  # the config.pbtxt text
    report: object | None = None  # the parity gate's report, when the ONNX was exported from a checkpoint


# ---- command line ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Triton model repository (--format triton; --out is the repository folder)")
    g.add_argument("--name", help="model name in the repository (default: the model's name, plus the precision)")
    g.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="max_batch_size; the ONNX is exported with a dynamic batch (default 8; 0: no batching)")
    g.add_argument("--instances", type=int, default=1, metavar="K", help="model instances (instance_group count)")
    g.add_argument("--kind", choices=[k.value for k in InstanceKind],
                   help="instance kind (default gpu; cpu for --triton-backend python)")
    g.add_argument("--triton-backend", choices=[b.value for b in ServingBackend], default="onnxruntime",
                   help="what runs an ONNX model in the server: Triton's onnxruntime backend (default; CPU or GPU) or "
                        "its python backend running the edgepix runtime (CPU; the one that takes frames)")
    g.add_argument("--triton-io", choices=[i.value for i in ServedIO], default="tensors",
                   help="what a request carries: the ONNX's tensors (default; what --backend triton sends), or, "
                        "with --triton-backend python, BGR uint8 frames in and class maps or images out")
    g.add_argument("--trt-accelerator", choices=[a.value for a in TrtAccelerator],
                   help="GPU instances: run the ONNX through ONNX Runtime's TensorRT provider at this precision "
                        "(int8 exports a symmetric Q/DQ ONNX)")
    g.add_argument("--cpu-threads", type=int, metavar="N",
                   help="CPU instances: intra-op threads each (default: 0 = all cores for one instance, 1 each for "
                        "several)")
    g.add_argument("--plan", type=Path, nargs="+", metavar="ENGINE",
                   help="serve TensorRT engines (with their manifests) as a tensorrt_plan model, one per GPU "
                        "compute capability")


def options_from_args(args: argparse.Namespace) -> TritonOptions:
    return TritonOptions(
        name=args.name, max_batch=args.max_batch, instances=args.instances,
        kind=InstanceKind(args.kind) if args.kind else None, backend=ServingBackend(args.triton_backend),
        io=ServedIO(args.triton_io),
        trt_accelerator=TrtAccelerator(args.trt_accelerator) if args.trt_accelerator else None,
        argmax=args.argmax is not False,  # the class map unless --no-argmax
        cpu_threads=args.cpu_threads)


def cmd_export_triton(args: argparse.Namespace, make_request) -> int:
    """`edgepix export CKPT|MODEL.onnx|ENGINE --format triton --out REPO`; `make_request(args)` builds the
    ExportRequest used for a checkpoint."""
    options = options_from_args(args)
    if args.out is None:
        raise ExportError("--format triton needs --out REPO, the model repository folder (created if missing)")
    source = Path(args.checkpoint)
    engines = [source] if source.suffix.lower() in ENGINE_SUFFIXES else []
    if args.plan:
        if not engines:
            raise ExportError(f"--plan serves TensorRT engines: give an engine as the model too, not {source.name}")
        engines += [Path(e) for e in args.plan if Path(e) != source]
    if args.precision is not None and (engines or source.suffix.lower() == ".onnx"):
        raise ExportError(f"--precision applies to checkpoints; {source.name} is served as it is (export the "
                          "precision you want first)")
    if engines:
        result = write_plan_repository(engines, args.out, options)
    elif source.suffix.lower() == ".onnx":
        result = write_onnx_repository(source, args.out, options)
    else:
        request = make_request(argparse.Namespace(**{**vars(args), "format": "onnx"}))  # the format is chosen below
        result = write_checkpoint_repository(request, args.out, options, precision=Precision(args.precision or "fp32"))
    if result.report is not None and not args.quiet:
        print(result.report.format())
    io = f", {options.io.value} in and out" if result.platform == "python" else ""
    print(f"wrote {result.model_dir} ({result.platform}{io}, {result.spec.precision.value}, "
          f"{result.spec.output_kind.value}, max_batch_size {options.max_batch}, {options.instances} "
          f"{options.kind.value} instance(s))")
    return 0


# ---- the three sources -----------------------------------------------------------------------------------------


def write_checkpoint_repository(request, repo: str | os.PathLike, options: TritonOptions, *,
                                precision: Precision = Precision.FP32) -> TritonResult:
    """Export the checkpoint's ONNX (through the parity gate) straight into a new model folder."""
    from dataclasses import replace

    from .pipeline import ExportFormat, run_export
    from .precision import Int8Target

    fmt = {Precision.FP32: ExportFormat.ONNX, Precision.FP16: ExportFormat.ONNX_FP16,
           Precision.INT8: ExportFormat.ONNX_INT8}[precision]
    int8 = request.int8
    if options.trt_accelerator is TrtAccelerator.INT8:
        # TensorRT's explicit quantization takes symmetric (S8S8) Q/DQ only.
        fmt, int8 = ExportFormat.ONNX_INT8, replace(int8, target=Int8Target.TENSORRT)
    argmax = _serves_class_map(options) and _is_segmentation_checkpoint(request)
    onnx_options = replace(request.onnx, dynamic_batch=request.onnx.dynamic_batch or options.max_batch > 0,
                           argmax=argmax)

    def build(stage: Path) -> tuple[ModelSpec, object]:
        result = run_export(replace(request, format=fmt, int8=int8, onnx=onnx_options, out=stage / "1" / "model.onnx"))
        return result.spec, result.report

    return _write_onnx_model(Path(repo), options, build)


def write_onnx_repository(onnx_path: Path, repo: str | os.PathLike, options: TritonOptions) -> TritonResult:
    """Copy an exported ONNX (its spec checked against its graph), ending it in an argmax when asked."""
    from edgepix.runtime.description.onnxproto import read_onnx_header

    header = read_onnx_header(onnx_path)
    spec = ModelSpec.from_onnx_metadata(header.metadata, source=str(onnx_path))
    if spec is None:
        raise ExportError(f"{onnx_path} has no edgepix spec; write one with `edgepix spec {onnx_path}` (or export it "
                          "with edgepix export) so the server can describe the model")
    _check_spec_against_graph(spec, header, onnx_path)
    if options.max_batch > 0 and not _dynamic(header.inputs[0].shape[0]):
        raise ExportError(f"{onnx_path.name} has a static batch of {header.inputs[0].shape[0]}, but --max-batch "
                          f"{options.max_batch} needs a dynamic batch dimension: re-export it with --dynamic-batch "
                          "(or export from the checkpoint), or pass --max-batch 0")

    def build(stage: Path) -> tuple[ModelSpec, object]:
        target = stage / "1" / "model.onnx"
        target.parent.mkdir(parents=True)
        if _serves_class_map(options) and spec.task is Task.SEGMENTATION and spec.output_kind in SCORE_KINDS:
            return append_argmax_onnx(onnx_path, target, spec), None
        shutil.copyfile(onnx_path, target)
        return spec, None

    return _write_onnx_model(Path(repo), options, build)


def write_plan_repository(engines: Sequence[Path], repo: str | os.PathLike, options: TritonOptions) -> TritonResult:
    """A tensorrt_plan model: each engine named after its compute capability, listed in cc_model_filenames."""
    from edgepix.runtime.backends.tensorrt.manifest import read_manifest

    if options.trt_accelerator is not None:
        raise ExportError("--trt-accelerator applies to ONNX models; an engine is already TensorRT")
    if options.backend is not ServingBackend.ONNXRUNTIME:
        raise ExportError(f"TensorRT engines are served by Triton's tensorrt backend; --triton-backend "
                          f"{options.backend.value} serves an ONNX model (give the .onnx or the checkpoint)")
    if options.kind is InstanceKind.CPU:
        raise ExportError("TensorRT engines run on GPU instances; use --kind gpu")
    manifests = []
    for engine in engines:
        if not engine.is_file():
            raise ExportError(f"engine not found: {engine}")
        manifests.append(read_manifest(engine))
    first = manifests[0]
    by_cc: dict[str, Path] = {}
    for engine, m in zip(engines, manifests):
        if m.spec.replace(precision=first.spec.precision) != first.spec or _io_key(m) != _io_key(first):
            raise ExportError(f"{engine.name} was not built from the same model as {engines[0].name} (spec or "
                              "inputs/outputs differ); one tensorrt_plan model serves one network")
        if m.compute_capability in by_cc:
            raise ExportError(f"{engine.name} and {by_cc[m.compute_capability].name} are both for compute capability "
                              f"{m.compute_capability}; give one engine per GPU kind")
        by_cc[m.compute_capability] = engine
    inputs = [t for t in first.io if t.mode == "input"]
    outputs = [t for t in first.io if t.mode == "output"]
    if not inputs or not outputs:
        raise ExportError(f"{engines[0].name}.json lists no inputs/outputs; rebuild the engine with edgepix export "
                          "--format engine")
    if options.max_batch > 0:
        if inputs[0].shape[0] != -1:
            raise ExportError(f"{engines[0].name} has a static batch of {inputs[0].shape[0]}, but --max-batch "
                              f"{options.max_batch} needs a dynamic batch: rebuild it from a --dynamic-batch ONNX "
                              f"with --batch 1 {options.max_batch} {options.max_batch}, or pass --max-batch 0")
        for m, engine in zip(manifests, engines):
            largest = min((p.max[0] for profile in m.profiles for p in profile if p.input == inputs[0].name),
                          default=0)
            if largest and largest < options.max_batch:
                raise ExportError(f"{engine.name} takes batches up to {largest}, --max-batch is {options.max_batch}: "
                                  f"pass --max-batch {largest} or rebuild it with a larger --batch")
    files = {cc: f"model_sm{cc.replace('.', '')}.plan" for cc in by_cc}
    tensors_in = [_tensor_config(t.name, t.dtype, t.shape, options.max_batch) for t in inputs]
    tensors_out = [_tensor_config(t.name, t.dtype, t.shape, options.max_batch) for t in outputs]
    spec = first.spec
    name = options.name or _default_name(spec)

    def write(stage: Path) -> None:
        (stage / "1").mkdir(parents=True)
        for cc, engine in by_cc.items():
            shutil.copyfile(engine, stage / "1" / files[cc])

    config = model_config_text(name=name, platform="tensorrt_plan", spec=spec, inputs=tensors_in,
                               outputs=tensors_out, options=options, cc_model_filenames=files)
    model_dir = _publish(Path(repo), name, spec, config, write)
    return TritonResult(model_dir, "tensorrt_plan", spec, config)


def _io_key(m) -> tuple:
    return tuple((t.name, t.mode, t.dtype, tuple(t.shape)) for t in m.io)


def _serves_class_map(options: TritonOptions) -> bool:
    """Whether a segmentation ONNX gets ArgMax + Cast(uint8) appended: when tensors are served and --argmax holds.
    A frames model keeps the ONNX as it is: the runtime inside the server decides as the spec says (scores resized
    first, or classes), exactly as a local Segmenter on the same file."""
    return options.argmax and options.io is ServedIO.TENSORS


def _is_segmentation_checkpoint(request) -> bool:
    from edgepix.train.checkpoint import load_source

    ckpt, _ = load_source(request.checkpoint, use_ema=request.use_ema)
    return ckpt["spec"].task is Task.SEGMENTATION


# ---- ONNX models -----------------------------------------------------------------------------------------------


def _write_onnx_model(repo: Path, options: TritonOptions, build) -> TritonResult:
    from edgepix.runtime.description.onnxproto import read_onnx_header

    holder: dict = {}

    def write(stage: Path) -> None:
        spec, report = build(stage)
        header = read_onnx_header(stage / "1" / "model.onnx")
        holder.update(spec=spec, report=report, header=header)

    repo.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgepix-triton-", dir=repo) as tmp:
        stage = Path(tmp) / "model"
        stage.mkdir()
        write(stage)
        spec, header = holder["spec"], holder["header"]
        if options.max_batch > 0 and not _dynamic(header.inputs[0].shape[0]):
            raise ExportError(f"the ONNX has a static batch, but --max-batch {options.max_batch} needs a dynamic one; "
                              "re-export with --dynamic-batch or pass --max-batch 0")
        name = options.name or _default_name(spec)
        if options.io is ServedIO.FRAMES:
            inputs, outputs = frames_io(spec, options.max_batch)
        else:
            inputs = [_tensor_config(v.name, v.dtype or "float32", v.shape, options.max_batch) for v in header.inputs]
            outputs = [_tensor_config(v.name, v.dtype or "float32", v.shape, options.max_batch)
                       for v in header.outputs]
        if options.backend is ServingBackend.PYTHON:
            shutil.copyfile(PYTHON_MODEL, stage / "1" / "model.py")
            platform, config = "python", model_config_text(name=name, backend="python", spec=spec, inputs=inputs,
                                                           outputs=outputs, options=options)
        else:
            platform, config = "onnxruntime_onnx", model_config_text(name=name, platform="onnxruntime_onnx",
                                                                     spec=spec, inputs=inputs, outputs=outputs,
                                                                     options=options)
        model_dir = _publish(repo, name, spec, config, None, stage=stage)
    return TritonResult(model_dir, platform, spec, config, holder["report"])


def frames_io(spec: ModelSpec, max_batch: int) -> tuple[list[TensorConfig], list[TensorConfig]]:
    """The frames API: BGR uint8 frames of any size in; class maps (segmenters) or BGR images (image -> image
    generators) at the frame's size out."""
    batch = [] if max_batch > 0 else [-1]
    if spec.task is Task.SEGMENTATION:
        class_type = "TYPE_UINT8" if spec.num_classes <= 256 else "TYPE_INT32"  # as the Segmenter's class maps
        output = TensorConfig(FRAMES_OUTPUT_CLASS_MAP, class_type, (*batch, -1, -1))
    elif spec.task is Task.GENERATION_IMAGE:
        output = TensorConfig(FRAMES_OUTPUT_IMAGE, "TYPE_UINT8", (*batch, -1, -1, 3))
    else:
        raise ExportError(f"--triton-io frames: {spec.model_name} is a {spec.task.value} model, which takes no frames; "
                          "serve it with --triton-io tensors")
    return [TensorConfig(FRAMES_INPUT, "TYPE_UINT8", (*batch, -1, -1, 3))], [output]


def append_argmax_onnx(src: Path, dst: Path, spec: ModelSpec) -> ModelSpec:
    """Copy `src` to `dst` with its scores output replaced by its uint8 class map (ArgMax over the class axis, or
    the threshold of a binary output, as the spec describes the output), spec updated to match."""
    from edgepix.runtime.description.onnxedit import append_argmax_file, fusion_for

    from .to_onnx import require_onnx, set_spec_metadata

    onnx = require_onnx()
    if spec.num_classes > 256:
        raise ExportError(f"a uint8 class map holds 256 classes; the model has {spec.num_classes}: pass --no-argmax")
    model_bytes, class_map = append_argmax_file(src, fusion_for(spec))
    proto = onnx.load_from_string(model_bytes)
    new_spec = spec.replace(output_name=class_map, output_kind=OutputKind.CLASS_MAP)
    set_spec_metadata(proto, new_spec)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst))
    return new_spec


def _check_spec_against_graph(spec: ModelSpec, header, path: Path) -> None:
    inputs = [v.name for v in header.inputs]
    outputs = [v.name for v in header.outputs]
    if spec.input_name not in inputs:
        raise ExportError(f"{path.name}: its spec names input {spec.input_name!r}, the graph has {inputs}; "
                          "re-export it")
    if spec.output_name not in outputs:
        raise ExportError(f"{path.name}: its spec names output {spec.output_name!r}, the graph has {outputs}; "
                          "re-export it")


# ---- config.pbtxt ----------------------------------------------------------------------------------------------


def _dynamic(dim) -> bool:
    return not (isinstance(dim, int) and dim >= 0)


def _tensor_config(name: str, dtype: str, shape: Sequence, max_batch: int) -> TensorConfig:
    if dtype not in TRITON_TYPES:
        raise ExportError(f"tensor {name!r} has type {dtype}, which Triton's configuration has no type for")
    dims = [int(d) if isinstance(d, int) and d >= 0 else -1 for d in shape]
    if max_batch > 0:
        dims = dims[1:]  # Triton adds the batch dimension itself
    return TensorConfig(name, TRITON_TYPES[dtype], tuple(dims))


def _default_name(spec: ModelSpec) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.model_name) or "model"
    return name if spec.precision is Precision.FP32 else f"{name}_{spec.precision.value}"


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Half the largest batch and the largest: a full batch when the load allows, half of one sooner."""
    return sorted({max(1, max_batch // 2), max_batch})


def _quote(text: str) -> str:
    # protobuf text format string: JSON's escaping is a subset it reads (\" \\ \n \uXXXX are not all: escape
    # non-ASCII as octal UTF-8 bytes instead of \u, which text_format does not accept)
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _tensor_block(t: TensorConfig, *, labels: bool = False) -> str:
    lines = ["  {", f"    name: {_quote(t.name)}", f"    data_type: {t.data_type}",
             f"    dims: [ {', '.join(str(d) for d in t.dims)} ]"]
    if labels:
        lines.append(f"    label_filename: {_quote(LABELS_FILE)}")
    lines.append("  }")
    return "\n".join(lines)


def model_config_text(*, name: str, spec: ModelSpec, inputs: Sequence[TensorConfig],
                      outputs: Sequence[TensorConfig], options: TritonOptions, platform: str | None = None,
                      backend: str | None = None, cc_model_filenames: dict[str, str] | None = None) -> str:
    """config.pbtxt (Triton's ModelConfig in protobuf text format). `platform` (onnxruntime_onnx, tensorrt_plan) or
    `backend` (python) says what runs the model."""
    if (platform is None) == (backend is None):
        raise ExportError("model_config_text: expected a platform or a backend, got both or neither")
    labelled = spec.task is Task.SEGMENTATION and bool(spec.class_names)
    runner = f"platform: {_quote(platform)}" if platform is not None else f"backend: {_quote(backend)}"
    parts = [f"name: {_quote(name)}", runner, f"max_batch_size: {options.max_batch}"]
    if cc_model_filenames:
        first = next(iter(cc_model_filenames.values()))
        parts.append(f"default_model_filename: {_quote(first)}")
        for cc, filename in cc_model_filenames.items():
            parts.append(f"cc_model_filenames {{ key: {_quote(cc)} value: {_quote(filename)} }}")
    parts.append("input [\n" + ",\n".join(_tensor_block(t) for t in inputs) + "\n]")
    labelled_output = FRAMES_OUTPUT_CLASS_MAP if options.io is ServedIO.FRAMES else spec.output_name
    parts.append("output [\n" + ",\n".join(_tensor_block(t, labels=labelled and t.name == labelled_output)
                                            for t in outputs) + "\n]")
    if options.max_batch > 1:
        parts.append("dynamic_batching {\n"
                     f"  preferred_batch_size: [ {', '.join(map(str, preferred_batch_sizes(options.max_batch)))} ]\n"
                     f"  max_queue_delay_microseconds: {options.queue_delay_us}\n}}")
    kind = "KIND_GPU" if options.kind is InstanceKind.GPU else "KIND_CPU"
    parts.append(f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {kind}\n  }}\n]")
    if options.trt_accelerator is not None:
        precision = options.trt_accelerator.value.upper()
        parts.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n'
            f'        parameters {{ key: "precision_mode" value: "{precision}" }}\n'
            '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
            # engines are built on first load; the cache keeps a restart from building them again
            '        parameters { key: "trt_engine_cache_enable" value: "1" }\n'
            f'        parameters {{ key: "trt_engine_cache_path" value: "/tmp/triton-trt-cache/{name}" }}\n'
            "      }\n    ]\n  }\n}")
    if options.kind is InstanceKind.CPU and platform == "onnxruntime_onnx":
        parts.append(_parameter("intra_op_thread_count", str(options.cpu_thread_count())))
        parts.append(_parameter("inter_op_thread_count", "1"))
    if backend == "python":
        parts.append(_parameter(IO_PARAMETER, options.io.value))
        parts.append(_parameter(THREADS_PARAMETER, str(options.cpu_thread_count())))
    parts.append(_parameter(SPEC_PARAMETER, spec.to_json()))
    return "\n".join(parts) + "\n"


def _parameter(key: str, value: str) -> str:
    return f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}"


def labels_text(spec: ModelSpec) -> str:
    return "".join(f"{name}\n" for name in spec.class_names)


def _publish(repo: Path, name: str, spec: ModelSpec, config: str, write, *, stage: Path | None = None) -> Path:
    """Finish the model folder in `stage` (or a new one) and rename it to REPO/NAME, replacing an older one."""
    repo.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgepix-triton-", dir=repo) as tmp:
        if stage is None:
            stage = Path(tmp) / "model"
            stage.mkdir()
            write(stage)
        (stage / "config.pbtxt").write_text(config, encoding="utf-8")
        if spec.task is Task.SEGMENTATION and spec.class_names:
            (stage / LABELS_FILE).write_text(labels_text(spec), encoding="utf-8")
        target = repo / name
        old = Path(tmp) / "old"
        if target.exists():
            os.replace(target, old)  # removed with the temporary folder
        fsync_tree(stage)
        os.replace(stage, target)
        fsync_folder(repo)
    return target
