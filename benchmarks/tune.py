"""`edgepix tune MODEL`: time every backend that can run the file on this machine and record the fastest, so that
`auto` picks it here (`edgepix.runtime.backends.profile`).

    edgepix tune model.onnx [--threads N] [--rounds 50] [--warmup 10] [--dry-run]

The backends run on the same input with the same threads, in interleaved rounds (the `bench --peers` machinery),
so load from other processes hits them alike. Where a `.tflite` of the same model lies beside the `.onnx` file
(`edgepix export CKPT --format tflite`: the same checkpoint, through the parity gate), LiteRT on it is timed too;
when it wins, `auto` loading the `.onnx` file through a Segmenter or generator runs the `.tflite` on LiteRT
(only while that very file, by its sha256, is there). A backend that computes in lower precision than the file says
(OpenVINO's bf16 default on CPUs with AVX-512-BF16 or AMX) is timed but never chosen: the parity gate checked the
file's own arithmetic.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the measuring imports numpy and the backends: loaded when a tune runs, not for --help
    from .peers import PeersReport


#: the backends that run .onnx files; GPU ones count only where they can start
ONNX_BACKENDS = ("ort-trt", "ort-cuda", "ort-cpu", "openvino", "opencv")


def tflite_sibling(model: Path) -> Path | None:
    """The `.tflite` exported beside `model` (`edgepix export CKPT --format tflite` next to `--format onnx`), if any."""
    sibling = model.with_suffix(".tflite")
    return sibling if model.suffix.lower() == ".onnx" and sibling.is_file() else None


def _layout_perm(src, dst) -> tuple[int, ...] | None:
    """The transpose from a rank-4 tensor in layout `src` to `dst` (None: the same layout)."""
    if src == dst:
        return None
    return (0, 2, 3, 1) if src.value == "NCHW" else (0, 3, 1, 2)


def litert_sibling(model: Path, sibling: Path, threads: int):
    """The `.tflite` beside `model` on LiteRT, called with `model`'s input and returning its output in `model`'s
    layouts (a peer builder for `measure`). The input's transpose (LiteRT models are NHWC) is made once per input
    array, outside the timing, as a Segmenter loading the .tflite fills its NHWC tensor directly; the output comes
    back as a transposed view, which costs nothing."""
    from edgepix.runtime.backends import load_backend
    from edgepix.runtime.core.errors import ModelFormatError
    from edgepix.runtime.description.spec import ModelSpec
    from edgepix.runtime.description.tflite import stored_spec

    mine, theirs = ModelSpec.from_onnx(model), stored_spec(sibling)
    if mine is None or theirs is None or mine.task != theirs.task or mine.class_names != theirs.class_names:
        raise ModelFormatError(f"{sibling.name} does not carry the spec of {model.name} (another model's export?)")
    loaded = load_backend(sibling, "litert", threads=threads)
    feed, out = loaded.inputs[0].name, loaded.outputs[0].name
    to_theirs = _layout_perm(mine.input_layout, theirs.input_layout)
    to_mine = _layout_perm(theirs.output_layout, mine.output_layout) if mine.task.value == "segmentation" else None
    last: list = [None, None]

    def call(x):
        if last[0] is not x:
            last[:] = [x, x.transpose(to_theirs).copy() if to_theirs else x]
        y = loaded.infer({feed: last[1]}, check=False)[out]
        return y.transpose(to_mine) if to_mine and y.ndim == 4 else y

    return f"{loaded.description} on {sibling.name}", call, loaded.close


def tune(model: Path, *, threads: int, rounds: int, warmup: int, progress=None) -> tuple[PeersReport, str]:
    """Time the backends that can run `model` here, and LiteRT on the `.tflite` beside it where there is one;
    returns the report and the fastest backend's name ("litert" for the sibling)."""
    from edgepix.runtime.backends.registry import backend_status
    from edgepix.runtime.core.errors import BackendError

    from .peers import edgepix_backend, measure

    status = backend_status()
    names = [n for n in ONNX_BACKENDS if status.get(n) is None]
    builders = [(f"edgepix {n}", lambda n=n: edgepix_backend(model, n, threads)) for n in names]
    sibling = tflite_sibling(model)
    if sibling is not None and status.get("litert") is None:
        builders.append(("edgepix litert", lambda: litert_sibling(model, sibling, threads)))
    report = measure(model, builders, threads=threads, rounds=rounds, warmup=warmup, progress=progress)
    eligible = {p.name: report.stats[p.name].p50 for p in report.peers
                if p.call is not None and p.name in report.stats and not p.reduced_precision}
    if not eligible:
        raise BackendError(f"no backend ran {model.name} here: " + "; ".join(
            f"{p.name}: {p.skipped}" for p in report.peers if p.skipped))
    fastest = min(eligible, key=eligible.get)
    return report, fastest.removeprefix("edgepix ")


