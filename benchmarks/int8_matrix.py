"""INT8 choices side by side: integer types, QDQ vs QOperator, calibration method, layers kept in float, and the
variants that can help on CPUs without VNNI (reduce_range, S8S8 activations, per-tensor weights).

For one checkpoint this exports FP32 and a set of INT8 variants at one input size, measures each one's mIoU on
labelled synthetic scenes (against PyTorch FP32, as the parity gate does) and its ONNX Runtime CPU latency at batch 1.
Latencies are taken round-robin (one call of each variant per round) so that a noisy neighbour slows every variant
alike, and ratios are computed within this one run. The report starts with the CPU's instruction sets (VNNI, AMX,
dot-product decide whether INT8 pays off) and ends with the variant that wins here.

    python -m edgepix.benchmarks.int8_matrix runs/seg/best.pt --imgsz 512 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Variant:
    label: str
    path: Path
    size_mb: float = float("nan")
    miou: float = float("nan")
    drop: float = float("nan")
    latencies_ms: list | None = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--imgsz", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=60, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--verify-n", type=int, default=20, help="labelled scenes for mIoU")
    parser.add_argument("--calib-n", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="only FP32, U8S8 and S8S8 QDQ minmax")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from edgepix.export.pipeline import load_samples
    from edgepix.export.verify import VERIFY_SEED, preprocess
    from edgepix.train.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt)
    size = tuple(args.imgsz)
    with tempfile.TemporaryDirectory(prefix="edgepix-int8-matrix-") as tmp:
        samples = load_samples("synthetic", args.verify_n, size, seed=VERIFY_SEED)
        variants, spec = build_variants(model, ckpt["spec"], Path(tmp), size, int8_variants(args.quick), args.calib_n)
        measure_accuracy(variants, model, samples)
        time_round_robin(variants, {spec.input_name: preprocess(samples[0].image, spec)}, threads=args.threads,
                         warmup=args.warmup, rounds=args.rounds)
    report(variants, args, size)
    return 0


def int8_variants(quick: bool) -> list[tuple[str, Any]]:
    """(label, Int8Options) of each INT8 variant: the two defaults, and with `quick` off the alternatives."""
    from edgepix.export.precision import CalibrationMethod, Int8Options, Int8Target, QuantFormat

    variants = [
        ("int8 U8S8 QDQ minmax (cpu default)", Int8Options()),
        ("int8 S8S8 QDQ minmax (tensorrt)", Int8Options(target=Int8Target.TENSORRT)),
    ]
    if not quick:
        variants += [
            ("int8 U8S8 QOperator minmax", Int8Options(quant_format=QuantFormat.QOPERATOR)),
            ("int8 U8S8 QDQ entropy", Int8Options(method=CalibrationMethod.ENTROPY)),
            ("int8 U8S8 QDQ percentile", Int8Options(method=CalibrationMethod.PERCENTILE)),
            ("int8 U8S8 QDQ minmax, first+last float", Int8Options(keep_float=("first", "last"))),
            # Without VNNI, ONNX Runtime's U8S8 kernels sum pairs of products in saturating 16-bit lanes: 7-bit
            # weights (reduce_range), signed activations (S8S8, another kernel) or one scale per tensor (simpler
            # requantization) are the usual remedies; which one wins depends on the CPU.
            ("int8 U8S8 QDQ minmax, reduce_range", Int8Options(reduce_range=True)),
            ("int8 S8S8 QDQ minmax (cpu)", Int8Options(activation_signed=True)),
            ("int8 U8S8 QDQ minmax, per-tensor", Int8Options(per_channel=False)),
            ("int8 U8S8 QDQ minmax, per-tensor, reduce_range", Int8Options(per_channel=False, reduce_range=True)),
        ]
    return variants


def build_variants(model, ckpt_spec, folder: Path, size: tuple[int, int], int8: list[tuple[str, Any]],
                   calib_n: int) -> tuple[list[Variant], Any]:
    """Export FP32 into `folder` and quantize each INT8 variant from it; returns the variants (FP32 first) and the
    FP32 export's spec."""
    from edgepix.export.pipeline import CALIB_SEED, load_samples
    from edgepix.export.precision import quantize_int8
    from edgepix.export.to_onnx import OnnxExportOptions, export_onnx
    from edgepix.export.verify import preprocess

    fp32 = folder / "fp32.onnx"
    spec = export_onnx(model, ckpt_spec, fp32, OnnxExportOptions(imgsz=size))
    calib = [preprocess(s.image, spec) for s in load_samples("synthetic", calib_n, size, seed=CALIB_SEED)]
    variants = [Variant("fp32", fp32)]
    for i, (label, options) in enumerate(int8):
        start = time.perf_counter()
        path = folder / f"int8_{i}.onnx"
        quantize_int8(fp32, path, spec, calib, options)
        print(f"built {label} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        variants.append(Variant(label, path))
    return variants, spec


def measure_accuracy(variants: list[Variant], model, samples) -> None:
    """Each variant's file size and mIoU on `samples`, and its drop from PyTorch FP32, as the parity gate measures."""
    from edgepix.export.verify import verify_segmentation
    from edgepix.runtime.description.spec import ModelSpec

    for v in variants:
        v.size_mb = v.path.stat().st_size / 1e6
        report = verify_segmentation(v.path, model, ModelSpec.from_onnx(v.path), samples, n_random=0)
        v.miou = report.info["mIoU artifact"]
        v.drop = report.info["mIoU PyTorch FP32"] - v.miou


def time_round_robin(variants: list[Variant], feed: dict, *, threads: int, warmup: int, rounds: int) -> None:
    """ONNX Runtime CPU latency of each variant: `warmup` calls each, then `rounds` rounds of one call per variant,
    so that a noisy neighbour slows every variant alike."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = [ort.InferenceSession(str(v.path), options, providers=["CPUExecutionProvider"]) for v in variants]
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    for v in variants:
        v.latencies_ms = []
    for _ in range(rounds):
        for v, s in zip(variants, sessions):
            start = time.perf_counter()
            s.run(None, feed)
            v.latencies_ms.append((time.perf_counter() - start) * 1e3)


def report(variants: list[Variant], args: argparse.Namespace, size: tuple[int, int]) -> None:
    """The CPU, a Markdown table of the variants, the fastest one and the fastest accurate INT8 one; `--json`."""
    import onnxruntime as ort

    from edgepix.benchmarks.stats import LatencyStats
    from edgepix.runtime.core.cpuinfo import cpu_features

    cpu = cpu_features()
    stats = [LatencyStats.from_samples(v.latencies_ms) for v in variants]
    base = stats[0].p50
    print(f"\nCPU: {cpu.model}: {cpu.describe()}; {cpu.int8_advice()}")
    print(f"ONNX Runtime {ort.__version__} CPU, batch 1, {args.threads} threads, input {size[0]}x{size[1]}, "
          f"{args.rounds} round-robin calls per variant after {args.warmup} warm-up; mIoU on {args.verify_n} "
          f"synthetic scenes (PyTorch FP32 mIoU {variants[0].miou + variants[0].drop:.4f})\n")
    print("| variant | size MB | p50 ms | p90 ms | p99 ms | speed-up vs fp32 (p50) | mIoU | drop (points) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for v, s in zip(variants, stats):
        rows.append({"variant": v.label, "p50_ms": s.p50, "p90_ms": s.p90, "p99_ms": s.p99, "speedup": base / s.p50,
                     "miou": v.miou, "drop_points": 100 * v.drop})
        print(f"| {v.label} | {v.size_mb:.2f} | {s.p50:.2f} | {s.p90:.2f} | {s.p99:.2f} | {base / s.p50:.2f}x | "
              f"{v.miou:.4f} | {100 * v.drop:+.2f} |")
    fastest = min(range(len(variants)), key=lambda i: stats[i].p50)
    # The winner among INT8 variants that keep mIoU within the parity gate's INT8 threshold (1 point).
    accurate = [i for i in range(1, len(variants)) if 100 * variants[i].drop <= 1.0]
    print(f"\nfastest here: {variants[fastest].label} (p50 {stats[fastest].p50:.2f} ms, "
          f"{base / stats[fastest].p50:.2f}x fp32)")
    # On a shared machine two variants that run the same kernels differ by noise: say how large it is.
    spread = sorted(s.p90 / s.p50 - 1 for s in stats)[len(stats) // 2]
    print(f"median p90/p50 spread in this run: {100 * spread:.0f}%; p50 differences smaller than that are noise")
    if accurate:
        best = min(accurate, key=lambda i: stats[i].p50)
        print(f"fastest INT8 within 1 mIoU point: {variants[best].label} (p50 {stats[best].p50:.2f} ms, "
              f"{base / stats[best].p50:.2f}x fp32, mIoU drop {100 * variants[best].drop:+.2f} points)")
    else:
        print("no INT8 variant kept mIoU within 1 point of PyTorch FP32 here")
    if args.json:
        from edgepix.runtime.core.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({"cpu": cpu.model, "cpu_features": dict(cpu.features()),
                                                 "fast_int8": cpu.fast_int8, "rows": rows,
                                                 "fastest": variants[fastest].label}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
