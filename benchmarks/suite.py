"""Regenerate the README's headline performance table from nothing on this machine.

Trains the default segmentation model on synthetic scenes, exports FP32, FP16 and INT8 at the benchmark size
(each through the parity gate), benchmarks them with ONNX Runtime next to PyTorch eager, and writes the table.
With --update-readme the table replaces the block between the `<!-- bench:begin -->` and `<!-- bench:end -->`
markers in README.md.

    python -m edgepix.benchmarks.suite --out runs/suite [--epochs 5] [--imgsz 512 512] [--update-readme]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _edgepix(*args: str, show_output: bool = True) -> None:
    cmd = [sys.executable, "-m", "edgepix", *args]
    print("$ edgepix " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=None if show_output else subprocess.DEVNULL)


def headline_table(report: dict) -> str:
    from .environment import describe

    rows = report["results"]
    torch_p50 = next((r["latency_p50_ms"] for r in rows if r["backend"].startswith("torch")), None)
    lines = [f"Measured by `python -m edgepix.benchmarks.suite` on: {describe(report['environment'])}.",
             f"GEMM ceiling {report['ceiling']['gemm_gflops']:.0f} GFLOP/s. Batch 1, "
             f"{report['environment']['threads']} threads, p50/p90/p99 over the timed calls after warm-up.", "",
             "| artifact | precision | backend | p50 ms | p90 ms | p99 ms | img/s | vs PyTorch | % GEMM ceiling "
             "| mIoU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{torch_p50 / r['latency_p50_ms']:.2f}x" if torch_p50 else "-"
        eff = f"{100 * r['efficiency']:.0f}%" if r.get("efficiency") else "-"
        miou = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "-"
        lines.append(f"| {r['model']} | {r['precision']} | {r['backend'].split(' (')[0]} | {r['latency_p50_ms']:.1f} | "
                     f"{r['latency_p90_ms']:.1f} | {r['latency_p99_ms']:.1f} | {r['throughput']:.1f} | {speedup} | "
                     f"{eff} | {miou} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/suite"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--imgsz", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--checkpoint", type=Path, help="skip training and use this checkpoint")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint
    if ckpt is None:
        _edgepix("train", "seg", "--data", "synthetic", "--model", "fastscnn", "--imgsz", str(args.train_size),
                 "--epochs", str(args.epochs), "--out", str(args.out / "train"), "--exist-ok")
        ckpt = args.out / "train" / "best.pt"
    h, w = (str(v) for v in args.imgsz)
    artifacts = []
    for fmt, suffix in (("onnx", "fp32"), ("onnx-fp16", "fp16"), ("onnx-int8", "int8")):
        path = args.out / f"fastscnn_{h}x{w}_{suffix}.onnx"
        _edgepix("-q", "export", str(ckpt), "--format", fmt, "--imgsz", h, w, "--out", str(path))
        artifacts.append(str(path))
    _edgepix("-q", "bench", *artifacts, "--torch", str(ckpt), "--imgsz", h, w, "--threads", str(args.threads),
             "--runs", str(args.runs), "--out", str(args.out / "bench"), show_output=False)
    report = json.loads((args.out / "bench" / "report.json").read_text())
    table = headline_table(report)
    (args.out / "headline.md").write_text(table)
    print(table)
    if args.update_readme:
        update_readme(Path(__file__).resolve().parents[1] / "README.md", table)
    print(f"suite finished in {time.perf_counter() - start:.0f} s; table in {args.out / 'headline.md'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
