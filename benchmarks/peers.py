"""`edgepix bench MODEL --peers`: the runtimes a user would pick instead of edgepix, on the same input and threads.

Every peer runs the same pre-processed input (one labelled synthetic scene at the model's input size) with the same
thread count, written the way a user of that runtime would write it:

- PyTorch eager and `torch.compile` (with `--torch CKPT`): the checkpoint's FP32 model; `torch.compile`'s first
  calls (the compilation) are timed apart and left out of the latencies; where it fails on this machine the row
  says why;
- OpenVINO: `Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": n})`, otherwise OpenVINO's defaults (which
  include bfloat16 arithmetic on CPUs with AVX-512-BF16 or AMX: the row states the precision it ran);
- OpenCV DNN: `cv2.dnn.readNetFromONNX(path)` (OpenCV 5's default engine) with `cv2.setNumThreads(n)`;
- ONNX Runtime with default session options: a plain `InferenceSession` (CPU provider) whose only setting is the
  thread count;
- edgepix's own backends through `load_backend`: the one `auto` picks here, and `openvino` when it is installed.

Calls are interleaved: each round calls every peer once, starting one peer later than the round before, so a noisy
neighbour on a shared machine slows every peer alike and no peer always runs right after the same one; warm-up calls
come first.

Between two calls the harness waits until the cores are settled (`settle`): until this process's own CPU use, over
a 5 ms window of sleep (`time.process_time`, all of this process's threads), is below 0.1 core, for at most 300 ms.
A fixed pause is not fair: a plain ONNX Runtime session (default options) keeps its worker threads spinning after
each run. Measured on a 2-core x86 VM (fastscnn 256x256, 2 threads; this process's CPU over a 50 ms sleep, after
an idle wait): 0.75-0.78 cores right after the run, 0.66 after 5 ms idle, 0.43-0.45 after 20 ms, 0 after 100 ms.
With the 20 ms pause used before, whichever peer ran after ONNX Runtime shared the cores with its spinning threads.
Waiting for settled cores lets every peer start on idle cores whatever its neighbour does; other processes (a
`--busy` burner, other jobs) do not count in `process_time`, so they do not hold the harness up. The report gives
the median wait and how many waits reached the cap. The table compares each peer's p50 and p99 with the
fastest one's, and says whether the backend `auto` picks is within 5% of the fastest at p50. Each row's output is
checked against ONNX Runtime's (class-map agreement for segmentation logits, else the largest difference), so a
fast peer that computes something else shows it.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepix.runtime.core.errors import EdgepixError
from edgepix.runtime.description.spec import SCORE_KINDS, ModelSpec, Task

from .stats import LatencyStats

#: how close (as a fraction of the fastest p50) auto's pick must be to count as matching the fastest peer
WITHIN = 0.05
# Settled cores between calls (module docstring): the previous runtime's worker threads (ONNX Runtime's default
# pool, OpenMP under PyTorch, OpenVINO's TBB threads) keep spinning for a while after a run, so no peer may start
# before this process's own CPU use has dropped to idle.
SETTLE_WINDOW_S = 0.005  # the window over which this process's CPU use is measured
SETTLE_IDLE_CORES = 0.1  # below this many cores busy in this process, the cores count as settled
SETTLE_CAP_S = 0.3  # the longest wait: a runtime whose threads never stop spinning must not stall the run


@dataclass
class Peer:
    """One runtime ready to run: `call(x)` returns the model's first output as a numpy array."""

    name: str
    runs: str  # what ran: library, version, precision, threads
    call: Callable[[np.ndarray], np.ndarray] | None
    load_ms: float = float("nan")
    compile_ms: float | None = None  # torch.compile: the first calls, which compile
    skipped: str | None = None  # why it did not run here
    is_auto: bool = False  # the backend `auto` picks
    # Float layers computed in lower precision than the file says (OpenVINO's bf16 default on CPUs with
    # AVX-512-BF16 or AMX): faster, but not the arithmetic the parity gate checked.
    reduced_precision: bool = False
    close: Callable[[], None] | None = None
    samples_ms: list[float] = field(default_factory=list)
    agreement: str = "-"


