"""Archives: segment every file of a folder or glob into one output per input, resumable, on any engine.

    edgepix segment model.onnx --source 'dashcam/**/*.mp4' --sink out/ --archive            # this process
    edgepix segment model.onnx --source 'dashcam/**/*.mp4' --sink out/ --engine ray         # a Ray cluster

When it applies: `--archive`, or `--engine ray` (which implies it). Without either, `edgepix segment` keeps the
stream behaviour: a folder or glob is one stream whose frames are numbered across its files (`out/000000.jpg`, ...).
An archive run takes sources that are files, folders or globs, and one `--sink` that is a folder.

What it writes, the same whatever the engine (the engines differ only in who runs the tasks):
- Inputs are listed once (natural order, the stream sources' rules: a folder's own files, a glob with `**`
  recursive). Each output keeps its input's path relative to the source's root (the folder, the part of a glob
  before its first wildcard, or a single file's folder): `dashcam/day1/a.mp4` -> `out/day1/a.mp4`. Videos stay
  videos (the same container when edgepix can write it, else .mp4) at the input's frame rate; images become PNG.
  Frames are drawn as `--vis` says; `--vis mask` gives the class colours alone, i.e. the class maps.
- Tasks: one per video (largest first), and chunks of `--chunk` images.
- Every output is written to a partial file and renamed into place when complete (videos are verified first), so
  an output at its path is complete. A rerun skips inputs whose output exists; partial files of a killed run are
  removed at its start (one pass over the sink; a partial file whose writer still runs is locked and stays).
- Each committed output adds one line to `SINK/.edgepix/writes.jsonl` (run, input, output, frames, attempt, host,
  pid), so an audit can show that nothing was written twice. A task whose worker died is retried; its inputs whose
  outputs the dead attempt had already committed are not written again.
- An input that cannot be decoded is reported at the end (file and reason) and does not stop the others.
- `SINK/.edgepix/settings.json` records what decides the outputs (the model file's sha256 and the drawing
  options), and every journal line carries the key of those settings. An output counts as complete only if it
  exists and the journal says it was made with the current settings; a run whose settings differ from the folder's
  is refused in one line, unless `--overwrite`, which redoes every output made otherwise (and a later rerun
  finishes what an interrupted `--overwrite` run left).
- `SINK/.edgepix/summary.json` (and `--stats FILE`) lists every input's outcome: done, skipped (complete before
  the run), failed (with the reason), or interrupted.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..core.errors import InputError, SinkError
from ..core.fileio import remove_stale_partials_under
from ..core.formats import VIDEO_SUFFIXES
from ..core.signals import StopSignals
from ..tasks.render import RenderOptions
from .cluster import DEFAULT_CHUNK, ClusterOptions, check_reachable
from .worker import STATE_FOLDER, ArchiveWorker, Item, Task, WorkerSettings, read_journal

log = logging.getLogger("edgepix.archive")

@dataclass(frozen=True, kw_only=True)
class ArchiveJob:
    model: str | os.PathLike
    sources: Sequence[str]
    sink: str
    backend: str = "auto"
    render: RenderOptions = field(default_factory=RenderOptions)
    upsample: str | None = None  # "scores" or "classes"; None: the model's spec says
    batch: int = 1
    chunk: int = DEFAULT_CHUNK
    engine: str = "local"  # "local" or "ray"
    workers: int | None = None  # local engine: worker threads (None: one per core)
    threads: int | None = None  # local engine: threads per inference call (None: 1 for CPU backends)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    stats: str | os.PathLike | None = None
    triton_url: str | None = None
    quiet: bool = False
    decoder_logs: bool = False
    overwrite: bool = False  # redo outputs made with other settings (else a run with other settings is refused)


# ---- listing and naming ------------------------------------------------------------------------------------


def source_root(target: str) -> Path:
    """The folder outputs are named relative to: a folder itself, a glob's part before its first wildcard, or a
    single file's folder."""
    path = Path(target)
    if path.is_dir():
        return path
    if globlib.has_magic(target):
        fixed = []
        for part in path.parts:
            if globlib.has_magic(part):
                break
            fixed.append(part)
        return Path(*fixed) if fixed else Path(".")
    return path.parent


