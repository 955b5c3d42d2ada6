"""Checkpoint -> verified .tflite for LiteRT: `edgepix export CKPT --format tflite [--imgsz H W] [--out M.tflite]`.

    1. The model (an edgepix checkpoint or a Hugging Face folder; the EMA weights unless --no-ema) is wrapped to take
       NHWC images and give NHWC outputs (`ChannelsLast`: one permute in, one out). NHWC is LiteRT's own layout and
       XNNPACK's: the converter folds the permutes into its NHWC kernels, so the .tflite holds no TRANSPOSE, and
       LiteRT users feed (N, H, W, 3) as they do every other .tflite.
    2. Google's PyTorch-to-LiteRT converter, litert-torch (`litert_torch.convert`: torch.export, then LiteRT's MLIR
       converter; no TensorFlow), converts it in a child process of this Python: its import takes seconds and
       brings JAX, its logs stay out of this process, and a crash or a hang is one line here.
    3. The spec (the checkpoint's at --imgsz, `input_layout` and `output_layout` NHWC, the .tflite's tensor names)
       is embedded in the .tflite (its metadata entry "edgepix.spec"; description.tflite.embed_spec), so the
       runtime needs no NAME.spec.json: `Segmenter.load("model.tflite")` reads it.
    4. The parity gate (export/verify.py, the one comparator, the FP32 thresholds): the .tflite on the `litert`
       backend (XNNPACK) against the checkpoint's model in PyTorch, fed the same NHWC inputs, on --verify-n
       validation images (--data, synthetic scenes by default) and random inputs.

Nothing appears at --out unless the gate passed: the work happens in a temporary folder (export/workspace.py) and
the artifact is written by the one file writer. Needs the `tflite-export` extra (litert-torch, ai-edge-litert).
Fixed input size and batch 1 (a .tflite resizes its input at run time, not checked here); FP32 only.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgepix.runtime.core.errors import DependencyError, ExportError
from edgepix.runtime.core.fileio import atomic_write_bytes, check_writable
from edgepix.runtime.description.spec import Layout, ModelSpec, Task

from .gate import VerificationFailed
from .verify import VERIFY_SEED, GateReport
from .workspace import workspace

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edgepix[tflite-export]'"
CONVERT_TIMEOUT_S = 1800  # a large generator's conversion; a hung converter is an error
FAILURE_MARK = "edgepix-tflite-conversion-failed: "  # the child's one-line reason, on its last stderr line


@dataclass(frozen=True)
class TfliteExportRequest:
    checkpoint: Path
    out: Path | None = None  # default: CKPT.tflite beside the checkpoint (model.tflite in a Hugging Face folder)
    imgsz: tuple[int, int] | None = None  # (H, W); None: the checkpoint's size
    use_ema: bool = True
    data: str = "synthetic"  # validation data for the gate: a dataset folder, or "synthetic"
    verify_n: int = 20


@dataclass
class TfliteExportResult:
    path: Path
    spec: ModelSpec
    report: GateReport
    converter: str  # "litert-torch VERSION"


class ChannelsLast(nn.Module):
    """`model` taking NHWC images and giving NHWC outputs: what is converted, and the gate's PyTorch reference. A
    noise generator's (N, L) latent passes as it is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.permute(0, 3, 1, 2)
        y = self.model(x)
        return y.permute(0, 2, 3, 1) if y.dim() == 4 else y


def tflite_spec(spec: ModelSpec, imgsz: tuple[int, int] | None) -> ModelSpec:
    """The spec of the .tflite before its tensor names are known: the size checked as for ONNX, NHWC in and out."""
    from .to_onnx import OnnxExportOptions, exported_spec

    out = exported_spec(spec, OnnxExportOptions(imgsz=imgsz))
    image_input = Layout.NHWC if spec.task is not Task.GENERATION_NOISE else out.input_layout
    return out.replace(input_layout=image_input, output_layout=Layout.NHWC)


def sample_input(spec: ModelSpec) -> torch.Tensor:
    """The input the conversion traces with, in the .tflite's layout."""
    from .to_onnx import example_input

    x = example_input(spec)
    return x.permute(0, 2, 3, 1).contiguous() if x.dim() == 4 and spec.input_layout is Layout.NHWC else x


