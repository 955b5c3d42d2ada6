""".tflite -> verified ONNX: `edgepix export MODEL.tflite --format onnx --out MODEL.onnx`.

    1. MediaPipe's custom transposed convolutions become builtin TRANSPOSE_CONV (export/tflite_ops.py);
    2. tf2onnx converts the model (in a child process: TensorFlow's import and logs stay out of this one);
    3. the spec of the .tflite (its NAME.spec.json, else its metadata and shapes, as the runtime reads it) is embedded
       in the ONNX, with the input and output names of the ONNX graph;
    4. the parity gate: the original .tflite on LiteRT (XNNPACK, custom ops included) against the ONNX on ONNX
       Runtime, on synthetic scenes, the user's images (`--data DIR`) and random inputs, with the one comparator
       (export/compare.py) and its FP32 thresholds.

Nothing appears at --out unless the gate passed: the work happens in a temporary folder and the artifact is moved
into place by the one file writer. Needs the `tflite-convert` extra (tf2onnx, TensorFlow, ai-edge-litert); torch is
not used. tf2onnx keeps the TFLite layout (NHWC in and out), so the ONNX takes the same tensors as the .tflite.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepix.runtime.core.errors import DependencyError, ExportError
from edgepix.runtime.core.fileio import atomic_output, check_writable
from edgepix.runtime.description.spec import ONNX_METADATA_KEY, ModelSpec, Task
from edgepix.runtime.description.tensors import TensorMeta
from edgepix.runtime.description.tflite import sidecar_path

from .compare import BackendRunner, GateReport, compare_images, compare_segmentation
from .gate import VerificationFailed
from .samples import VERIFY_SEED, Sample, folder_samples, preprocess, synthetic_samples
from .tflite_ops import rewrite_custom_ops
from .workspace import workspace

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edgepix[tflite-convert]'"
# The opset of edgepix's PyTorch exports (export/to_onnx.py DEFAULT_OPSET), for the same readers: TensorRT 8.5+ and
# every recent ONNX Runtime. Not imported from there: that module needs torch, this one does not.
TFLITE_OPSET = 17
CONVERT_TIMEOUT_S = 1800  # TensorFlow's import plus a large model's conversion; a hung converter is an error


@dataclass(frozen=True)
class TfliteExportRequest:
    model: Path
    out: Path | None = None  # default: MODEL.onnx beside the model
    opset: int = TFLITE_OPSET
    data: str | None = None  # a folder of images (or a dataset folder) checked besides the synthetic scenes
    verify_n: int = 20  # synthetic scenes, and at most this many images from `data`
    task: Task = Task.SEGMENTATION  # what a model without a spec sidecar is


@dataclass
class TfliteExportResult:
    path: Path
    spec: ModelSpec
    report: GateReport
    rewritten_ops: int  # custom ops replaced by builtin ones before the conversion


def export_tflite(request: TfliteExportRequest) -> TfliteExportResult:
    from edgepix.runtime.description.specfile import read_spec

    src = Path(request.model)
    out = Path(request.out) if request.out else src.with_suffix(".onnx")
    if out.resolve() == src.resolve():
        raise ExportError(f"--out {out} is the model itself; give another file name")
    check_writable(out, "--out", ExportError)
    _require_converter()
    reading = read_spec(src, task=request.task)  # the sidecar, else the metadata and shapes
    spec = reading.spec
    if not reading.embedded:
        log.warning("%s has no spec file (%s); the ONNX gets the spec the runtime would assume (%s, %d classes, %s): "
                    "write one with edgepix spec %s --set ... --out %s", src.name, sidecar_path(src).name,
                    spec.task.value, spec.num_classes, spec.output_kind.value, src.name, sidecar_path(src).name)
    with workspace() as tmp:
        builtin = Path(tmp) / "builtin.tflite"
        rewritten = rewrite_custom_ops(src, builtin)
        if rewritten:
            log.info("%s: %d custom op(s) rewritten as builtin TRANSPOSE_CONV for the conversion", src.name, rewritten)
        raw = Path(tmp) / "converted.onnx"
        convert_tflite_to_onnx(builtin if rewritten else src, raw, opset=request.opset)
        artifact = Path(tmp) / "model.onnx"
        onnx_spec = embed_spec(raw, artifact, spec, source=src)
        report = gate(src, spec, artifact, onnx_spec, data=request.data, n=request.verify_n)
        report.artifact = str(out)  # the gate ran on the temporary file that becomes `out`
        report.title = f"parity gate against {src.name} on LiteRT"
        if not report.passed:
            raise VerificationFailed(report)
        try:
            with atomic_output(out) as part:
                shutil.copyfile(artifact, part)
        except OSError as e:
            raise ExportError(f"cannot write {out}: {e.strerror or e}") from e
    return TfliteExportResult(out, onnx_spec, report, rewritten)


def _require_converter() -> None:
    missing = [m for m in ("tf2onnx", "tensorflow") if not _installed(m)]
    if missing:
        raise DependencyError(f"converting .tflite models to ONNX needs {' and '.join(missing)} (tf2onnx runs on "
                              f"TensorFlow); install them with: {INSTALL_HINT}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (import blocked)
        return False


def convert_tflite_to_onnx(src: Path, dst: Path, *, opset: int) -> None:
    """tf2onnx in a child process of this Python; ExportError with tf2onnx's own words when it fails or leaves ops
    unconverted (ONNX Runtime would refuse the file)."""
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--tflite", str(src), "--output", str(dst), "--opset", str(opset)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}  # TensorFlow's start-up chatter
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise ExportError(f"tf2onnx did not finish converting {src.name} in {CONVERT_TIMEOUT_S} s") from None
    log.debug("tf2onnx output:\n%s", done.stdout + done.stderr)
    text = done.stdout + done.stderr
    unsupported = re.search(r"Unsupported ops: Counter\((\{.*?\})\)", text)
    if unsupported:
        raise ExportError(f"tf2onnx cannot convert these ops of {src.name}: {unsupported.group(1)}; edgepix rewrites "
                          "MediaPipe's Convolution2DTransposeBias, not these (see docs/export.md)")
    if done.returncode != 0 or not dst.is_file():
        errors = [line.strip() for line in text.splitlines() if " - ERROR - " in line or "Error" in line]
        reason = errors[-1][:300] if errors else f"exit status {done.returncode}"
        raise ExportError(f"tf2onnx could not convert {src.name}: {reason} (run with --verbose for its log)")


def embed_spec(raw: Path, dst: Path, spec: ModelSpec, *, source: Path) -> ModelSpec:
    """Write `raw` to `dst` with the .tflite's spec in its metadata, its input and output names those of the ONNX
    graph (matched by position). tf2onnx keeps the layout; a graph whose tensors differ from the .tflite's in rank
    or in a fixed size is refused, since the spec's layout would then be wrong."""
    from edgepix.runtime.description.onnxedit import write_with_metadata
    from edgepix.runtime.description.onnxproto import read_onnx_header
    from edgepix.runtime.description.tensors import tensor_meta
    from edgepix.runtime.description.tflite import read_tflite

    tfl = read_tflite(source)
    header = read_onnx_header(raw)
    onnx_in = [tensor_meta(v, raw) for v in header.inputs]
    onnx_out = [tensor_meta(v, raw) for v in header.outputs]
    pairs = list(zip([t.meta for t in tfl.inputs], onnx_in)) + list(zip([t.meta for t in tfl.outputs], onnx_out))
    if len(onnx_in) != len(tfl.inputs) or len(onnx_out) != len(tfl.outputs) or not all(
            _same_shape(a, b) for a, b in pairs):
        found = ", ".join(t.describe() for t in onnx_in + onnx_out)
        raise ExportError(f"tf2onnx changed the tensors of {source.name}: expected "
                          f"{', '.join(a.describe() for a, _ in pairs)}, got {found}")
    image = onnx_in[_position(tfl.inputs, spec.input_name)]
    onnx_spec = spec.replace(input_name=image.name, output_name=onnx_out[_position(tfl.outputs, spec.output_name)].name,
                             dynamic_batch=image.dim(0) is None)
    write_with_metadata(raw, dst, {ONNX_METADATA_KEY: onnx_spec.to_json()})
    return onnx_spec


