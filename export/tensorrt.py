"""`edgepix export ... --format engine`: TensorRT engines from a checkpoint or an ONNX file.

From a checkpoint, the ONNX matching the precision is exported first and passes the parity gate against PyTorch
(FP32 ONNX, FP16 ONNX, or symmetric S8S8 Q/DQ ONNX for TensorRT), and is kept beside the engine: the manifest
names it, and `--rebuild` (or the runtime's `rebuild=True`) rebuilds from it on another device. From an ONNX file,
the engine is built from that file. The build itself is `edgepix.runtime.backends.tensorrt.build` (torch-free, so a
Jetson can rebuild without PyTorch); this module adds what the export command needs: optimization profiles from
--batch and --imgsz-range (`derive_profiles`, a pure function), output naming, and an engine-vs-ONNX Runtime check.

Nothing in this module imports torch at import time; a checkpoint input imports the export pipeline (torch) then.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgepix.runtime.backends.tensorrt.build import (
    EngineBuildOptions,
    EngineBuildResult,
    Int8Mode,
    build_engine_file,
    import_tensorrt,
)
from edgepix.runtime.backends.tensorrt.manifest import ProfileShapes
from edgepix.runtime.core.errors import ExportError
from edgepix.runtime.core.formats import CHECKPOINT_SUFFIXES
from edgepix.runtime.description.spec import Layout, ModelSpec, OutputKind, Precision

from .compare import compare_backends

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".engine"


# ---- shapes and profiles (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        for v in (self.min, self.opt, self.max):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExportError(f"--batch: batch sizes must be positive integers, got {self.min} {self.opt} "
                                  f"{self.max}")
        if not self.min <= self.opt <= self.max:
            raise ExportError(f"--batch MIN OPT MAX needs MIN <= OPT <= MAX, got {self.min} {self.opt} {self.max}")

    @classmethod
    def parse(cls, values: Sequence[int] | int | None) -> BatchRange | None:
        """`--batch N` (fixed) or `--batch MIN OPT MAX`."""
        if values is None:
            return None
        if isinstance(values, int):
            values = [values]
        values = list(values)
        if len(values) == 1:
            return cls(values[0], values[0], values[0])
        if len(values) == 3:
            return cls(*values)
        raise ExportError(f"--batch takes 1 value (N) or 3 (MIN OPT MAX), got {len(values)}: "
                          f"{' '.join(str(v) for v in values)}")

    @property
    def static(self) -> bool:
        return self.min == self.max


@dataclass(frozen=True)
class SizeRange:
    """Image size (H, W) range for a dynamic-size ONNX: min, opt, max."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            hw = tuple(getattr(self, name))
            if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw):
                raise ExportError(f"image size {name}: expected two positive integers H W, got {list(hw)}")
            object.__setattr__(self, name, hw)
        for i, side in enumerate(("height", "width")):
            if not self.min[i] <= self.opt[i] <= self.max[i]:
                raise ExportError(f"--imgsz-range: {side} needs min <= opt <= max, got {self.min[i]} <= "
                                  f"{self.opt[i]} <= {self.max[i]}")

    @classmethod
    def fixed(cls, hw: Sequence[int]) -> SizeRange:
        hw = (int(hw[0]), int(hw[1]))
        return cls(hw, hw, hw)

    @classmethod
    def parse(cls, imgsz_range: Sequence[int] | None, opt: Sequence[int] | None) -> SizeRange | None:
        """From `--imgsz-range MIN_H MIN_W MAX_H MAX_W` and the optimal size (`--imgsz`, or the spec's size)."""
        if imgsz_range is None:
            return cls.fixed(opt) if opt is not None else None
        values = list(imgsz_range)
        if len(values) != 4:
            raise ExportError(f"--imgsz-range takes 4 values (MIN_H MIN_W MAX_H MAX_W), got {len(values)}")
        lo, hi = (values[0], values[1]), (values[2], values[3])
        if opt is None:
            opt = hi
        return cls(lo, (int(opt[0]), int(opt[1])), hi)


def _spatial_axes(rank: int, layout: Layout) -> tuple[int, int] | None:
    if rank != 4:
        return None
    return (2, 3) if layout is Layout.NCHW else (1, 2)


def _is_static(d: Any) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