def default_output_path(checkpoint: Path) -> Path:
    return checkpoint / "model.tflite" if checkpoint.is_dir() else checkpoint.with_suffix(".tflite")


def export_tflite_from_checkpoint(request: TfliteExportRequest) -> TfliteExportResult:
    from edgepix.train.checkpoint import load_source

    from .pipeline import load_samples
    from .verify import verify

    out = Path(request.out) if request.out else default_output_path(Path(request.checkpoint))
    if out.suffix.lower() != ".tflite":
        raise ExportError(f"--out {out}: a LiteRT model is a .tflite file; give a path ending in .tflite")
    if request.verify_n < 1:
        raise ExportError(f"--verify-n must be at least 1, got {request.verify_n}")
    version = require_converter()
    check_writable(out, "--out", ExportError)
    ckpt, model = load_source(request.checkpoint, use_ema=request.use_ema)
    spec = tflite_spec(ckpt["spec"], request.imgsz)
    with workspace() as tmp:
        converted = Path(tmp) / "converted.tflite"
        convert_checkpoint(request.checkpoint, spec, converted, use_ema=request.use_ema)
        artifact = Path(tmp) / "model.tflite"
        artifact_spec = embed_tflite_spec(converted, artifact, spec)
        labels = artifact_spec.class_names if artifact_spec.task is Task.SEGMENTATION else None
        samples = load_samples(request.data, request.verify_n, artifact_spec.input_size, seed=VERIFY_SEED,
                               class_names=labels)
        report = verify(artifact, ChannelsLast(model).eval(), artifact_spec, samples, backend="litert")
        report.artifact = str(out)  # the gate ran on the temporary file that becomes `out`
        report.title = "parity gate against PyTorch on LiteRT"
        if not report.passed:
            raise VerificationFailed(report)
        try:
            atomic_write_bytes(out, artifact.read_bytes())
        except OSError as e:
            raise ExportError(f"cannot write {out}: {e.strerror or e}") from e
    return TfliteExportResult(out, artifact_spec, report, f"litert-torch {version}")


def require_converter() -> str:
    """litert-torch's version; DependencyError in one line when it (or LiteRT, for the gate) is missing."""
    import importlib.metadata

    for module, package in (("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert")):
        if not _installed(module):
            raise DependencyError(f"exporting to .tflite needs {package} (Google's PyTorch-to-LiteRT converter and "
                                  f"LiteRT for the parity gate); install it with: {INSTALL_HINT}")
    try:
        return importlib.metadata.version("litert-torch")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (import blocked)
        return False


def convert_checkpoint(checkpoint: Path, spec: ModelSpec, dst: Path, *, use_ema: bool) -> None:
    """litert-torch in a child process of this Python (`python -m edgepix.export.to_tflite JOB.json`): it rebuilds
    the model from the checkpoint as this process did, wraps it in ChannelsLast and converts it to `dst`.
    ExportError with the converter's own last words when it fails."""
    job = dst.with_suffix(".job.json")
    job.write_text(json.dumps({"checkpoint": str(checkpoint), "use_ema": use_ema, "spec": spec.to_json(),
                               "out": str(dst)}))
    cmd = [sys.executable, "-m", "edgepix.export.to_tflite", str(job)]
    # TensorFlow-style C++ logs (LiteRT's converter, XLA) and Python warnings of the converter's dependencies
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "GLOG_minloglevel": "2", "PYTHONWARNINGS": "ignore"}
    log.info("converting %s with litert-torch (tens of seconds)", checkpoint)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise ExportError(f"litert-torch did not finish converting {checkpoint} in {CONVERT_TIMEOUT_S} s") from None
    text = done.stdout + done.stderr
    log.debug("litert-torch output:\n%s", text)
    if done.returncode == 0 and dst.is_file():
        log.info("converted in %.1f s", time.perf_counter() - start)
        return
    marked = [line[len(FAILURE_MARK):] for line in text.splitlines() if line.startswith(FAILURE_MARK)]
    if marked:
        reason = marked[-1]
    elif done.returncode < 0:
        reason = f"the converter's process died of signal {-done.returncode}"
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = lines[-1][:300] if lines else f"exit status {done.returncode}"
    raise ExportError(f"litert-torch could not convert {checkpoint}: {reason} (run with --verbose for its log)")


