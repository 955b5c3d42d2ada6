"""`edgepix bench`: which backend and precision to ship, with percentiles, accuracy and efficiency."""

from __future__ import annotations

import argparse
from pathlib import Path


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,16, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one batch size")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


STREAM_FORM = ("edgepix bench stream MODEL [--source URI] [--frames N] [--backend NAME] [--threads N] [--workers N] "
               "[--sink null://|FILE] [--busy] [--temporal MODE] [--out DIR] [--format md|json|csv]")
BUSY_HELP = ("keep one core busy for the whole run (a second process spinning in pure Python, started before warm-up "
             "and stopped at the end): a reproducible loaded machine; the report says quiet or busy")


def register(subparsers) -> None:
    from .tune import register as register_tune

    register_tune(subparsers)
    p = subparsers.add_parser(
        "bench", help="latency percentiles, throughput, accuracy and efficiency per model x backend x batch; "
                      "`bench stream`: the stream pipeline against a naive loop",
        description="Benchmark exported models (and optionally PyTorch eager) side by side.",
        epilog=f"The stream form, {STREAM_FORM}, runs the stream pipeline and a naive sequential loop on the same "
               "source and reports per-stage p50/p90/p99, drops, frame age and FPS side by side (see `edgepix bench "
               "stream --help`).")
    p.add_argument("models", nargs="*", type=Path,
                   help="exported models (.onnx, .engine, .tflite); variants side by side")
    p.add_argument("--backends", default="auto",
                   help="auto (the one `auto` picks), all (every available backend), or names: ort-cpu,opencv")
    p.add_argument("--batch", type=_int_list, default=(1,), help="batch sizes, e.g. 1,4,16")
    p.add_argument("--imgsz", type=int, nargs=2, metavar=("H", "W"),
                   help="input size for dynamic-size models and the PyTorch baseline")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before measuring")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--runs", type=int, help="timed calls per row (default 50)")
    runs.add_argument("--duration", type=float, help="seconds of timed calls per row")
    p.add_argument("--threads", type=int, help="intra-op threads for CPU backends and PyTorch (default: all cores)")
    p.add_argument("--data", default="synthetic", help="accuracy data: 'synthetic' or a dataset folder")
    p.add_argument("--accuracy-n", type=int, default=20, help="images for the accuracy column (0: none)")
    p.add_argument("--torch", type=Path, metavar="CKPT",
                   help="also run this checkpoint (or Hugging Face folder) in PyTorch eager, on the models' input "
                        "size unless --imgsz says otherwise (baseline)")
    p.add_argument("--peers", action="store_true",
                   help="compare the runtimes a user would pick instead (PyTorch eager and torch.compile with "
                        "--torch, OpenVINO, OpenCV DNN, ONNX Runtime defaults) with edgepix's backends: same input, "
                        "same threads, interleaved rounds")
    p.add_argument("--busy", action="store_true", help=f"with --peers: {BUSY_HELP}")
    p.add_argument("--ceiling", action="store_true",
                   help="only measure this machine's GEMM and memory ceiling (reports always include it)")
    p.add_argument("--out", type=Path, help="folder for report.json, report.csv, report.md and plots")
    p.add_argument("--format", choices=("md", "json", "csv"), default="md", help="what goes to stdout")
    p.set_defaults(func=cmd_bench)

    # `edgepix bench stream ...`: edgepix.cli joins the two words into this verb (join_compound_verb), so
    # `edgepix bench MODEL ...` keeps its positional models. No help= keeps it out of the verb list; `bench`
    # mentions it.
    s = subparsers.add_parser(
        "bench stream", usage=STREAM_FORM.replace("edgepix bench stream", "%(prog)s"),
        description="The stream pipeline and a naive sequential loop (cv2.VideoCapture, numpy, ONNX Runtime, "
                    "cv2.VideoWriter) on the same source, side by side: per-stage p50/p90/p99 (decode, preprocess, "
                    "infer, postprocess, render, encode), drops, frame age and end-to-end FPS. synthetic:// is "
                    "rendered to a temporary video first so both read the same frames; live sources are read "
                    "once per run.")
    s.add_argument("model", type=Path, help="the exported segmentation model (.onnx)")
    s.add_argument("--source", default="synthetic://", metavar="URI",
                   help="a video file, synthetic://?size=WxH, a camera (0, /dev/video0), rtsp:// or http(s):// "
                        "(default: synthetic://, 640x480)")
    s.add_argument("--frames", type=_positive_int, default=300, metavar="N", help="frames per run (default 300)")
    s.add_argument("--backend", default="auto", metavar="NAME",
                   help="the pipeline's backend (the naive loop runs ONNX Runtime CPU)")
    s.add_argument("--threads", type=_positive_int, metavar="N",
                   help="the pipeline's intra-op threads per inference worker")
    s.add_argument("--workers", type=_positive_int, metavar="N", help="the pipeline's inference workers")
    s.add_argument("--sink", metavar="URI",
                   help="null:// (no encoding) or a video file to keep (FILE for the pipeline, FILE.naive.EXT for the "
                        "naive loop); default: a temporary .mp4, deleted")
    s.add_argument("--busy", action="store_true", help=BUSY_HELP)
    s.add_argument("--temporal", choices=("off", "ema", "flow", "hysteresis"),
                   help="run the pipeline with this temporal stabilizer (docs/temporal.md) and report its masks' "
                        "flicker; off: measure the flicker without one")
    s.add_argument("--out", type=Path, metavar="DIR",
                   help="folder for report.md, report.json, report.csv and stream_stages.png")
    s.add_argument("--format", choices=("md", "json", "csv"), default="md", help="what goes to stdout")
    s.set_defaults(func=cmd_bench_stream)


