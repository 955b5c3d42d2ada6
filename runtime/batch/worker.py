"""The archive worker: one task's inputs decoded, segmented and written, the same code in a thread of this
process (batch.archive's local engine) or in a Ray actor (batch.cluster). Every output is written to a partial
file and renamed into place when complete; each commit adds a line to the sink's writes journal."""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import BackendError, EdgepixError, SinkError, SourceError
from ..core.fileio import write_image
from ..tasks.render import RenderOptions

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
    upsample: str | None = None  # "scores" or "classes"; None: the model's spec says
    batch: int = 1  # frames per inference call (the same for every engine: results cannot depend on it)
    server_url: str | None = None  # --backend triton
    run_id: str = ""
    settings_key: str = ""  # what the outputs are made with (batch.archive.output_settings): every journal line has it
    decoder_logs: bool = False  # False: FFmpeg's and OpenCV's own messages about damaged files are silenced


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
        from ..streams.pipeline import resolve_backend
        from ..streams.sources import quiet_decoder_logs
        from ..tasks.segmenter import Segmenter

        if not settings.decoder_logs:
            quiet_decoder_logs()
        self.settings = settings
        self.backend = resolve_backend(settings.model, settings.backend)
        server = {"url": settings.server_url} if settings.server_url else {}
        upsample = {"upsample": settings.upsample} if settings.upsample is not None else {}
        self.seg = Segmenter.load(settings.model, self.backend, render=settings.render, max_batch=settings.batch,
                                  **upsample, **backend_options(self.backend, settings.threads), **server)
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
        if attempt > 1:
            # Committed and journaled by this run's attempt whose worker died: not redone. An output that exists
            # without this run's journal line is older (other settings) or lost its line: made again.
            entry = next((e for e in read_journal(self.sink, self.settings.run_id) if e["output"] == item.output),
                         None)
            if entry is not None and (self.sink / item.output).exists():
                return self._outcome(item, "done", attempt=attempt, frames=entry["frames"],
                                     note="committed by an earlier attempt")
            from ..core.fileio import remove_stale_partials

            remove_stale_partials(self.sink / item.output)  # what the dead attempt left half-written
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
        from ..streams.sinks import VIDEO_CODECS, VideoFileWriter
        from ..streams.sources import Source, SourceKind, SourceOptions, SourceSpec

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
                 "attempt": attempt, "settings": self.settings.settings_key, "host": self.host, "pid": self.pid,
                 "time": round(time.time(), 3)}
        journal = self.sink / STATE_FOLDER / "writes.jsonl"
        try:
            fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                line = (json.dumps(entry) + "\n").encode()
                if os.write(fd, line) != len(line):  # a cut line is skipped by read_journal: the output is redone
                    raise OSError(errno.ENOSPC, "No space left on device")
                os.fsync(fd)  # the output is durable already (write_image); its journal line must be too
            finally:
                os.close(fd)
        except OSError as e:
            raise SinkError(f"cannot write {journal}: {e.strerror or e}") from None


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