def output_name(relative: Path, kind: str) -> Path:
    """Videos keep their container when edgepix writes it, else become .mp4; images become PNG (lossless)."""
    from ..streams.sinks import VIDEO_CODECS

    if kind == "image":
        return relative.with_suffix(".png")
    return relative if relative.suffix.lower() in VIDEO_CODECS else relative.with_suffix(".mp4")


def list_inputs(uris: Sequence[str], sink: Path) -> list[Item]:
    """Every input file of `uris` with its output name; outputs that two inputs would share are an error."""
    from ..streams.sources import ImageListReader, SourceKind, parse_source

    sink_abs = sink.resolve()
    items: list[Item] = []
    owner: dict[str, str] = {}
    for uri in uris:
        spec = parse_source(uri)
        if spec.kind not in (SourceKind.VIDEO, SourceKind.IMAGES):
            raise InputError(f"--source {uri}: an archive run reads files, folders and globs, not a "
                             f"{spec.kind.value} source (live sources run without --archive / --engine ray)")
        reader = ImageListReader(spec)
        reader.open()  # lists the files (SourceError when none)
        root = source_root(spec.target).resolve()
        for shown in reader.paths:
            path = Path(shown).resolve()
            if path.is_relative_to(sink_abs):  # outputs of an earlier run under a recursive glob
                continue
            kind = "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"
            out = output_name(path.relative_to(root), kind).as_posix()
            if out in owner:
                raise InputError(f"{owner[out]} and {shown} would both be written to {sink / out}; rename one "
                                 "or segment them into different --sink folders")
            owner[out] = shown
            items.append(Item(str(path), shown, out, kind, path.stat().st_size))
    return items


def make_tasks(items: Sequence[Item], chunk: int) -> list[Task]:
    """One task per video, largest first (the long ones start early, so no worker is left with one at the end),
    then the images in chunks of `chunk`, in listing order."""
    videos = sorted((i for i in items if i.kind == "video"), key=lambda i: -i.size)
    images = [i for i in items if i.kind == "image"]
    groups = [(v,) for v in videos] + [tuple(images[s:s + chunk]) for s in range(0, len(images), chunk)]
    return [Task(n, g) for n, g in enumerate(groups)]


# ---- progress and outcomes -----------------------------------------------------------------------------------


class RunReport:
    """Collects outcomes from the engine and keeps the progress bar (inputs, frames, frames/s) up to date.
    `add_frames` may be called from any thread; the rest from the thread that runs the engine."""

    def __init__(self, total: int, *, quiet: bool, engine: str) -> None:
        from ..core.progress import progress_bar

        self.bar = progress_bar(total, desc=f"segment ({engine})", unit="input", quiet=quiet)
        self.outcomes: dict[str, dict] = {}  # output name -> outcome
        self.frames_seen = 0  # frames processed, including those of attempts that were lost
        self.workers: list[str] = []
        self.t_ready: float | None = None  # the first worker's model was loaded
        self.t_last: float | None = None  # the last outcome arrived
        self.lock = threading.Lock()
        self.retries = 0
        self.lost_workers = 0

    def worker_ready(self, description: str) -> None:
        if self.t_ready is None:
            self.t_ready = time.perf_counter()
        self.workers.append(description)

    def add_frames(self, n: int) -> None:
        with self.lock:
            self.frames_seen += n

    def task_done(self, task: Task, outcomes: list[dict]) -> None:
        for o in outcomes:
            self.outcomes[o["output"]] = o
        self.t_last = time.perf_counter()
        self.bar.update(len(outcomes))
        self.tick()

    def task_failed(self, task: Task, reason: str, attempts: int) -> None:
        """The task was given up (its workers kept dying): its inputs not yet committed fail with `reason`."""
        self.task_done(task, [{"input": i.shown, "output": i.output, "kind": i.kind, "attempts": attempts,
                               "outcome": "failed", "error": reason} for i in task.items])

    def tick(self) -> None:
        elapsed = time.perf_counter() - self.t_ready if self.t_ready else 0.0
        rate = self.frames_seen / elapsed if elapsed > 0 else 0.0
        self.bar.set_postfix_str(f"{self.frames_seen} frames, {rate:.1f} frames/s")

    def close(self) -> None:
        self.bar.close()


