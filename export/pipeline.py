"""Checkpoint -> verified artifact. Nothing appears at the output path unless it passed the parity gate.

Every format starts from the FP32 ONNX graph: FP16 converts it, INT8 quantizes it (and TensorRT engines, in their own
module, build from those). Work happens in a temporary folder; the artifact is moved into place atomically at the end.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepix.runtime.core.errors import ExportError
from edgepix.runtime.core.fileio import atomic_output
from edgepix.runtime.data.synthetic import CLASS_NAMES
from edgepix.runtime.description.spec import ModelSpec, Task
from edgepix.train.checkpoint import load_source
from edgepix.train.data import read_classes_json

from .gate import VerificationFailed
from .generators import generator_input_image, reference_mode
from .precision import Int8Options, convert_fp16, quantize_int8
from .to_onnx import OnnxExportOptions, export_onnx, require_onnx
from .verify import VERIFY_SEED, GateReport, Sample, folder_samples, preprocess, synthetic_samples, verify
from .workspace import workspace

log = logging.getLogger(__name__)

CALIB_SEED = 5_000_011  # calibration scenes differ from training, validation and verification scenes


class ExportFormat(str, enum.Enum):
    ONNX = "onnx"
    ONNX_FP16 = "onnx-fp16"
    ONNX_INT8 = "onnx-int8"
    ENGINE = "engine"  # TensorRT: export/tensorrt.py exports the matching ONNX with run_export, then builds


@dataclass(frozen=True)
class ExportRequest:
    checkpoint: Path
    format: ExportFormat = ExportFormat.ONNX
    out: Path | None = None
    onnx: OnnxExportOptions = field(default_factory=OnnxExportOptions)
    int8: Int8Options = field(default_factory=Int8Options)
    calib: str = "synthetic"  # a folder of images, or "synthetic"
    calib_n: int = 64
    data: str = "synthetic"  # validation data for the gate: a dataset folder, or "synthetic"
    verify_n: int = 20
    verify: bool = True
    use_ema: bool = True


@dataclass
class ExportResult:
    path: Path
    spec: ModelSpec
    report: GateReport | None


def default_output_path(request: ExportRequest) -> Path:
    """Beside the checkpoint (`best.pt` -> `best.int8.onnx`), or inside a Hugging Face folder (`model.onnx`)."""
    suffix = {ExportFormat.ONNX: "", ExportFormat.ONNX_FP16: ".fp16", ExportFormat.ONNX_INT8: ".int8"}[request.format]
    if request.onnx.argmax:
        suffix += ".argmax"
    if request.checkpoint.is_dir():
        return request.checkpoint / f"model{suffix}.onnx"
    return request.checkpoint.with_name(request.checkpoint.stem + suffix + ".onnx")


def load_samples(source: str, n: int, size: tuple[int, int], *, seed: int,
                 class_names: tuple[str, ...] | None = None) -> list[Sample]:
    """Gate or calibration images. With `class_names` (a segmentation model's), labels whose classes are not the
    model's are dropped: a pretrained 19-class model checked on 6-class scenes is compared output for output only."""
    samples = synthetic_samples(n, size, seed=seed) if source == "synthetic" else folder_samples(source, n)
    data_classes = _data_class_names(source)
    if class_names is not None and data_classes is not None and tuple(data_classes) != tuple(class_names):
        log.info("the validation data's classes (%s) are not the model's (%s): the gate compares outputs without "
                 "labels", ", ".join(data_classes), ", ".join(class_names[:8]) + (", ..." if len(class_names) > 8
                                                                                  else ""))
        samples = [Sample(s.image, None) for s in samples]
    return samples


def _data_class_names(source: str) -> tuple[str, ...] | None:
    if source == "synthetic":
        return CLASS_NAMES
    classes_file = Path(source) / "classes.json"
    return read_classes_json(classes_file).names if classes_file.is_file() else None


def calibration_batches(request: ExportRequest, spec: ModelSpec) -> list[np.ndarray]:
    if request.calib_n < 1:
        raise ExportError(f"--calib-n must be at least 1, got {request.calib_n}")
    if spec.task is Task.GENERATION_NOISE:
        rng = np.random.default_rng(CALIB_SEED)
        return [rng.standard_normal((1, spec.latent_size), dtype=np.float32) for _ in range(request.calib_n)]
    samples = load_samples(request.calib, request.calib_n, spec.input_size, seed=CALIB_SEED)
    return [preprocess(generator_input_image(s.image, s.mask, spec), spec) for s in samples]


def check_writable(path: Path) -> None:
    """Fail before minutes of work when the output cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ExportError(f"--out {path} is a folder; give a file path such as {path / 'model.onnx'}")
    probe_dir = parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ExportError(f"cannot write {path}: {probe_dir} is a file, not a folder")
    if not os.access(probe_dir, os.W_OK):
        raise ExportError(f"cannot write {path}: {probe_dir} is not writable")


def run_export(request: ExportRequest) -> ExportResult:
    if request.format is ExportFormat.ENGINE:
        raise ExportError("run_export makes ONNX files; TensorRT engines are built by "
                          "edgepix.export.tensorrt.export_engine_from_checkpoint (edgepix export --format engine)")
    out = Path(request.out) if request.out else default_output_path(request)
    check_writable(out)
    ckpt, model = load_source(request.checkpoint, use_ema=request.use_ema)
    spec: ModelSpec = ckpt["spec"]
    # onnx is a C++ extension whose import runs Python callbacks: a Ctrl-C or SIGTERM raised inside them cannot
    # unwind through C++ and aborts the process. Import it before the work that an interrupt must clean up.
    require_onnx()
    with workspace() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        artifact_spec = export_onnx(model, spec, fp32, request.onnx)
        artifact = fp32
        if request.format is ExportFormat.ONNX_FP16:
            artifact = Path(tmp) / "fp16.onnx"
            artifact_spec = convert_fp16(fp32, artifact, artifact_spec)
        elif request.format is ExportFormat.ONNX_INT8:
            artifact = Path(tmp) / "int8.onnx"
            artifact_spec = quantize_int8(fp32, artifact, artifact_spec, calibration_batches(request, artifact_spec),
                                          request.int8)
        report = None
        if request.verify:
            labels = artifact_spec.class_names if artifact_spec.task is Task.SEGMENTATION else None
            samples = load_samples(request.data, request.verify_n, artifact_spec.input_size, seed=VERIFY_SEED,
                                   class_names=labels)
            reference_mode(model, train_mode=request.onnx.train_mode, dropout=request.onnx.dropout)
            report = verify(artifact, model, artifact_spec, samples,
                            stochastic=request.onnx.train_mode and request.onnx.dropout)
            report.artifact = str(out)  # the gate ran on the temporary file that becomes `out`
            if not report.passed:
                raise VerificationFailed(report)
        else:
            log.warning("--no-verify: %s is written without checking it against PyTorch", out)
        try:
            with atomic_output(out) as part:
                shutil.copyfile(artifact, part)
        except OSError as e:
            raise ExportError(f"cannot write {out}: {e.strerror or e}") from e
    return ExportResult(out, artifact_spec, report)