def _position(tensors, name: str) -> int:
    """The position of the tensor the spec names (the first when the spec names none of them)."""
    names = [t.name for t in tensors]
    return names.index(name) if name in names else 0


def _same_shape(a: TensorMeta, b: TensorMeta) -> bool:
    return len(a.shape) == len(b.shape) and all(x is None or y is None or x == y for x, y in
                                                zip((a.dim(i) for i in range(len(a.shape))),
                                                    (b.dim(i) for i in range(len(b.shape)))))


def gate(tflite: Path, spec: ModelSpec, onnx: Path, onnx_spec: ModelSpec, *, data: str | None,
         n: int) -> GateReport:
    """The .tflite on LiteRT (the reference) against the ONNX on ONNX Runtime, on the same inputs."""
    from edgepix.runtime.backends import load_backend

    samples = gate_samples(spec, data=data, n=n)
    rng = np.random.default_rng(0)
    with load_backend(tflite, "litert") as ref_b, load_backend(onnx, "ort-cpu") as art_b:
        reference, artifact = BackendRunner(ref_b, spec), BackendRunner(art_b, onnx_spec)
        shape = ref_b.input(spec.input_name).shape
        random_shape = tuple(d if isinstance(d, int) else 1 for d in shape)
        # a dynamic batch is also checked at batch 2 (LiteRT resizes; the ONNX must take it too)
        batch_shape = (2, *random_shape[1:]) if shape and shape[0] is None else random_shape
        name = f"{onnx.name} on ort-cpu vs {tflite.name} on LiteRT"
        if spec.task is Task.SEGMENTATION:
            inputs = [(preprocess(s.image, spec), None) for s in samples]  # the model's classes are not the scenes'
            randoms = [rng.standard_normal(s, dtype=np.float32) for s in (random_shape, batch_shape)]
            return compare_segmentation(reference, artifact, onnx_spec, random_inputs=randoms, samples=inputs,
                                        artifact_name=name, reference_name="LiteRT")
        if spec.task is Task.GENERATION_NOISE:
            inputs = [rng.standard_normal(random_shape, dtype=np.float32) for _ in range(n)]
        else:
            inputs = [preprocess(s.image, spec) for s in samples]
            inputs += [np.clip(rng.standard_normal(s, dtype=np.float32), -1, 1) for s in (random_shape, batch_shape)]
        return compare_images(reference, artifact, onnx_spec, inputs=inputs, artifact_name=name,
                              reference_name="LiteRT")


