"""`edgepix export` and `edgepix verify`. Nothing heavy is imported until a handler runs."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "engine", "tflite", "triton", "deepstream")


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="checkpoint -> ONNX (FP32, FP16, INT8), TensorRT engine or LiteRT "
                                              ".tflite, verified")
    p.add_argument("checkpoint", type=Path,
                   help="an edgepix checkpoint (.pt) or a Hugging Face save_pretrained folder; with --format engine "
                        "also an .onnx file; with --format onnx also a .tflite model (converted with tf2onnx and "
                        "checked against LiteRT)")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--imgsz", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the training size)")
    p.add_argument("--dynamic-batch", action="store_true", help="batch dimension left dynamic")
    p.add_argument("--dynamic-size", action="store_true", help="height and width left dynamic")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    p.add_argument("--argmax", action=argparse.BooleanOptionalAction, default=None,
                   help="end with ArgMax + Cast: the graph outputs a uint8 class map (the default for --format "
                        "triton; --no-argmax serves logits)")
    p.add_argument("--uint8-output", action="store_true", help="generators: the graph outputs uint8 images")
    p.add_argument("--train-mode", action="store_true",
                   help="generators: normalise each image with its own statistics, as in training (pix2pix "
                        "practice); dropout stays off unless --dropout")
    p.add_argument("--dropout", action="store_true",
                   help="with --train-mode: keep dropout active (new random masks on every run; the gate then "
                        "compares output distributions)")
    p.add_argument("--deconv", choices=("convtranspose", "subpixel", "col2im"), default="convtranspose",
                   help="how transposed convolutions are computed: ONNX ConvTranspose (as PyTorch), subpixel (2x2 "
                        "Convs per output phase; batches in ONNX Runtime on CPUs) or col2im (MatMul + Col2Im, "
                        "--opset 18); see docs/generation.md")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim graph simplification")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even when the checkpoint has EMA")
    p.add_argument("--calib", default="synthetic", help="INT8 calibration images: a folder, or 'synthetic'")
    p.add_argument("--calib-n", type=int, default=64, help="number of calibration images")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    p.add_argument("--int8-target", choices=("cpu", "tensorrt"), default="cpu",
                   help="cpu: U8S8 for ONNX Runtime; tensorrt: symmetric S8S8 for TensorRT explicit quantization")
    p.add_argument("--quant-format", choices=("qdq", "qoperator"), default="qdq")
    p.add_argument("--keep-float", nargs="+", default=(), metavar="NODE",
                   help="node names to keep in float; 'first' and 'last' name the first and last Conv")
    p.add_argument("--data", default="synthetic",
                   help="validation data for the parity gate: a dataset folder or 'synthetic' (a .tflite is also "
                        "checked on synthetic scenes; --data adds a folder of your images)")
    p.add_argument("--verify-n", type=int, default=20, help="validation images for the parity gate")
    p.add_argument("--out", type=Path,
                   help="output file (default: beside the checkpoint); triton: the repository folder; deepstream: "
                        "the folder for the configs and the model")
    p.add_argument("--no-verify", action="store_true", help="skip the parity gate (warns)")
    _engine_arguments(p)
    from . import deepstream, triton  # light modules: their heavy imports happen inside the handlers

    triton.add_arguments(p)
    deepstream.add_arguments(p)
    p.set_defaults(func=cmd_export, sigterm_interrupts=True)  # temporary folders are removed on SIGTERM too

    p = subparsers.add_parser("verify", help="run the parity gate: does ARTIFACT compute what CKPT computes?")
    p.add_argument("artifact", type=Path, help="an exported .onnx file")
    p.add_argument("checkpoint", type=Path, help="the edgepix checkpoint (or Hugging Face folder) it came from")
    p.add_argument("--data", default="synthetic", help="validation data: a dataset folder or 'synthetic'")
    p.add_argument("--verify-n", type=int, default=20)
    p.add_argument("--train-mode", action="store_true", help="run PyTorch in training mode (train-mode exports)")
    p.add_argument("--dropout", action="store_true", help="the artifact keeps dropout active (--train-mode --dropout)")
    p.add_argument("--no-ema", action="store_true")
    p.set_defaults(func=cmd_verify)


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorRT engine (--format engine; needs TensorRT and an NVIDIA GPU)")
    g.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                   help="engine precision (default fp16); triton: the ONNX's (default fp32); deepstream: nvinfer's "
                        "network-mode (default fp16)")
    g.add_argument("--int8-mode", choices=("qdq", "calibrate"), default="qdq",
                   help="qdq: explicit Q/DQ ONNX (TensorRT 10 and 11); calibrate: implicit INT8 with an entropy "
                        "calibrator (TensorRT <= 10)")
    g.add_argument("--batch", type=int, nargs="+", metavar="N", help="batch N, or MIN OPT MAX (dynamic-batch ONNX)")
    g.add_argument("--imgsz-range", type=int, nargs=4, metavar=("MIN_H", "MIN_W", "MAX_H", "MAX_W"),
                   help="image sizes the engine accepts (dynamic-size ONNX); the optimum is --imgsz")
    g.add_argument("--workspace", type=int, metavar="MB", help="builder workspace limit in MB")
    g.add_argument("--opt-level", type=int, metavar="N", help="builder optimization level 0..5 (TensorRT default 3)")
    g.add_argument("--timing-cache", type=Path, metavar="FILE", help="kernel timing cache reused across builds")
    g.add_argument("--dla-core", type=int, metavar="N", help="run on DLA core N with GPU fallback (Jetson)")
    g.add_argument("--cache", type=Path, metavar="DIR", help="engine cache (default ~/.cache/edgepix/engines)")
    g.add_argument("--rebuild", action="store_true", help="build even when the engine cache has this engine")


def cmd_export(args: argparse.Namespace) -> int:
    from edgepix.runtime.core.formats import TFLITE_SUFFIXES

    if args.checkpoint.suffix.lower() in TFLITE_SUFFIXES:
        from .tflite import cmd_export_tflite

        return cmd_export_tflite(args)
    if args.format == "tflite":
        from .to_tflite import cmd_export_to_tflite

        return cmd_export_to_tflite(args)
    if args.format == "engine":
        from .tensorrt import cmd_export_engine

        args.precision = args.precision or "fp16"
        return cmd_export_engine(args, export_request)
    if args.format == "triton":
        from .triton import cmd_export_triton

        with output_folder(args.out, args.format):
            return cmd_export_triton(args, export_request)
    if args.format == "deepstream":
        from .deepstream import cmd_export_deepstream

        with output_folder(args.out, args.format):
            return cmd_export_deepstream(args, export_request)
    from .pipeline import run_export

    result = run_export(export_request(args))
    if result.report is not None and not args.quiet:
        print(result.report.format())
    size_mb = result.path.stat().st_size / 1e6
    print(f"wrote {result.path} ({size_mb:.2f} MB, {result.spec.precision.value}, "
          f"{result.spec.output_kind.value}, input {result.spec.input_size[0]}x{result.spec.input_size[1]})")
    return 0


@contextlib.contextmanager
def output_folder(out: Path | None, fmt: str) -> Iterator[None]:
    """The --out folder of the formats that write one (triton, deepstream): checked before any work, in one line,
    when it is a file or cannot be written; the folders made for it are removed again when the export fails (the
    format writes into it only at the end, by rename, so a failed export has put nothing there)."""
    from edgepix.runtime.core.errors import ExportError
    from edgepix.runtime.core.fileio import check_writable_folder

    if out is None:  # the format says what --out it needs
        yield
        return
    if out.exists() and not out.is_dir():
        raise ExportError(f"--format {fmt} --out {out}: expected a folder, found a file; give a folder path "
                          "(created when missing)")
    first_new = None
    for folder in (out, *out.parents):
        if folder.exists():
            break
        first_new = folder
    check_writable_folder(out, f"--format {fmt} --out folder", ExportError)
    try:
        yield
    except BaseException:
        if first_new is not None:
            with contextlib.suppress(OSError):  # only folders that are still empty
                for folder in (out, *out.parents):
                    folder.rmdir()
                    if folder == first_new:
                        break
        raise


def export_request(args: argparse.Namespace):
    """The ExportRequest the command line describes."""
    from .generators import TransposedConvForm
    from .pipeline import ExportFormat, ExportRequest
    from .precision import CalibrationMethod, Int8Options, Int8Target, QuantFormat
    from .to_onnx import DEFAULT_OPSET, Exporter, OnnxExportOptions

    return ExportRequest(
        checkpoint=args.checkpoint,
        format=ExportFormat(args.format),
        out=args.out,
        onnx=OnnxExportOptions(
            imgsz=tuple(args.imgsz) if args.imgsz else None,
            opset=args.opset if args.opset is not None else DEFAULT_OPSET,
            dynamic_batch=args.dynamic_batch,
            dynamic_size=args.dynamic_size,
            argmax=bool(args.argmax),
            uint8_output=args.uint8_output,
            train_mode=args.train_mode,
            dropout=args.dropout,
            deconv=TransposedConvForm(args.deconv),
            simplify=not args.no_simplify,
            exporter=Exporter(args.exporter),
        ),
        int8=Int8Options(
            target=Int8Target(args.int8_target),
            method=CalibrationMethod(args.calib_method),
            quant_format=QuantFormat(args.quant_format),
            keep_float=tuple(args.keep_float),
        ),
        calib=args.calib,
        calib_n=args.calib_n,
        data=args.data,
        verify_n=args.verify_n,
        verify=not args.no_verify,
        use_ema=not args.no_ema,
    )


def cmd_verify(args: argparse.Namespace) -> int:
    from edgepix.runtime.core.errors import ModelFormatError
    from edgepix.runtime.description.spec import ModelSpec, Task
    from edgepix.train.checkpoint import load_source

    from .pipeline import load_samples
    from .verify import VERIFY_SEED, verify

    spec = ModelSpec.from_onnx(args.artifact)
    if spec is None:
        raise ModelFormatError(f"{args.artifact} has no edgepix spec in its metadata; export it with edgepix export")
    from .generators import reference_mode

    _, model = load_source(args.checkpoint, use_ema=not args.no_ema)
    model = reference_mode(model, train_mode=args.train_mode, dropout=args.dropout)
    samples = load_samples(args.data, args.verify_n, spec.input_size, seed=VERIFY_SEED,
                           class_names=spec.class_names if spec.task is Task.SEGMENTATION else None)
    report = verify(args.artifact, model, spec, samples, stochastic=args.train_mode and args.dropout)
    print(report.format())
    return 0 if report.passed else 1