def derive_profiles(inputs: Sequence[tuple[str, Sequence[Any]]], spec: ModelSpec | None, *,
                    batch: BatchRange | None = None, imgsz: SizeRange | None = None) -> tuple[ProfileShapes, ...]:
    """One optimization profile for the ONNX inputs `(name, dims)` (ints fixed; names, None or -1 dynamic).

    Dimension 0 is the batch: a fixed batch must match `--batch` when given; a dynamic one takes `--batch`, else
    1. For 4-D image inputs the spatial dimensions (by the spec's layout) are fixed by the ONNX, or come from `imgsz`
    (else the spec's input size); dynamic sizes must be multiples of the spec's size divisor. Every other dimension
    must be fixed in the ONNX. Raises ExportError naming the input, the dimension and what to pass instead.
    """
    layout = spec.input_layout if spec else Layout.NCHW
    divisor = spec.size_divisor if spec else 1
    out = []
    for name, dims in inputs:
        dims = list(dims)
        if not dims:
            raise ExportError(f"input {name!r} is a scalar; TensorRT profiles need at least a batch dimension")
        lo, mid, hi = [0] * len(dims), [0] * len(dims), [0] * len(dims)
        # batch
        if _is_static(dims[0]):
            b = int(dims[0])
            if batch is not None and (batch.min, batch.opt, batch.max) != (b, b, b):
                raise ExportError(f"input {name!r} has a fixed batch of {b} in the ONNX, but --batch asks for "
                                  f"{batch.min}..{batch.max}; export the ONNX with --dynamic-batch, or pass "
                                  f"--batch {b}")
            lo[0] = mid[0] = hi[0] = b
        else:
            r = batch or BatchRange(1, 1, 1)
            lo[0], mid[0], hi[0] = r.min, r.opt, r.max
        # image size
        axes = _spatial_axes(len(dims), layout)
        if axes is None and imgsz is not None and len(inputs) == 1:
            raise ExportError(f"input {name!r} has shape {_fmt(dims)}: no image dimensions, so --imgsz-range does not "
                              "apply")
        if axes is not None:
            fixed = [_is_static(dims[a]) for a in axes]
            if all(fixed):
                hw = (int(dims[axes[0]]), int(dims[axes[1]]))
                if imgsz is not None and (imgsz.min != hw or imgsz.max != hw):
                    raise ExportError(f"input {name!r} has a fixed size {hw[0]}x{hw[1]} in the ONNX, but an image size "
                                      f"range {imgsz.min[0]}x{imgsz.min[1]}..{imgsz.max[0]}x{imgsz.max[1]} was asked "
                                      "for; export the ONNX with --dynamic-size")
                rng = SizeRange.fixed(hw)
            elif any(fixed):
                raise ExportError(f"input {name!r} has shape {_fmt(dims)}: height and width must both be fixed or both "
                                  "dynamic")
            else:
                if imgsz is None and spec is None:
                    raise ExportError(f"input {name!r} has a dynamic image size; pass --imgsz H W (and --imgsz-range)")
                rng = imgsz or SizeRange.fixed(spec.input_size)  # type: ignore[union-attr]
                for label, hw in (("min", rng.min), ("opt", rng.opt), ("max", rng.max)):
                    if hw[0] % divisor or hw[1] % divisor:
                        raise ExportError(f"input {name!r}: image size {label} {hw[0]}x{hw[1]} is not a multiple of "
                                          f"{divisor} (the model's size divisor)")
            for k, a in enumerate(axes):
                lo[a], mid[a], hi[a] = rng.min[k], rng.opt[k], rng.max[k]
        # everything else must be fixed
        for i, d in enumerate(dims):
            if i == 0 or (axes is not None and i in axes):
                continue
            if not _is_static(d):
                raise ExportError(f"input {name!r} dimension {i} ({d!r}) is dynamic; edgepix chooses only the batch "
                                  "and the image size; export the ONNX with that dimension fixed")
            lo[i] = mid[i] = hi[i] = int(d)
        out.append(ProfileShapes(name, tuple(lo), tuple(mid), tuple(hi)))
    return tuple(out)


def _fmt(dims: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) if _is_static(d) else (str(d) if d else "?") for d in dims) + ")"


def default_engine_path(model: Path, precision: Precision, *, argmax: bool = False) -> Path:
    """`fastscnn.pt` -> `fastscnn.fp16.engine`; `fastscnn.fp16.onnx` -> `fastscnn.fp16.engine`."""
    stem = model.stem
    tag = f".{precision.value}"
    if precision is not Precision.FP32 and not stem.endswith(tag):
        stem += tag
    if argmax and not stem.endswith(".argmax"):
        stem += ".argmax"
    return model.with_name(stem + ENGINE_SUFFIX)