# ---- the local engine ------------------------------------------------------------------------------------------


class WorkersAbandoned(KeyboardInterrupt):
    """A second Ctrl-C (or SIGTERM) while the workers were finishing their frame: they are still running (inside ONNX
    Runtime or OpenCV). The summary is written all the same; a command line should then end the process with
    os._exit, since the interpreter's normal exit aborts while C++ threads run."""


def run_local(tasks: Sequence[Task], settings: WorkerSettings, *, workers: int, report: RunReport,
              stop: threading.Event) -> dict:
    """`workers` threads, each with its own model, take tasks from one queue (ONNX Runtime, OpenCV and numpy
    release the GIL, so the threads use the cores)."""
    todo: queue.Queue[Task] = queue.Queue()
    for task in tasks:
        todo.put(task)
    events: queue.Queue[tuple] = queue.Queue()

    def work() -> None:
        try:
            worker = ArchiveWorker(settings)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            events.put(("error", e))
            return
        events.put(("ready", worker.describe()))
        try:
            while not stop.is_set():
                try:
                    task = todo.get_nowait()
                except queue.Empty:
                    break
                events.put(("done", task, worker.run(task, report.add_frames, stop=stop)))
        except BaseException as e:  # noqa: BLE001
            events.put(("error", e))
        finally:
            worker.close()
            events.put(("exit",))

    threads = [threading.Thread(target=work, name=f"archive-{i}", daemon=True) for i in range(workers)]
    error: BaseException | None = None
    # Ctrl-C and SIGTERM set `stop`: the workers finish their frame and abandon their partial files
    with StopSignals(lambda signum, count: stop.set()) as signals:
        for t in threads:
            t.start()
        try:
            # Until every worker has exited: after a stop the outcomes of the tasks they finish still arrive.
            while any(t.is_alive() for t in threads) or not events.empty():
                if signals.count > 1:
                    raise WorkersAbandoned("stopped without waiting for the workers to finish their frame; the "
                                           "partial files they leave are removed by the next run")
                try:
                    event = events.get(timeout=0.1)
                except queue.Empty:
                    report.tick()
                    continue
                if event[0] == "ready":
                    report.worker_ready(event[1])
                elif event[0] == "done":
                    report.task_done(event[1], event[2])
                elif event[0] == "error" and error is None:
                    error = event[1]
                    stop.set()
        finally:
            stop.set()  # whatever ended the loop: the workers finish their frame and abandon their partial files
    for t in threads:
        t.join()  # exited already: their last event was read
    if error is not None:
        raise error
    if signals.count:
        raise KeyboardInterrupt
    return {"local_workers": workers, "threads_per_worker": settings.threads}


# ---- the driver -------------------------------------------------------------------------------------------------


def check_archive_job(job: ArchiveJob) -> Path:
    """One-line errors for the job alone (before any listing or loading); returns the sink folder."""
    from ..streams.jobs import SegmentJob, check_job
    from ..streams.sinks import parse_sink

    check_job(SegmentJob(model=job.model, backend=job.backend, triton_url=job.triton_url, workers=job.workers,
                         threads=job.threads, max_batch=job.batch))
    spec = parse_sink(job.sink)
    if spec.kind != "images" or "%" in spec.target or spec.streams is not None:
        raise InputError(f"--sink {job.sink}: an archive run writes one output per input into a folder; give "
                         "--sink DIR/")
    if job.chunk < 1:
        raise InputError(f"--chunk: expected a positive integer, got {job.chunk}")
    if job.engine not in ("local", "ray"):
        raise InputError(f"--engine: expected local or ray, got {job.engine!r}")
    if job.engine == "ray":
        check_reachable(job.cluster)  # before anything is written into the sink
    return Path(spec.target).expanduser()