PROFILE_HINT = "set EDGEPIX_PROFILE to a file you can write, or pass --dry-run"


def check_profile_writable() -> None:
    """One line when the backend profile cannot be written: disabled, a folder, in a read-only place."""
    from edgepix.runtime.backends.profile import PROFILE_ENV, profile_path
    from edgepix.runtime.core.errors import InputError, SinkError
    from edgepix.runtime.core.fileio import check_writable

    path = profile_path()
    if path is None:
        raise InputError(f"{PROFILE_ENV}=off disables the backend profile, so there is nowhere to record the choice; "
                        "unset it, or pass --dry-run")
    try:
        check_writable(path, f"the backend profile ({PROFILE_ENV})", SinkError)
    except SinkError as e:
        raise SinkError(f"{e}; {PROFILE_HINT}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="measure which backend runs a model fastest here and make `auto` pick it",
        description="Time every backend that can run MODEL on this machine (same input, same threads, interleaved "
                    "rounds) and record the fastest in the backend profile that `auto` reads (only for this file, "
                    "at these threads, on this machine as it is now: CPU, GPU and the backends' library versions; "
                    "the newest 256 entries are kept). EDGEPIX_PROFILE=PATH moves the profile, "
                    "EDGEPIX_PROFILE=off disables it.")
    p.add_argument("model", type=Path, help="an exported .onnx file")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the usable cores)")
    p.add_argument("--rounds", type=int, default=50, help="interleaved rounds of one call per backend (50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per backend first (10)")
    p.add_argument("--dry-run", action="store_true", help="measure and report, but do not record")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    import sys

    from edgepix.runtime.backends.profile import record
    from edgepix.runtime.backends.registry import candidates
    from edgepix.runtime.core.cpuinfo import usable_cores
    from edgepix.runtime.core.errors import InputError, ModelFormatError, SinkError

    from .peers import load_average

    if not args.model.is_file():
        raise ModelFormatError(f"model file not found: {args.model}")
    if args.rounds < 5 or args.warmup < 0:
        raise InputError(f"--rounds must be at least 5 and --warmup at least 0, got {args.rounds} and {args.warmup}")
    if not args.dry_run:
        check_profile_writable()  # before the minutes of measuring, not after
    threads = args.threads or usable_cores()
    before = candidates("auto", args.model, threads=threads)[0]
    say = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    report, fastest = tune(args.model, threads=threads, rounds=args.rounds, warmup=args.warmup, progress=say)
    print(f"{args.model.name}, input {'x'.join(map(str, report.input_shape))}, {threads} thread(s), "
          f"{args.rounds} rounds; {load_average()}")
    print("| backend | p50 ms | p90 ms | p99 ms | note |")
    print("|---|---|---|---|---|")
    for peer in report.peers:
        s = report.stats.get(peer.name)
        note = peer.skipped or ("lower precision than the file: not chosen" if peer.reduced_precision else "")
        cells = (f"{s.p50:.2f} | {s.p90:.2f} | {s.p99:.2f}" if s is not None else "- | - | -")
        print(f"| {peer.name.removeprefix('edgepix ')} | {cells} | {note} |")
    ratio = report.stats[f"edgepix {before}"].p50 / report.stats[f"edgepix {fastest}"].p50 \
        if f"edgepix {before}" in report.stats else float("nan")
    print(f"fastest: {fastest}; before tuning auto picked {before} ({ratio:.2f}x the fastest's p50)")
    if args.dry_run:
        return 0
    measurements = {"threads": threads, "rounds": args.rounds, "input_shape": list(report.input_shape),
                    "p50_ms": {n.removeprefix("edgepix "): round(s.p50, 3) for n, s in report.stats.items()},
                    "p99_ms": {n.removeprefix("edgepix "): round(s.p99, 3) for n, s in report.stats.items()}}
    try:
        path = record(args.model, fastest, measurements, threads=threads,
                      runs=tflite_sibling(args.model) if fastest == "litert" else None)
    except OSError as e:  # the disk filled up while measuring: the profile keeps what it held
        raise SinkError(f"cannot write the backend profile: {e.strerror or e}; {PROFILE_HINT}") from None
    runs = f" on {tflite_sibling(args.model).name}" if fastest == "litert" else ""
    print(f"recorded in {path}: auto now picks {fastest}{runs} for {args.model.name} at {threads} thread(s) on "
          "this machine")
    return 0