# ---- options -------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EngineExportOptions:
    build: EngineBuildOptions = field(default_factory=EngineBuildOptions)
    batch: BatchRange | None = None
    imgsz_range: tuple[int, int, int, int] | None = None  # MIN_H MIN_W MAX_H MAX_W (dynamic-size ONNX only)
    imgsz: tuple[int, int] | None = None  # the optimal size; default: the spec's input size
    cache_dir: Path | None = None  # default: runtime/backends/tensorrt/manifest.py default_cache_dir()
    rebuild: bool = False  # build even when the cache has this engine
    verify: bool = True  # compare the engine with ONNX Runtime on the CPU before keeping it
    verify_n: int = 20

    def __post_init__(self) -> None:
        if self.verify_n < 1:
            raise ExportError(f"--verify-n must be at least 1, got {self.verify_n}")


def check_engine_prerequisites() -> None:
    """Fail in one line, before minutes of ONNX work, when TensorRT is not installed."""
    import_tensorrt()


# ---- from an ONNX file ---------------------------------------------------------------------------------


def export_engine_from_onnx(onnx_path: str | os.PathLike, out: str | os.PathLike | None,
                            options: EngineExportOptions, *, calibration: list[np.ndarray] | None = None,
                            reference_onnx: str | os.PathLike | None = None) -> EngineBuildResult:
    """Build (or reuse) the engine for an ONNX file carrying an edgepix spec; check it against ONNX Runtime."""
    from edgepix.runtime.description.onnxinfo import read_onnx_info

    check_engine_prerequisites()
    onnx_path = Path(onnx_path)
    info = read_onnx_info(onnx_path)
    if info.spec is None:
        raise ExportError(f"{onnx_path} has no edgepix spec in its metadata; export it with `edgepix export CKPT` "
                          "(foreign ONNX files: build them with trtexec)")
    onnx_spec = info.spec
    precision = options.build.precision
    out = Path(out) if out else default_engine_path(onnx_path, precision,
                                                    argmax=onnx_spec.output_kind is OutputKind.CLASS_MAP)
    imgsz = SizeRange.parse(options.imgsz_range, options.imgsz or onnx_spec.input_size) \
        if (options.imgsz_range or options.imgsz) else None
    profiles = derive_profiles([(t.name, t.shape) for t in info.inputs], onnx_spec, batch=options.batch, imgsz=imgsz)
    engine_spec = onnx_spec.replace(precision=precision,
                                    quantization=onnx_spec.quantization if precision is Precision.INT8 else None)
    if precision is Precision.INT8 and options.build.int8_mode is Int8Mode.CALIBRATE:
        engine_spec = engine_spec.replace(quantization=f"TensorRT implicit INT8, entropy calibration "
                                                       f"({len(calibration or [])} images)")
    result = build_engine_file(onnx_path, out, spec=engine_spec, options=options.build, profiles=[profiles],
                               cache_dir=options.cache_dir, rebuild=options.rebuild, calibration=calibration,
                               onnx_spec=onnx_spec)
    if options.verify:
        report = compare_backends(result.path, "tensorrt", reference_onnx or onnx_path, n=options.verify_n)
        log.info("%s", report.format())
        if not report.passed:
            raise ExportError(f"the engine does not match ONNX Runtime and should not be trusted:\n{report.format()}")
    return result


# ---- from a checkpoint -----------------------------------------------------------------------------------


def export_engine_from_checkpoint(request, out: str | os.PathLike | None, options: EngineExportOptions
                                  ) -> tuple[EngineBuildResult, Any]:
    """Export (and gate) the ONNX for the precision, keep it beside the engine, then build the engine from it.

    `request` is an `export.pipeline.ExportRequest` (its format is replaced). Returns (engine result, gate report)."""
    from .pipeline import ExportFormat, calibration_batches, run_export
    from .precision import Int8Target

    check_engine_prerequisites()
    precision = options.build.precision
    out = Path(out) if out else default_engine_path(Path(request.checkpoint), precision, argmax=request.onnx.argmax)
    onnx_out = out.with_suffix(".onnx")
    calibrate = precision is Precision.INT8 and options.build.int8_mode is Int8Mode.CALIBRATE
    fmt = {Precision.FP32: ExportFormat.ONNX, Precision.FP16: ExportFormat.ONNX_FP16,
           Precision.INT8: ExportFormat.ONNX if calibrate else ExportFormat.ONNX_INT8}[precision]
    int8 = replace(request.int8, target=Int8Target.TENSORRT, activation_signed=None)
    onnx_request = replace(request, format=fmt, out=onnx_out, int8=int8)
    if options.imgsz is None and request.onnx.imgsz is not None:
        options = replace(options, imgsz=tuple(request.onnx.imgsz))
    exported = run_export(onnx_request)
    log.info("wrote %s (%s ONNX%s); building the engine from it", exported.path, exported.spec.precision.value,
             ", passed the parity gate" if exported.report is not None else "")
    calibration = calibration_batches(request, exported.spec) if calibrate else None
    result = export_engine_from_onnx(exported.path, out, options, calibration=calibration)
    return result, exported.report


