"""Benchmark reports: a Markdown table on stdout, JSON and CSV files, PNG plots (matplotlib, optional)."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from edgepix.plotting import pyplot, save_figure

from .environment import describe
from .harness import BenchRow

log = logging.getLogger(__name__)

COLUMNS = ("model", "precision", "backend", "batch", "input", "load ms", "first ms", "p50 ms", "p90 ms", "p99 ms",
           "mean ms", "img/s", "GFLOP/img", "GFLOP/s", "% ceiling", "peak RSS MB", "file MB", "accuracy")


def _f(v, digits: int = 2) -> str:
    if v is None or v != v:  # None or NaN
        return "-"
    return f"{v:.{digits}f}"


def row_cells(r: BenchRow) -> list[str]:
    accuracy = f"{r.accuracy_name} {r.accuracy:.4f}" if r.accuracy is not None else "-"
    return [r.model, r.precision, r.backend, str(r.batch), "x".join(map(str, r.input_shape)), _f(r.load_ms, 0),
            _f(r.first_ms, 1), _f(r.latency.p50),
            _f(r.latency.p90), _f(r.latency.p99), _f(r.latency.mean), _f(r.throughput, 1),
            _f(r.gflops_per_image, 3), _f(r.achieved_gflops, 1),
            _f(100 * r.efficiency, 1) if r.efficiency is not None else "-", _f(r.peak_rss_mb, 0), _f(r.file_mb),
            accuracy]


def markdown(rows: Sequence[BenchRow], env: dict, *, ceiling=None, notes: Sequence[str] = ()) -> str:
    out = io.StringIO()
    out.write(f"Environment: {describe(env)}\n")
    if ceiling is not None:
        out.write(f"Ceiling: GEMM {ceiling.gemm_gflops:.1f} GFLOP/s ({ceiling.gemm_library} MatMul, {ceiling.threads} "
                  f"threads), memory copy "
                  f"{ceiling.memory_gbps:.1f} GB/s\n")
    out.write("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
    for r in rows:
        out.write("| " + " | ".join(row_cells(r)) + " |\n")
    ratios = speed_ratios(rows)
    if ratios:
        out.write("\n" + "\n".join(ratios) + "\n")
    for n in notes:
        out.write(f"\nnote: {n}")
    return out.getvalue().rstrip() + "\n"


def speed_ratios(rows: Sequence[BenchRow]) -> list[str]:
    """For each batch size: every row's p50 speed-up over the PyTorch baseline (when present), and each INT8 row's
    time against the FP32 row of the same architecture, input and backend (`int8_ratio_lines`)."""
    lines = []
    for batch in sorted({r.batch for r in rows}):
        same = [r for r in rows if r.batch == batch]
        base = next((r for r in same if r.backend.startswith("torch")), None)
        if base is not None:
            for r in same:
                if r is not base:
                    lines.append(f"batch {batch}: {r.model} on {_backend_name(r)} is "
                                 f"{base.latency.p50 / r.latency.p50:.2f}x faster than PyTorch eager at p50")
        lines += int8_ratio_lines(same)
    return lines


def _backend_name(row: BenchRow) -> str:
    return row.backend.split(" (")[0]


def int8_ratio_lines(rows: Sequence[BenchRow]) -> list[str]:
    """One line per INT8 row that has an FP32 row of the same architecture, input shape, batch and backend: the INT8
    time as a fraction of the FP32 time at p50, with this CPU's instruction sets, since whether INT8 pays depends on
    them (VNNI, AMX, ARM dot-product); where INT8 is the slower, the line says to ship the FP32 file."""
    from edgepix.runtime.core.cpuinfo import cpu_features

    lines = []
    for r in rows:
        if r.precision != "int8":
            continue
        fp32 = next((f for f in rows if f.precision == "fp32" and _backend_name(f) == _backend_name(r)
                     and f.model_name == r.model_name and f.input_shape == r.input_shape and f.batch == r.batch), None)
        if fp32 is None or not fp32.latency.p50 > 0:
            continue
        features = cpu_features()
        present = ", ".join(label for label, there in features.features() if there) or "no SIMD sets read"
        ratio = r.latency.p50 / fp32.latency.p50
        verdict = (f"INT8 is the slower here: ship {fp32.model}" if ratio > 1.0
                   else f"{1 / ratio:.2f}x the FP32 speed")
        lines.append(f"batch {r.batch}: {r.model} (int8) on {_backend_name(r)} takes {ratio:.2f}x the time of "
                     f"{fp32.model} (fp32) at p50 on this CPU ({features.model}: {present}); {verdict}")
    return lines


def report_dict(rows: Sequence[BenchRow], env: dict, *, ceiling=None, notes: Sequence[str] = ()) -> dict:
    return {"environment": env, "ceiling": ceiling.as_dict() if ceiling else None,
            "results": [r.as_dict() for r in rows], "notes": list(notes)}


def json_text(rows: Sequence[BenchRow], env: dict, *, ceiling=None, notes: Sequence[str] = ()) -> str:
    return json.dumps(report_dict(rows, env, ceiling=ceiling, notes=notes), indent=2, default=str) + "\n"


def csv_text(rows: Sequence[BenchRow]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    dicts = [r.as_dict() for r in rows]
    writer = csv.DictWriter(buffer, fieldnames=list(dicts[0]))
    writer.writeheader()
    writer.writerows(dicts)
    return buffer.getvalue()


def plot_latency_vs_batch(path: Path, rows: Sequence[BenchRow]) -> bool:
    """p50 latency per image against batch size, one line per model x backend. False without matplotlib."""
    plt = pyplot(path)
    if plt is None:
        return False
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        series.setdefault(f"{r.model} / {r.backend.split(' (')[0]}", []).append(
            (r.batch, r.latency.p50 / r.batch, r.latency.p90 / r.batch))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, points in series.items():
        points.sort()
        b = [p[0] for p in points]
        ax.plot(b, [p[1] for p in points], marker="o", label=label)
        ax.fill_between(b, [p[1] for p in points], [p[2] for p in points], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per image, ms (p50; band to p90)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return True