def gate_samples(spec: ModelSpec, *, data: str | None, n: int) -> list[Sample]:
    """`n` synthetic scenes at the model's size, and up to `n` of the user's images from `data`."""
    if n < 1:
        raise ExportError(f"--verify-n must be at least 1, got {n}")
    samples = synthetic_samples(n, spec.input_size, seed=VERIFY_SEED)
    if data is not None and data != "synthetic":
        samples += folder_samples(data, n)
    return samples


def cmd_export_tflite(args) -> int:
    """The `edgepix export MODEL.tflite` handler."""
    if args.format != "onnx":
        raise ExportError(f"a .tflite model converts to --format onnx, got --format {args.format}")
    if args.no_verify:
        raise ExportError("--no-verify: a converted .tflite is always checked against LiteRT (the check is the "
                          "point of the conversion)")
    result = export_tflite(TfliteExportRequest(
        model=args.checkpoint, out=args.out, opset=args.opset if args.opset is not None else TFLITE_OPSET,
        data=args.data, verify_n=args.verify_n))
    if not args.quiet:
        print(result.report.format())
    rewritten = f", {result.rewritten_ops} custom op(s) rewritten" if result.rewritten_ops else ""
    size_mb = result.path.stat().st_size / 1e6
    print(f"wrote {result.path} ({size_mb:.2f} MB, {result.spec.output_kind.value}, input "
          f"{result.spec.input_size[0]}x{result.spec.input_size[1]} {result.spec.input_layout.value}{rewritten})")
    return 0