# ---- engine timings (needs a GPU and TensorRT) -------------------------------------------------------------


def bench_engine(engine: str | os.PathLike, *, iters: int = 200, warmup: int = 20, cuda_graph: bool = False
                 ) -> dict[str, float]:
    """Latency of the engine at its optimal shape: p50/p90/p99 end to end, trtexec-style stage means (H2D, GPU
    compute, D2H on the GPU's clock; enqueue on the host's), and whether a CUDA graph was used."""
    from edgepix.runtime.backends import load_backend

    with load_backend(engine, "tensorrt", cuda_graph=cuda_graph) as b:
        feed = {}
        for meta in b.inputs:
            shape = b.optimal_shape(meta.name)
            feed[meta.name] = np.random.default_rng(0).standard_normal(shape).astype(meta.dtype)
        for _ in range(warmup):
            b.infer(feed, check=False)
        wall, h2d, compute, d2h, enqueue = [], [], [], [], []
        for _ in range(iters):
            start = time.perf_counter()
            b.infer(feed, check=False)
            wall.append((time.perf_counter() - start) * 1e3)
            t = b.last_timings
            if t is not None:
                h2d.append(t.h2d_ms)
                compute.append(t.compute_ms)
                d2h.append(t.d2h_ms)
                enqueue.append(t.enqueue_ms)
        graph_used = float(b.cuda_graph_active)
    w = np.asarray(wall)
    out = {"p50_ms": float(np.percentile(w, 50)), "p90_ms": float(np.percentile(w, 90)),
           "p99_ms": float(np.percentile(w, 99)), "mean_ms": float(w.mean()), "cuda_graph_used": graph_used}
    if compute:
        out.update(h2d_ms=float(np.mean(h2d)), compute_ms=float(np.mean(compute)), d2h_ms=float(np.mean(d2h)),
                   enqueue_ms=float(np.mean(enqueue)), compute_p99_ms=float(np.percentile(compute, 99)))
    return out


# ---- the CLI handler -------------------------------------------------------------------------------------


def engine_options_from_args(args: argparse.Namespace) -> EngineExportOptions:
    build = EngineBuildOptions(
        precision=Precision(args.precision),
        int8_mode=Int8Mode(args.int8_mode),
        workspace_mb=args.workspace,
        opt_level=args.opt_level,
        timing_cache=args.timing_cache,
        dla_core=args.dla_core,
    )
    if args.imgsz_range is not None and len(args.imgsz_range) != 4:
        raise ExportError(f"--imgsz-range takes 4 values (MIN_H MIN_W MAX_H MAX_W), got {len(args.imgsz_range)}")
    return EngineExportOptions(
        build=build,
        batch=BatchRange.parse(args.batch),
        imgsz_range=tuple(args.imgsz_range) if args.imgsz_range else None,
        imgsz=tuple(args.imgsz) if args.imgsz else None,
        cache_dir=args.cache,
        rebuild=args.rebuild,
        verify=not args.no_verify,
        verify_n=args.verify_n,
    )


def cmd_export_engine(args: argparse.Namespace, make_request) -> int:
    """`edgepix export MODEL --format engine`: `make_request(args)` builds the ExportRequest for a checkpoint."""
    options = engine_options_from_args(args)  # argument errors first: no TensorRT needed to report them
    model = Path(args.checkpoint)
    if not model.exists():
        raise ExportError(f"model not found: {model} (expected an edgepix checkpoint .pt or an .onnx file)")
    suffix = model.suffix.lower()
    if suffix not in (".onnx", *CHECKPOINT_SUFFIXES):
        raise ExportError(f"--format engine builds from a checkpoint (.pt) or an .onnx file, got {model.name}")
    if args.out is not None and Path(args.out).suffix.lower() not in (".engine", ".plan", ".trt"):
        raise ExportError(f"--out {args.out}: an engine file ends in .engine (or .plan/.trt)")
    check_engine_prerequisites()
    report = None
    if suffix == ".onnx":
        result = export_engine_from_onnx(model, args.out, options)
    else:
        result, report = export_engine_from_checkpoint(make_request(args), args.out, options)
    if report is not None and not args.quiet:
        print(report.format())
    m = result.manifest
    size_mb = result.path.stat().st_size / 1e6
    how = "reused from the engine cache" if result.reused else f"built in {result.seconds:.1f} s"
    print(f"wrote {result.path} ({size_mb:.2f} MB, {m.precision}, TensorRT {m.tensorrt}, {m.gpu} sm "
          f"{m.compute_capability}, {how}; manifest {result.path.name}.json)")
    return 0