@dataclass
class PeersReport:
    model: Path
    input_shape: tuple[int, ...]
    threads: int
    rounds: int
    warmup: int
    peers: list[Peer]
    stats: dict[str, LatencyStats]
    notes: list[str]
    settle_ms: list[float] = field(default_factory=list)  # the wait before each timed call (`settle`)

    def settle_text(self) -> str:
        """How long the harness waited for settled cores before the timed calls."""
        if not self.settle_ms:
            return "no settle waits"
        waits = sorted(self.settle_ms)
        capped = sum(w >= SETTLE_CAP_S * 1e3 for w in waits)
        return (f"settle wait before each call median {waits[len(waits) // 2]:.0f} ms, max {waits[-1]:.0f} ms, "
                f"{capped} of {len(waits)} at the {SETTLE_CAP_S * 1e3:.0f} ms cap")


def _timed_load(peer_name: str, build: Callable[[], tuple[str, Callable, Callable | None]]) -> Peer:
    start = time.perf_counter()
    try:
        runs, call, close = build()
    except EdgepixError as e:
        return Peer(peer_name, "-", None, skipped=str(e))
    except Exception as e:  # noqa: BLE001 - a peer that cannot start here is a row that says why, not a crash
        return Peer(peer_name, "-", None, skipped=f"{type(e).__name__}: {_first_line(e)}")
    return Peer(peer_name, runs, call, load_ms=(time.perf_counter() - start) * 1e3, close=close)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:240]


# ---- the peers ---------------------------------------------------------------------------------------------


def ort_defaults(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # the one setting: the same thread count as every peer
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (f"onnxruntime {ort.__version__} InferenceSession, default options, {threads} threads",
            lambda x: session.run(None, {name: x})[0], None)


def opencv_dnn(path: Path, threads: int):
    import cv2

    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromONNX(str(path))

    def call(x: np.ndarray) -> np.ndarray:
        net.setInput(x)
        return np.asarray(net.forward())

    return f"OpenCV {cv2.__version__} dnn, readNetFromONNX defaults, {threads} threads", call, None


def openvino_defaults(path: Path, threads: int):
    from edgepix.runtime.backends.openvino import _type_name, import_openvino

    ov = import_openvino()
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": str(threads)})
    request = compiled.create_infer_request()
    output = compiled.output(0)
    precision = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))

    def call(x: np.ndarray) -> np.ndarray:
        return request.infer({0: x})[output]

    return (f"OpenVINO {ov.__version__.split('-')[0]} compile_model defaults (precision {precision}), "
            f"{threads} threads", call, None)


def edgepix_backend(path: Path, backend: str, threads: int):
    from edgepix.runtime.backends import load_backend

    loaded = load_backend(path, backend, threads=threads)
    name = loaded.outputs[0].name
    feed_name = loaded.inputs[0].name
    return loaded.description, lambda x: loaded.infer({feed_name: x}, check=False)[name], loaded.close


def torch_eager(checkpoint: Path, threads: int, imgsz: tuple[int, int]):
    from .torch_baseline import TorchBackend

    backend = TorchBackend(checkpoint, threads=threads, imgsz=imgsz)
    name = backend.inputs[0].name
    out = backend.outputs[0].name
    return f"the checkpoint in FP32, {backend.description}", lambda x: backend.infer({name: x}, check=False)[out], \
        backend.close