def local_plan(job: ArchiveJob, n_tasks: int) -> tuple[int, int | None]:
    """(worker threads, threads per inference call) of the local engine: `edgepix segment`'s plan for the backend
    (streams.pipeline.choose_workers; on the CPU one worker whose calls use every core, which measured faster here
    than one single-threaded worker per core: see docs/cluster.md), at most one worker per task."""
    from ..streams.pipeline import choose_workers, resolve_backend

    plan = choose_workers(resolve_backend(job.model, job.backend), workers=job.workers, threads=job.threads)
    return max(1, min(plan.workers, n_tasks)), plan.threads


SETTINGS_FILE = "settings.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_settings(job: ArchiveJob) -> dict:
    """What decides an archive's outputs: the model (its bytes, not its name) and how frames are drawn. Not the
    backend, batch or engine: the outputs must not depend on them."""
    model = Path(job.model)
    render = job.render
    return {"model_sha256": file_sha256(model) if model.is_file() else None,
            "model": str(job.model) if not model.is_file() else model.name,
            "vis": render.mode.value, "alpha": float(render.alpha),
            "classes": list(render.show) if render.show is not None else None, "hide": list(render.hide),
            "legend": render.legend,
            # only when given, so that archives made before the choice existed keep their key
            **({"upsample": job.upsample} if job.upsample is not None else {})}


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_settings(sink: Path, settings: dict, *, overwrite: bool) -> str:
    """The settings' key, after refusing (InputError, one line) a folder whose outputs were made with other
    settings unless `overwrite`; records the settings in the folder."""
    from ..core.boundedjson import loads
    path = sink / STATE_FOLDER / SETTINGS_FILE
    key = settings_key(settings)
    if path.exists() and not overwrite:
        recorded = loads(path.read_bytes(), what=str(path), error=InputError,
                         hint="rerun with --overwrite to redo every output, or give another --sink")
        if isinstance(recorded, dict) and recorded.get("key") != key:
            old = recorded.get("settings", {}) if isinstance(recorded.get("settings"), dict) else {}
            changed = [f"{name} {_short(old.get(name))} -> {_short(value)}" for name, value in settings.items()
                       if old.get(name) != value]
            raise InputError(f"--sink {sink}: its outputs were made with other settings ({'; '.join(changed)}); "
                             "rerun with --overwrite to redo them, or give another --sink")
    write_state(path, json.dumps({"key": key, "settings": settings}, indent=2) + "\n")
    return key


def write_state(path: Path, text: str) -> None:
    """The archive's own records (settings, summary, --stats), complete or absent; SinkError in one line."""
    from ..core.fileio import atomic_write_text

    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise SinkError(f"cannot write {path}: {e.strerror or e}") from None


def _short(value) -> str:
    text = str(value)
    return text[:12] + "..." if isinstance(value, str) and len(text) > 16 else text