def embed_tflite_spec(src: Path, dst: Path, spec: ModelSpec) -> ModelSpec:
    """Write `src` to `dst` with `spec` embedded, its input and output names those of the .tflite; the tensors
    are checked against the spec first (one image input of the spec's shape, an output the spec can read)."""
    from edgepix.runtime.description.outputs import check_output
    from edgepix.runtime.description.tflite import embed_spec, read_tflite

    model = read_tflite(src)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        found = ", ".join(t.meta.describe() for t in model.inputs + model.outputs)
        raise ExportError(f"the converted model has {len(model.inputs)} inputs and {len(model.outputs)} outputs "
                          f"({found}); edgepix exports models of one input and one output")
    image, output = model.inputs[0].meta, model.outputs[0].meta
    expected = tuple(sample_input(spec).shape)
    if image.shape != expected:
        raise ExportError(f"the converted model takes {image.describe()}, expected the shape {list(expected)}")
    out_spec = spec.replace(input_name=image.name, output_name=output.name)
    if out_spec.task is Task.SEGMENTATION:
        check_output(out_spec, output, source=src.name)
    dst.write_bytes(embed_spec(src.read_bytes(), out_spec, source=src.name))
    written = read_tflite(dst).spec
    if written != out_spec:
        raise ExportError(f"{dst.name}: the spec read back differs from the one embedded")
    return out_spec


def cmd_export_to_tflite(args) -> int:
    """The `edgepix export CKPT --format tflite` handler."""
    given = [flag for flag, on in (
        ("--dynamic-batch", args.dynamic_batch), ("--dynamic-size", args.dynamic_size), ("--argmax", args.argmax),
        ("--uint8-output", args.uint8_output), ("--train-mode", args.train_mode), ("--dropout", args.dropout),
        ("--deconv", args.deconv != "convtranspose"), ("--opset", args.opset is not None),
        ("--exporter", args.exporter != "torchscript")) if on]
    if given:
        raise ExportError(f"{', '.join(given)}: not for --format tflite, which exports the model's FP32 outputs at "
                          "a fixed size and batch 1 (see docs/export.md)")
    if args.no_verify:
        raise ExportError("--no-verify: a .tflite export is always checked against PyTorch (the gate takes seconds "
                          "next to the conversion's tens of seconds)")
    result = export_tflite_from_checkpoint(TfliteExportRequest(
        checkpoint=args.checkpoint, out=args.out, imgsz=tuple(args.imgsz) if args.imgsz else None,
        use_ema=not args.no_ema, data=args.data, verify_n=args.verify_n))
    if not args.quiet:
        print(result.report.format())
    s = result.spec
    size_mb = result.path.stat().st_size / 1e6
    takes = (f"latent {s.latent_size}" if s.task is Task.GENERATION_NOISE
             else f"input {s.input_size[0]}x{s.input_size[1]} {s.input_layout.value}")
    print(f"wrote {result.path} ({size_mb:.2f} MB, {s.precision.value}, {s.output_kind.value} "
          f"{s.output_layout.value}, {takes}; {result.converter})")
    return 0


# ---- the child process ------------------------------------------------------------------------------------


def _convert_job(job_file: str) -> None:
    from edgepix.train.checkpoint import load_source

    job = json.loads(Path(job_file).read_text())
    spec = ModelSpec.from_json(job["spec"])
    _, model = load_source(job["checkpoint"], use_ema=job["use_ema"])
    module = ChannelsLast(model.float().eval()).eval()
    import litert_torch

    edge_model = litert_torch.convert(module, (sample_input(spec),))
    edge_model.export(job["out"])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m edgepix.export.to_tflite JOB.json (edgepix export --format tflite runs it)")
    try:
        _convert_job(sys.argv[1])
    except Exception as e:  # the parent reports it: one line, the converter's words
        import traceback

        traceback.print_exc()
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"{FAILURE_MARK}{type(e).__name__}{': ' + first if first else ''}", file=sys.stderr)
        sys.exit(1)
