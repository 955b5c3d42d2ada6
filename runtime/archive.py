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
- `SINK/.edgepix/summary.json` (and `--stats FILE`) lists every input's outcome: done, skipped (complete before
  the run), failed (with the reason), or interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob as globlib
import itertools
import json
import logging
import os
import queue
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .cluster import DEFAULT_CHUNK, ClusterOptions
from .errors import BackendError, EdgepixError, InputError, SinkError, SourceError
from .formats import VIDEO_SUFFIXES
from .render import RenderOptions

log = logging.getLogger("edgepix.archive")

STATE_FOLDER = ".edgepix"  # inside the sink: the summary and the writes journal


@dataclass(frozen=True)
class Item:
    """One input file and where its output goes."""

    path: str  # absolute path of the input
    shown: str  # the input as the listing found it (for reports)
    output: str  # the output's path relative to the sink folder
    kind: str  # "video" or "image"
    size: int  # bytes (larger videos are scheduled first)


@dataclass(frozen=True)
class Task:
    number: int
    items: tuple[Item, ...]


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What a worker (a thread here, a Ray actor elsewhere) needs: picklable, paths absolute."""

    model: str
    sink: str
    backend: str = "auto"
    threads: int | None = None  # intra-op threads per inference call; None: the backend's default
    render: RenderOptions = field(default_factory=RenderOptions)
    batch: int = 1  # frames per inference call (the same for every engine: results cannot depend on it)
    server_url: str | None = None  # --backend triton
    run_id: str = ""
    decoder_logs: bool = False  # False: FFmpeg's and OpenCV's own messages about damaged files are silenced


@dataclass(frozen=True, kw_only=True)
class ArchiveJob:
    model: str | os.PathLike
    sources: Sequence[str]
    sink: str
    backend: str = "auto"
    render: RenderOptions = field(default_factory=RenderOptions)
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
    from .sinks import VIDEO_CODECS

    if kind == "image":
        return relative.with_suffix(".png")
    return relative if relative.suffix.lower() in VIDEO_CODECS else relative.with_suffix(".mp4")


def list_inputs(uris: Sequence[str], sink: Path) -> list[Item]:
    """Every input file of `uris` with its output name; outputs that two inputs would share are an error."""
    from .sources import ImageListReader, SourceKind, parse_source

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


# ---- the worker: the same code in a thread here or in a Ray actor --------------------------------------------


def backend_options(backend: str, threads: int | None) -> dict[str, Any]:
    """Options that make a worker use exactly `threads` cores: ONNX Runtime's intra-op pool of that size and an
    inter-op pool of one (Ray's OMP_NUM_THREADS does not reach ONNX Runtime, whose default pool takes every core
    of the node); spinning off when several threads share the cores with decoding and encoding."""
    if threads is None or backend in ("tensorrt", "triton"):
        return {}
    if backend.startswith("ort-"):
        return {"threads": threads, "inter_op_threads": 1, "spin_wait": threads == 1}
    return {"threads": threads}


class ArchiveWorker:
    """Loads the model once; `run(task)` segments the task's inputs and writes their outputs atomically."""

    def __init__(self, settings: WorkerSettings) -> None:
        from .pipeline import resolve_backend
        from .segmenter import Segmenter
        from .sources import quiet_decoder_logs

        if not settings.decoder_logs:
            quiet_decoder_logs()
        self.settings = settings
        self.backend = resolve_backend(settings.model, settings.backend)
        server = {"url": settings.server_url} if settings.server_url else {}
        self.seg = Segmenter.load(settings.model, self.backend, render=settings.render, max_batch=settings.batch,
                                  **backend_options(self.backend, settings.threads), **server)
        self.sink = Path(settings.sink)
        self.host, self.pid = socket.gethostname(), os.getpid()

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}: {self.seg.backend.description}"

    def close(self) -> None:
        self.seg.close()

    def run(self, task: Task, progress: Callable[[int], None] = lambda n: None, *, attempt: int = 1,
            stop: threading.Event | None = None) -> list[dict]:
        """One outcome per input of `task`. An input that cannot be decoded is a failed outcome; a SinkError (a
        full disk) stops the run. Inputs whose output exists were committed by an earlier attempt: not redone."""
        import cv2

        outcomes = []
        self.behind = _WriteBehind()
        try:
            for item in task.items:
                outcomes.append(self._run_item(item, progress, attempt, stop, cv2.error))
            self.behind.close()  # every image written and journaled before the outcomes go back
        finally:
            self.behind.close(check=False)
        return outcomes

    def _run_item(self, item: Item, progress: Callable[[int], None], attempt: int, stop: threading.Event | None,
                  decode_error: type[Exception]) -> dict:
        if stop is not None and stop.is_set():
            return self._outcome(item, "interrupted", attempt=attempt)
        if (self.sink / item.output).exists():  # committed by an attempt whose worker died (journaled if it lived)
            frames = next((e["frames"] for e in read_journal(self.sink, self.settings.run_id)
                           if e["output"] == item.output), None)
            return self._outcome(item, "done", attempt=attempt, frames=frames,
                                 note="committed by an earlier attempt")
        if attempt > 1:  # what the attempt whose worker died left half-written (its lock died with it)
            from .fileio import remove_stale_partials

            remove_stale_partials(self.sink / item.output)
        t0 = time.perf_counter()
        try:
            frames, warning = (self._video if item.kind == "video" else self._image)(item, progress, stop,
                                                                                      attempt)
        except (SinkError, BackendError):  # the output folder or the model: every input would fail alike
            raise
        except (EdgepixError, ValueError, OSError, decode_error) as e:  # this input: the others go on
            return self._outcome(item, "failed", attempt=attempt, error=str(e).strip())
        if frames is None:
            return self._outcome(item, "interrupted", attempt=attempt)
        return self._outcome(item, "done", attempt=attempt, frames=frames,
                             seconds=round(time.perf_counter() - t0, 3), warning=warning)

    def _outcome(self, item: Item, outcome: str, **more: Any) -> dict:
        return {"input": item.shown, "output": item.output, "kind": item.kind, "outcome": outcome,
                "worker": f"{self.host}:{self.pid}", **{k: v for k, v in more.items() if v is not None}}

    def _frames_out(self, frames: list) -> list:
        results = self.seg.segment_batch(frames)
        return [self.seg.render(f, r) for f, r in zip(frames, results)]

    def _video(self, item: Item, progress: Callable[[int], None], stop: threading.Event | None, attempt: int
               ) -> tuple[int | None, str | None]:
        """Frames are decoded ahead in the source's own thread and encoded behind in the writer's, while this one
        segments and renders; the video is verified and renamed into place only when complete (a stop or an error
        leaves nothing at its path)."""
        from .sinks import VIDEO_CODECS, VideoFileWriter
        from .sources import Source, SourceKind, SourceOptions, SourceSpec

        target = self.sink / item.output
        target.parent.mkdir(parents=True, exist_ok=True)
        source = Source(SourceSpec(item.path, SourceKind.VIDEO, item.path, SourceOptions(queue_size=4)))
        writer = None
        try:
            source.start()  # SourceError: cannot open
            writer = VideoFileWriter(target, source.fps or 30.0, False, VIDEO_CODECS[target.suffix.lower()])
            batch: list = []
            for frame in itertools.chain(source, [None]):
                if frame is not None:
                    batch.append(frame.image)
                if not batch or (frame is not None and len(batch) < self.settings.batch):
                    continue
                for image in self._frames_out(batch):
                    self.behind.put(functools.partial(writer.write, image, 0.0))
                progress(len(batch))
                batch = []
                if stop is not None and stop.is_set():
                    return None, None
            if source.error:
                raise SourceError(source.error)
            self.behind.wait()
            writer.close()  # verified, then renamed over the target
            self._journal(item, writer.written, attempt)
            return writer.written, source.warning
        finally:
            source.close()
            self.behind.wait(check=False)  # the writer thread is done with `writer`
            if writer is not None and not writer.complete:
                writer.abandon()

    def _image(self, item: Item, progress: Callable[[int], None], stop: threading.Event | None, attempt: int
               ) -> tuple[int, None]:
        """Read and segment here; encode, write (atomically) and journal behind."""
        import cv2

        image = cv2.imread(item.path, cv2.IMREAD_COLOR)  # as the image sources read: 8-bit BGR, EXIF applied
        if image is None:
            raise SourceError("not an image OpenCV can decode")
        target = self.sink / item.output
        target.parent.mkdir(parents=True, exist_ok=True)
        drawn = self._frames_out([image])[0]
        self.behind.put(functools.partial(self._write_image, item, target, drawn, attempt))
        progress(1)
        return 1, None

    def _write_image(self, item: Item, target: Path, image, attempt: int) -> None:
        write_image(target, image)
        self._journal(item, 1, attempt)

    def _journal(self, item: Item, frames: int, attempt: int) -> None:
        """One line per committed output, appended with O_APPEND in one write (whole lines from concurrent
        writers on a local file system)."""
        entry = {"run": self.settings.run_id, "input": item.shown, "output": item.output, "frames": frames,
                 "attempt": attempt, "host": self.host, "pid": self.pid, "time": round(time.time(), 3)}
        fd = os.open(self.sink / STATE_FOLDER / "writes.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)


def write_image(path: Path, image) -> None:
    """An image that appears complete or not at all: encoded into a locked partial file beside `path` (whose
    suffix it keeps, for the encoder) and renamed over it. Unlike fileio.atomic_output it does not look for stale
    partial files of `path` (a scan of the whole folder per image, quadratic in a folder of thousands): a run
    removes them once, with remove_stale_partials_under."""
    import cv2

    from .fileio import PartialFile

    try:
        part = PartialFile(path)
        try:
            if not cv2.imwrite(str(part.path), image):
                raise SinkError(f"cannot write {path} (disk full or not writable?)")
            part.commit()
        finally:
            part.discard()
    except OSError as e:
        raise SinkError(f"cannot write {path}: {e.strerror or e}") from None


_PARTIAL_NAME = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.partial(\.[^.]*)?")


def remove_stale_partials_under(folder: Path) -> int:
    """Remove, in one pass over `folder` and its subfolders, the partial files that killed writers left (files
    someone is writing are locked and stay); returns how many went."""
    from .fileio import remove_stale_partials

    removed = 0
    for p in folder.rglob(".*.partial*"):
        m = _PARTIAL_NAME.fullmatch(p.name)
        if m is not None and STATE_FOLDER not in p.relative_to(folder).parts:
            removed += len(remove_stale_partials(p.with_name(m.group("name"))))
    return removed


class _WriteBehind:
    """Runs writes (encoding, files, journal lines) in a thread of its own, in order, at most a few behind, while the
    worker segments the next frames: OpenCV's encoders release the GIL. A write's error is raised in the worker at
    its next put(), wait() or close()."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = threading.Thread(target=self._loop, name="archive-writer",
                                                                daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 - raised in the worker's thread
                self.error = e
            finally:
                self.jobs.task_done()

    def _check(self) -> None:
        if self.error is not None:  # stays set: the writes after a failed one are skipped
            raise self.error

    def put(self, job: Callable[[], None]) -> None:
        self._check()
        self.jobs.put(job)

    def wait(self, *, check: bool = True) -> None:
        """Until every write handed over so far is done."""
        self.jobs.join()
        if check:
            self._check()

    def close(self, *, check: bool = True) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None
        if check:
            self._check()


def read_journal(sink: str | os.PathLike, run_id: str | None = None) -> list[dict]:
    """The writes journal of `sink` (one entry per committed output), optionally of one run only."""
    path = Path(sink) / STATE_FOLDER / "writes.jsonl"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a full disk: no output was recorded by it
            continue
    return [e for e in entries if run_id is None or e.get("run") == run_id]


# ---- progress and outcomes -----------------------------------------------------------------------------------


class RunReport:
    """Collects outcomes from the engine and keeps the progress bar (inputs, frames, frames/s) up to date.
    `add_frames` may be called from any thread; the rest from the thread that runs the engine."""

    def __init__(self, total: int, *, quiet: bool, engine: str) -> None:
        from .progress import progress_bar

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
    for t in threads:
        t.start()
    error: BaseException | None = None
    try:
        while any(t.is_alive() for t in threads) or not events.empty():
            try:
                event = events.get(timeout=0.5)
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
        stop.set()  # Ctrl-C: the workers finish their current frame and abandon their partial files
        for t in threads:
            t.join()
    if error is not None:
        raise error
    return {"local_workers": workers, "threads_per_worker": settings.threads}


# ---- the driver -------------------------------------------------------------------------------------------------


def check_archive_job(job: ArchiveJob) -> Path:
    """One-line errors for the job alone (before any listing or loading); returns the sink folder."""
    from .jobs import SegmentJob, check_job
    from .sinks import parse_sink

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
    return Path(spec.target).expanduser()


def local_plan(job: ArchiveJob, n_tasks: int) -> tuple[int, int | None]:
    """(worker threads, threads per inference call) of the local engine: `edgepix segment`'s plan for the backend
    (runtime.pipeline.choose_workers; on the CPU one worker whose calls use every core, which measured faster here
    than one single-threaded worker per core: see docs/cluster.md), at most one worker per task."""
    from .pipeline import choose_workers, resolve_backend

    plan = choose_workers(resolve_backend(job.model, job.backend), workers=job.workers, threads=job.threads)
    return max(1, min(plan.workers, n_tasks)), plan.threads


def run_archive(job: ArchiveJob) -> dict:
    """List, skip what is complete, run the rest on the job's engine; returns the summary (also written to
    SINK/.edgepix/summary.json and `job.stats`)."""
    from .fileio import atomic_write_text, check_writable, check_writable_folder

    sink = check_archive_job(job)
    t0 = time.perf_counter()
    check_writable_folder(sink / STATE_FOLDER, "--sink folder", SinkError)
    if job.stats is not None:
        check_writable(job.stats, "--stats", SinkError)
    items = list_inputs(job.sources, sink)
    remove_stale_partials_under(sink)  # once for the run: the workers' writes need not look for them
    complete = [i for i in items if (sink / i.output).exists()]
    todo = [i for i in items if not (sink / i.output).exists()]
    tasks = make_tasks(todo, job.chunk)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    settings = WorkerSettings(model=str(Path(job.model).resolve()) if Path(job.model).exists() else str(job.model),
                              sink=str(sink.resolve()), backend=job.backend, render=job.render, batch=job.batch,
                              server_url=job.triton_url, run_id=run_id, decoder_logs=job.decoder_logs)
    report = RunReport(len(todo), quiet=job.quiet, engine=job.engine)
    stop = threading.Event()
    interrupted = False
    engine_info: dict = {}
    try:
        if tasks:
            engine_info = _run_engine(job, tasks, settings, report, stop)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        report.close()
    summary = _summary(job, sink, run_id, items, complete, report, engine_info, t0, interrupted)
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write_text(sink / STATE_FOLDER / "summary.json", text)
    if job.stats is not None:
        atomic_write_text(job.stats, text)
    if interrupted:
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
    rows = []
    for item in items:
        if item.output in complete_names:
            rows.append({"input": item.shown, "output": item.output, "kind": item.kind, "outcome": "skipped"})
        else:
            rows.append(report.outcomes.get(item.output) or {"input": item.shown, "output": item.output,
                                                              "kind": item.kind, "outcome": "interrupted"})
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


# ---- the command line ------------------------------------------------------------------------------------------


def cmd_archive(args: argparse.Namespace) -> int:
    """`edgepix segment ... --archive` or `--engine ray`: the flags as an ArchiveJob, a closing line, failures."""
    for flag, value in (("--realtime", args.realtime), ("--loop", args.loop), ("--duration", args.duration),
                        ("--max-frames", args.max_frames), ("--then", getattr(args, "then", None))):
        if value:
            raise InputError(f"{flag} applies to streams; an archive run (--archive, --engine ray) reads every "
                             "input to its end")
    if len(args.sink) != 1:
        raise InputError(f"an archive run writes into one folder: give one --sink DIR/ (got {len(args.sink)})")
    if not args.source:
        raise InputError("an archive run needs --source: files, a folder or a glob such as 'archive/**/*.mp4'")
    from .cluster import cluster_options

    job = ArchiveJob(
        model=args.model, sources=args.source, sink=args.sink[0], backend=args.backend,
        render=RenderOptions(mode=args.vis, alpha=args.alpha, show=tuple(args.classes) if args.classes else None,
                             hide=tuple(args.hide), legend=args.legend),
        batch=args.max_batch or 1, chunk=args.chunk, engine=args.engine, workers=args.workers,
        threads=args.threads, cluster=cluster_options(args), stats=args.stats, triton_url=args.triton_url,
        quiet=args.quiet, decoder_logs=args.verbose)
    with _sigterm_interrupts():
        summary = run_archive(job)
    if not args.quiet:
        print(closing_line(summary), file=sys.stderr)
    for f in summary["failures"]:
        print(f"edgepix segment: error: {f['input']}: {f['reason']}", file=sys.stderr)
    return 1 if summary["failures"] else 0


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM stops an archive run as Ctrl-C does: workers abandon their partial files, the summary is written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def closing_line(summary: dict) -> str:
    fps = f"{summary['fps']:.1f} frames/s" if summary["fps"] else "no frames"
    engine = summary["engine"]
    if engine == "ray" and "actors" in summary:
        engine += f": {summary['actors']} actors x {summary['cpus_per_actor']:g} CPU"
    elif "local_workers" in summary:
        engine += f": {summary['local_workers']} workers x {summary['threads_per_worker'] or 'default'} threads"
    retried = f", {summary['task_retries']} task(s) retried after a worker died" if summary["task_retries"] else ""
    return (f"segmented {summary['done']} of {summary['inputs']} inputs ({summary['frames']} frames) in "
            f"{summary['processing_seconds']:.1f} s after loading: {fps} ({engine}); {summary['skipped']} skipped as "
            f"complete, {summary['failed']} failed{retried}; {summary['seconds']:.1f} s in all; summary: "
            f"{Path(summary['sink']) / STATE_FOLDER / 'summary.json'}")