def run_archive(job: ArchiveJob) -> dict:
    """List, skip what is complete, run the rest on the job's engine; returns the summary (also written to
    SINK/.edgepix/summary.json and `job.stats`)."""
    from ..core.fileio import check_writable, check_writable_folder

    sink = check_archive_job(job)
    t0 = time.perf_counter()
    check_writable_folder(sink / STATE_FOLDER, "--sink folder", SinkError)
    if job.stats is not None:
        check_writable(job.stats, "--stats", SinkError)
    items = list_inputs(job.sources, sink)
    key = check_settings(sink, output_settings(job), overwrite=job.overwrite)
    remove_stale_partials_under(sink, skip=(STATE_FOLDER,))  # once: the workers need not look
    made_with = {e.get("output"): e.get("settings") for e in read_journal(sink)}  # the last entry of each wins
    complete = [i for i in items if (sink / i.output).exists() and made_with.get(i.output) == key]
    done_before = {i.output for i in complete}
    todo = [i for i in items if i.output not in done_before]
    tasks = make_tasks(todo, job.chunk)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    settings = WorkerSettings(model=str(Path(job.model).resolve()) if Path(job.model).exists() else str(job.model),
                              sink=str(sink.resolve()), backend=job.backend, render=job.render, batch=job.batch,
                              upsample=job.upsample,
                              server_url=job.triton_url, run_id=run_id, decoder_logs=job.decoder_logs,
                              settings_key=key)
    report = RunReport(len(todo), quiet=job.quiet, engine=job.engine)
    stop = threading.Event()
    interrupted: KeyboardInterrupt | None = None
    engine_info: dict = {}
    try:
        if tasks:
            engine_info = _run_engine(job, tasks, settings, report, stop)
    except KeyboardInterrupt as e:  # WorkersAbandoned too: the summary is written either way
        interrupted = e
    except BaseException:
        report.close()
        raise
    # A Ctrl-C or SIGTERM that comes now (a second one, just after the workers finished) must not cut the summary
    # short: it is counted, and the run ends as interrupted once the summary is written.
    with StopSignals(lambda signum, count: stop.set()) as late:
        report.close()
        summary = _summary(job, sink, run_id, items, complete, report, engine_info, t0,
                           interrupted is not None or late.count > 0)
        text = json.dumps(summary, indent=2) + "\n"
        write_state(sink / STATE_FOLDER / "summary.json", text)
        if job.stats is not None:
            write_state(Path(job.stats), text)
    if interrupted is not None:
        raise interrupted
    if late.count:
        raise KeyboardInterrupt
    return summary


def _run_engine(job: ArchiveJob, tasks: list[Task], settings: WorkerSettings, report: RunReport,
                stop: threading.Event) -> dict:
    if job.engine == "ray":
        from .cluster import run_archive_on_ray

        return run_archive_on_ray(tasks, settings, job.cluster, report)
    workers, threads = local_plan(job, len(tasks))
    return run_local(tasks, replace(settings, threads=threads), workers=workers, report=report, stop=stop)


def _summary(job: ArchiveJob, sink: Path, run_id: str, items: list[Item], complete: list[Item], report: RunReport,
             engine_info: dict, t0: float, interrupted: bool) -> dict:
    complete_names = {i.output for i in complete}
    # The writes journal is the truth about what this run committed: after an interrupt, outputs renamed into
    # place by a task whose outcomes never reached the driver (it stopped listening, or a worker was abandoned)
    # are done, not interrupted.
    committed = {e.get("output"): e for e in read_journal(sink, run_id)}
    rows = []
    for item in items:
        if item.output in complete_names:
            rows.append({"input": item.shown, "output": item.output, "kind": item.kind, "outcome": "skipped"})
            continue
        row = report.outcomes.get(item.output)
        entry = committed.get(item.output)
        if (row is None or row["outcome"] == "interrupted") and entry is not None and (sink / item.output).exists():
            row = {"input": item.shown, "output": item.output, "kind": item.kind, "outcome": "done",
                   "frames": entry.get("frames", 0), "attempt": entry.get("attempt", 1),
                   "note": "committed; its report did not reach the driver before the interrupt"}
        rows.append(row or {"input": item.shown, "output": item.output, "kind": item.kind, "outcome": "interrupted"})
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("done", "skipped", "failed", "interrupted")}
    frames = sum(r.get("frames", 0) for r in rows if r["outcome"] == "done")
    processing = report.t_last - report.t_ready if report.t_ready and report.t_last else 0.0
    return {
        "run": run_id, "engine": job.engine, "model": str(job.model), "sources": list(job.sources),
        "sink": str(sink), "inputs": len(items), **counts, "interrupted_run": interrupted, "frames": frames,
        "seconds": round(time.perf_counter() - t0, 3), "processing_seconds": round(processing, 3),
        "fps": round(frames / processing, 2) if processing > 0 else None,
        "frames_processed": report.frames_seen, "workers": report.workers, "task_retries": report.retries,
        "workers_lost": report.lost_workers, **engine_info,
        "failures": [{"input": r["input"], "reason": r.get("error", "")} for r in rows if r["outcome"] == "failed"],
        "items": rows,
    }