def resolve_backends(text: str, path: Path) -> list[str]:
    from edgepix.runtime.backends.registry import available_backends, candidates, get_entry

    if text == "auto":
        return [candidates("auto", path)[0]]
    if text == "all":
        return [n for n in available_backends() if path.suffix.lower() in get_entry(n).suffixes]
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        get_entry(n)  # unknown names raise with the valid list
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from edgepix.runtime.core.cpuinfo import usable_cores
    from edgepix.runtime.core.errors import EdgepixError
    from edgepix.runtime.core.fileio import atomic_write_text

    from .ceiling import measure_ceiling
    from .environment import environment
    from .harness import BenchConfig, accuracy_samples, bench_model, bench_torch, fill_generator_accuracy
    from .report import csv_text, json_text, markdown, plot_latency_vs_batch

    if args.peers:
        from .peers import cmd_peers

        return cmd_peers(args)
    if args.busy:
        raise EdgepixError("--busy applies to --peers and to bench stream: edgepix bench MODEL.onnx --peers --busy")
    threads = args.threads or usable_cores()
    if args.ceiling:
        c = measure_ceiling(threads)
        print(f"GEMM float32: {c.gemm_gflops:.1f} GFLOP/s (n={c.gemm_size}, {c.threads} threads); "
              f"memory copy: {c.memory_gbps:.1f} GB/s")
        return 0
    if not args.models and not args.torch:
        raise EdgepixError("nothing to benchmark: give exported models and/or --torch CKPT")
    if args.torch:  # before minutes of measuring the models, not after
        from edgepix.runtime.core.errors import require

        require("torch", extra="train", purpose="The PyTorch baseline (--torch)")
    for m in args.models:
        if not m.exists():
            raise EdgepixError(f"model file not found: {m}")
    config = BenchConfig(batches=args.batch, warmup=args.warmup,
                         runs=None if args.duration else (args.runs or 50), duration=args.duration,
                         threads=threads, data=args.data, accuracy_n=args.accuracy_n,
                         imgsz=tuple(args.imgsz) if args.imgsz else None)
    ceiling = measure_ceiling(threads)
    samples = accuracy_samples(config)
    runs, notes = [], []
    jobs = [(m, b) for m in args.models for b in resolve_backends(args.backends, m)]
    for i, (model, backend) in enumerate(jobs, 1):
        if not args.quiet:
            print(f"[{i}/{len(jobs)}] {model.name} on {backend}", file=sys.stderr, flush=True)
        runs.append(bench_model(model, backend, config, samples))
    if args.torch:
        torch_config = config
        if config.imgsz is None:  # the baseline runs on the input the artifacts ran on, not the checkpoint's size
            sizes = list(dict.fromkeys(tuple(row.input_shape[2:]) for run in runs for row in run.rows
                                       if len(row.input_shape) == 4))
            if sizes:
                torch_config = dataclasses.replace(config, imgsz=sizes[0])
                if len(sizes) > 1:
                    notes.append(f"PyTorch ran at {sizes[0][0]}x{sizes[0][1]}, the first model's input; the models "
                                 f"ran at {', '.join(f'{h}x{w}' for h, w in sizes)}")
        if not args.quiet:
            print(f"[torch] {args.torch.name} in PyTorch eager", file=sys.stderr, flush=True)
        runs.append(bench_torch(args.torch, torch_config, samples))
    fill_generator_accuracy(runs)
    rows = [row for run in runs for row in run.rows]
    for run in runs:
        notes.extend(run.skipped)
    for row in rows:
        if row.achieved_gflops is not None:
            row.efficiency = row.achieved_gflops / ceiling.gemm_gflops
    env = environment(threads=threads)
    texts = {"md": markdown(rows, env, ceiling=ceiling, notes=notes),
             "json": json_text(rows, env, ceiling=ceiling, notes=notes),
             "csv": csv_text(rows)}
    print(texts[args.format], end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for fmt, name in (("md", "report.md"), ("json", "report.json"), ("csv", "report.csv")):
            atomic_write_text(args.out / name, texts[fmt])
        plot_latency_vs_batch(args.out / "latency_vs_batch.png", rows)
        if not args.quiet:
            print(f"reports written to {args.out}", file=sys.stderr)
    return 0


def cmd_bench_stream(args: argparse.Namespace) -> int:
    import sys

    from edgepix.runtime.core.fileio import atomic_write_text

    from .stream import StreamBenchOptions, csv_text, json_text, markdown, plot_stages, run_stream_bench

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    options = StreamBenchOptions(frames=args.frames, backend=args.backend, workers=args.workers,
                                 threads=args.threads, sink=args.sink, busy=args.busy, temporal=args.temporal)
    report = run_stream_bench(args.model, args.source, options, progress=None if args.quiet else progress)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        if not plot_stages(args.out / "stream_stages.png", report):
            report["notes"].append("no stream_stages.png: matplotlib is not installed (pip install 'edgepix[plot]')")
    texts = {"md": markdown(report), "json": json_text(report), "csv": csv_text(report)}
    print(texts[args.format], end="")
    if args.out:
        for fmt, name in (("md", "report.md"), ("json", "report.json"), ("csv", "report.csv")):
            atomic_write_text(args.out / name, texts[fmt])
        if not args.quiet:
            print(f"reports written to {args.out}", file=sys.stderr)
    return 0