def torch_compiled(checkpoint: Path, threads: int):
    import torch

    from edgepix.train.checkpoint import load_source

    torch.set_num_threads(threads)
    _, model = load_source(checkpoint)
    model.eval()
    compiled = torch.compile(model)

    def call(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return compiled(torch.from_numpy(x)).numpy()

    return f"the checkpoint in FP32, torch {torch.__version__} torch.compile (inductor), {threads} threads", call, None


# ---- the run -----------------------------------------------------------------------------------------------


def _agreement(reference: np.ndarray | None, output: np.ndarray, spec: ModelSpec) -> str:
    if reference is None or output.shape != reference.shape:
        return "-" if reference is None else f"shape {tuple(output.shape)}"
    if spec.task is Task.SEGMENTATION and spec.output_kind in SCORE_KINDS and output.dtype.kind == "f":
        # segmentation scores: compare the class maps, decided as the spec says (layout, argmax or threshold)
        from edgepix.runtime.tasks.decode import OutputDecoder

        decoder = OutputDecoder(spec)
        same = np.mean([np.mean(decoder.model_map(o) == decoder.model_map(r)) for o, r in zip(output, reference)])
        return f"{100 * float(same):.2f}%"
    return f"max diff {float(np.abs(output.astype(np.float32) - reference.astype(np.float32)).max()):.2g}"


def run_peers(model: Path, *, threads: int, rounds: int, warmup: int, checkpoint: Path | None = None,
              progress: Callable[[str], None] | None = None) -> PeersReport:
    """Every peer a user could pick instead of edgepix (and edgepix's own backends), measured with `measure`."""
    spec = _model_spec(model)
    return measure(model, _peer_builders(model, spec, threads, checkpoint), threads=threads, rounds=rounds,
                   warmup=warmup, progress=progress)


def measure(model: Path, builders: list[tuple[str, Callable]], *, threads: int, rounds: int, warmup: int,
            progress: Callable[[str], None] | None = None) -> PeersReport:
    """Load each (name, build) runtime, warm each up, then time `rounds` interleaved rounds of one call each, all
    on the same input (one synthetic scene at the model's size). `edgepix tune` uses it for the backends alone."""
    say = progress or (lambda _m: None)
    spec = _model_spec(model)
    x, notes = _bench_input(spec, model)
    peers = _load_peers(builders, say)
    _warm_up(peers, x, warmup, say, spec)
    running = [p for p in peers if p.call is not None]
    say(f"[peers] {rounds} interleaved rounds over {len(running)} peers")
    settle_ms = _interleaved_rounds(running, x, rounds)
    for peer in peers:
        if peer.close is not None:
            peer.close()
    stats = {p.name: LatencyStats.from_samples(p.samples_ms) for p in running}
    return PeersReport(model=model, input_shape=tuple(x.shape), threads=threads, rounds=rounds, warmup=warmup,
                       peers=peers, stats=stats, notes=notes, settle_ms=settle_ms)


def _model_spec(model: Path) -> ModelSpec:
    spec = ModelSpec.from_onnx(model)
    if spec is None:
        raise EdgepixError(f"{model.name} carries no edgepix spec; --peers compares exported models (edgepix export)")
    return spec


def _bench_input(spec: ModelSpec, model: Path) -> tuple[np.ndarray, list[str]]:
    """(the input every peer runs: one synthetic scene pre-processed at the model's size, notes)."""
    from edgepix.runtime.data.synthetic import SceneConfig, make_scene, scene_seed

    from .harness import BENCH_SEED, model_input

    if spec.dynamic_size or spec.dynamic_batch:
        notes = [f"{model.name} has dynamic dimensions; every peer ran batch 1 at {spec.input_size[0]}x"
                 f"{spec.input_size[1]}"]
    else:
        notes = []
    frame = make_scene(scene_seed(BENCH_SEED, 0), SceneConfig(size=(480, 640)))[0]
    x = np.ascontiguousarray(model_input(spec, 1, spec.input_size, [frame]))
    return x, notes


def _peer_builders(model: Path, spec: ModelSpec, threads: int, checkpoint: Path | None) -> list[tuple[str, Callable]]:
    """(name, build) for every peer, in table order: PyTorch (with a checkpoint), the plain runtimes, edgepix."""
    from edgepix.runtime.backends.registry import candidates

    auto = candidates("auto", model)[0]
    builders: list[tuple[str, Callable]] = []
    if checkpoint is not None:
        builders.append(("PyTorch eager", lambda: torch_eager(checkpoint, threads, spec.input_size)))
        builders.append(("torch.compile", lambda: torch_compiled(checkpoint, threads)))
    builders += [
        ("ONNX Runtime defaults", lambda: ort_defaults(model, threads)),
        ("OpenCV DNN", lambda: opencv_dnn(model, threads)),
        ("OpenVINO defaults", lambda: openvino_defaults(model, threads)),
        (f"edgepix {auto} (auto)", lambda: edgepix_backend(model, auto, threads)),
    ]
    if auto != "openvino":
        builders.append(("edgepix openvino", lambda: edgepix_backend(model, "openvino", threads)))
    return builders


def _load_peers(builders: list[tuple[str, Callable]], say: Callable[[str], None]) -> list[Peer]:
    from edgepix.runtime.backends.registry import backend_status

    peers: list[Peer] = []
    for name, build in builders:
        say(f"[peers] loading {name}")
        if name == "edgepix openvino" and backend_status()["openvino"] is not None:
            peers.append(Peer(name, "-", None, skipped=backend_status()["openvino"]))
            continue
        peer = _timed_load(name, build)
        peer.is_auto = name.endswith("(auto)")
        peer.reduced_precision = "precision bf16" in peer.runs or "precision f16" in peer.runs
        peers.append(peer)
    return peers


def _warm_up(peers: list[Peer], x: np.ndarray, warmup: int, say: Callable[[str], None], spec: ModelSpec) -> None:
    """Warm-up, and torch.compile's compilation timed apart. A peer that fails here is skipped with its reason;
    each output is compared with ONNX Runtime's (`Peer.agreement`)."""
    outputs: dict[str, np.ndarray] = {}
    for peer in peers:
        if peer.call is None:
            continue
        say(f"[peers] warming up {peer.name}")
        start = time.perf_counter()
        try:
            outputs[peer.name] = np.asarray(peer.call(x))
            if peer.name == "torch.compile":
                peer.compile_ms = (time.perf_counter() - start) * 1e3
            for _ in range(warmup):
                peer.call(x)
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a working C++ compiler
            peer.skipped = f"failed on the first calls: {type(e).__name__}: {_first_line(e)}"
            peer.call = None
    # `edgepix tune` runs edgepix's backends only: ort-cpu stands in as the reference there
    reference = outputs.get("ONNX Runtime defaults", outputs.get("edgepix ort-cpu"))
    for peer in peers:
        if peer.name in outputs:
            peer.agreement = _agreement(reference, outputs[peer.name], spec)


def settle() -> float:
    """Wait until this process's own CPU use over SETTLE_WINDOW_S of sleep is below SETTLE_IDLE_CORES, at most
    SETTLE_CAP_S (module docstring); returns the milliseconds waited."""
    start = time.perf_counter()
    while True:
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(SETTLE_WINDOW_S)
        now = time.perf_counter()
        if (time.process_time() - cpu) / (now - wall) < SETTLE_IDLE_CORES or now - start >= SETTLE_CAP_S:
            return (now - start) * 1e3


def _interleaved_rounds(running: list[Peer], x: np.ndarray, rounds: int) -> list[float]:
    """One call per peer per round, into `Peer.samples_ms`, each on settled cores; returns the settle waits."""
    gc.collect()
    waits = []
    for round_index in range(rounds):
        # Each round starts with the next peer, so none always runs right after the same neighbour.
        shift = round_index % max(len(running), 1)
        for peer in running[shift:] + running[:shift]:
            waits.append(settle())
            start = time.perf_counter()
            peer.call(x)
            peer.samples_ms.append((time.perf_counter() - start) * 1e3)
    return waits


# ---- the report ----------------------------------------------------------------------------------------------


def verdict(report: PeersReport) -> list[str]:
    """Who wins by how much at p50 and p99, and whether auto's pick is within 5% of the fastest at p50."""
    stats = report.stats
    if not stats:
        return ["no peer ran"]
    lines = []
    for q in ("p50", "p99"):
        ranked = sorted(stats, key=lambda n: getattr(stats[n], q))
        best, runner_up = ranked[0], ranked[1] if len(ranked) > 1 else None
        value = getattr(stats[best], q)
        text = f"fastest at {q}: {best} ({value:.2f} ms)"
        if runner_up:
            text += f", {getattr(stats[runner_up], q) / value:.2f}x ahead of {runner_up}"
        lines.append(text)
    auto = next((p for p in report.peers if p.is_auto and p.name in stats), None)
    if auto is None:
        return lines
    exact = [p.name for p in report.peers if p.name in stats and not p.reduced_precision]
    groups = [("", list(stats))]
    if exact and min(exact, key=lambda n: stats[n].p50) != min(stats, key=lambda n: stats[n].p50):
        groups.append((" among peers that keep the file's float precision", exact))
    for label, names in groups:
        fastest = min(names, key=lambda n: stats[n].p50)
        ratio = stats[auto.name].p50 / stats[fastest].p50
        if fastest == auto.name:
            lines.append(f"auto's pick ({auto.name}) is the fastest at p50{label}")
        else:
            lines.append(f"auto's pick ({auto.name}) is {100 * (ratio - 1):.1f}% slower than {fastest} at p50"
                         f"{label}: " + ("within 5%" if ratio <= 1 + WITHIN else "NOT within 5%"))
    reduced = [p.name for p in report.peers if p.name in stats and p.reduced_precision]
    if reduced:
        lines.append(f"{', '.join(reduced)} computed float layers in reduced precision (bf16/f16), not the FP32 "
                     "the parity gate checked; compare the agreement column")
    return lines


def markdown(report: PeersReport, env_line: str, load: str) -> str:
    stats = report.stats
    best50 = min((s.p50 for s in stats.values()), default=float("nan"))
    best99 = min((s.p99 for s in stats.values()), default=float("nan"))
    out = [f"## Peers: {report.model.name}", "",
           f"Environment: {env_line}",
           f"Input {'x'.join(map(str, report.input_shape))} float32 (one synthetic scene, pre-processed), "
           f"{report.threads} threads for every peer; {report.warmup} warm-up calls each, then {report.rounds} "
           f"interleaved rounds (one call per peer per round, rotating order, each on settled cores: "
           f"{report.settle_text()}); {load}", "",
           "| peer | runs | p50 ms | p90 ms | p99 ms | p50 / fastest | p99 / fastest | agrees with ONNX Runtime | "
           "load ms | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for p in report.peers:
        if p.name not in stats:
            out.append(f"| {p.name} | skipped: {p.skipped} | - | - | - | - | - | - | - | - |")
            continue
        s = stats[p.name]
        compile_s = f"{p.compile_ms / 1e3:.1f}" if p.compile_ms is not None else "-"
        out.append(f"| {p.name} | {p.runs} | {s.p50:.2f} | {s.p90:.2f} | {s.p99:.2f} | {s.p50 / best50:.2f}x | "
                   f"{s.p99 / best99:.2f}x | {p.agreement} | {p.load_ms:.0f} | {compile_s} |")
    out += ["", *verdict(report)]
    out += [f"note: {n}" for n in report.notes]
    return "\n".join(out) + "\n"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} before"


def _peers_json(report: PeersReport, model: Path, threads: int, load_text: str, load: dict) -> dict:
    return {
        "model": str(model), "input_shape": list(report.input_shape), "threads": threads,
        "rounds": report.rounds, "warmup": report.warmup, "load": load_text, "load_mode": load,
        "settle": report.settle_text(), "verdict": verdict(report), "notes": report.notes,
        "peers": [{"name": p.name, "runs": p.runs, "skipped": p.skipped, "auto": p.is_auto,
                   "agreement": p.agreement, "load_ms": p.load_ms, "compile_ms": p.compile_ms,
                   **({f"{k}_ms" if k != "n" else "calls": v for k, v in report.stats[p.name].as_dict().items()}
                      if p.name in report.stats else {})}
                  for p in report.peers]}


def cmd_peers(args) -> int:
    """`edgepix bench MODEL [MODEL ...] --peers [--torch CKPT] [--threads N] [--runs N] [--warmup N] [--busy]
    [--out DIR]`."""
    import json
    import sys

    from edgepix.runtime.core.cpuinfo import usable_cores
    from edgepix.runtime.core.fileio import atomic_write_text

    from .environment import describe, environment
    from .load import load_mode

    if not args.models:
        raise EdgepixError("--peers needs exported .onnx models: edgepix bench MODEL.onnx --peers [--torch CKPT]")
    for m in args.models:
        if not m.exists():
            raise EdgepixError(f"model file not found: {m}")
        if m.suffix.lower() != ".onnx":
            raise EdgepixError(f"--peers compares runtimes on an .onnx file, got {m.name}")
    if args.duration:
        raise EdgepixError("--peers counts interleaved rounds: use --runs N, not --duration")
    threads = args.threads or usable_cores()
    env_line = describe(environment(threads=threads))
    texts, results = [], []
    with load_mode("busy" if args.busy else "quiet") as load:
        for model in args.models:
            before = load_average()
            report = run_peers(model, threads=threads, rounds=args.runs or 50, warmup=args.warmup,
                               checkpoint=args.torch,
                               progress=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
            after = load_average().replace(" before", " after")
            load.update()
            load_text = f"{load.describe()}; {before}, {after}"
            texts.append(markdown(report, env_line, load_text))
            results.append(_peers_json(report, model, threads, load_text, load.as_dict()))
    text = "\n".join(texts)
    json_text = json.dumps({"environment": env_line, "models": results}, indent=2, default=str) + "\n"
    print(json_text if args.format == "json" else text, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "peers.md", text)
        atomic_write_text(args.out / "peers.json", json_text)
        if not args.quiet:
            print(f"reports written to {args.out}", file=sys.stderr)
    return 0
