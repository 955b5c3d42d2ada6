"""`--engine ray`: archives and generated datasets on a Ray cluster (one machine or many).

    edgepix segment model.onnx --source 'dashcam/**/*.mp4' --sink out/ --engine ray --actors 8 --cpus-per-actor 2
    edgepix generate dcgan.onnx --num 50000 --out images/ --engine ray --address auto

N actors each load the model once and take tasks from the driver one at a time: a video or a chunk of images
(`runtime.batch.archive`, which also holds the code every task runs), or a range of image indices (generation). An actor
uses exactly the CPUs Ray reserves for it: ONNX Runtime's intra-op pool gets `--cpus-per-actor` threads and its
inter-op pool one (Ray's OMP_NUM_THREADS does not reach ONNX Runtime, whose default pool would take every core of
the node), and OpenCV's pool the same number. An actor that dies (killed, out of memory, its node lost) is
replaced and its task given to the next free actor; a task whose actor died three times is reported as failed.
Frames are counted by a small counter actor that the driver reads twice a second for the progress bar.

Where the cluster is: no `--address` starts a private one-node cluster for the run (or joins `RAY_ADDRESS` when
that is set); `--address auto` joins the cluster `ray start` runs on this machine; `--address HOST:PORT` joins a
head node's GCS. Models, inputs and the output folder must be at the same paths on every node (a shared file
system). `ray` is imported only here, only when an engine runs: without it, one line says
`pip install 'edgepix[scale]'`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import EdgepixError, InputError, require

log = logging.getLogger("edgepix.cluster")

MAX_ATTEMPTS = 3  # a task whose actor died this many times is given up (a file that crashes the decoder)
DEFAULT_CHUNK = 16  # archives: images per task, small enough to balance, large enough to outweigh a task's overhead
POLL_S = 0.5  # the driver's progress interval
CONNECT_TIMEOUT_S = 5.0  # a head node on a network answers a TCP connect in milliseconds; 5 s is a lost packet or two


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a private local cluster; "auto"; or HOST:PORT
    actors: int | None = None  # None: as many as the cluster's CPUs (or GPUs) hold, at most one per task
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise InputError(f"--actors: expected a positive integer, got {self.actors}")
        if not (math.isfinite(self.cpus_per_actor) and self.cpus_per_actor > 0):
            raise InputError(f"--cpus-per-actor: expected a positive number, got {self.cpus_per_actor}")
        if not (math.isfinite(self.gpus_per_actor) and self.gpus_per_actor >= 0):
            raise InputError(f"--gpus-per-actor: expected 0 or a positive number, got {self.gpus_per_actor}")

    @property
    def threads(self) -> int:
        """Threads per inference call: the whole CPUs reserved for the actor (at least one)."""
        return max(1, int(self.cpus_per_actor))


def import_ray():
    return require("ray", extra="scale", purpose="--engine ray")


@contextlib.contextmanager
def connected(ray, options: ClusterOptions) -> Iterator[str]:
    """Join (or start) the cluster for the run; leave it afterwards. A process that already called ray.init()
    (a notebook, a test) keeps its connection. Yields a description of the cluster."""
    if ray.is_initialized():
        yield "the cluster this process joined"
        return
    address = check_reachable(options)
    kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
    if address == "local":
        from ..core.cpuinfo import usable_cores

        # A private cluster: no dashboard, the CPUs this process may use. Recent Ray turns its token
        # authentication on for it and logs a warning saying so; the setting stays, the notice goes.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        kwargs.update(include_dashboard=False, num_cpus=usable_cores())
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise EdgepixError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]} (start one with "
                           "`ray start --head`, or leave out --address for a one-node cluster)") from None
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)  # Ray's core put its crash reporter in place of this process's own
    try:
        yield f"Ray {ray.__version__} at {address}"
    finally:
        ray.shutdown()


def check_reachable(options: ClusterOptions) -> str:
    """The cluster's address (--address, else RAY_ADDRESS, else "local": a private cluster), after checking that
    something answers there (see probe_address)."""
    address = options.address or os.environ.get("RAY_ADDRESS") or "local"
    if address not in ("local", "auto"):
        probe_address(address)
    return address


def probe_address(address: str, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, in one line, when nothing answers at a cluster's HOST:PORT (or ray://HOST:PORT). ray.init
    has no connect timeout among its options: given an address where no head node runs, it retries for minutes.
    A TCP connect with a timeout tells a wrong address, a stopped head or a firewall apart from a slow start."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--address {address}: expected auto or HOST:PORT (the head node's port, 6379 unless "
                         "`ray start --head --port` chose another)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise EdgepixError(f"cannot reach the Ray cluster at {address}: {reason} (waited at most {timeout:g} s); "
                           "check that `ray start --head` runs there and the address, or leave out --address for a "
                           "one-node cluster") from None


def actor_count(ray, options: ClusterOptions, tasks: int) -> int:
    """How many actors to start: --actors, else as many as the cluster's resources hold; at most one per task.
    Resources that cannot hold a single actor are an error now (Ray would otherwise wait for them forever)."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if options.cpus_per_actor > cpus:
        raise EdgepixError(f"--cpus-per-actor {options.cpus_per_actor:g}: the cluster has {cpus:g} CPUs")
    if options.gpus_per_actor > gpus:
        raise EdgepixError(f"--gpus-per-actor {options.gpus_per_actor:g}: the cluster has {gpus:g} GPUs")
    fit = int(cpus // options.cpus_per_actor)
    if options.gpus_per_actor > 0:
        fit = min(fit, int(gpus // options.gpus_per_actor))
    if options.actors is not None and options.actors > fit:
        log.warning("%d actors asked for, the cluster's resources hold %d at a time: the others wait for "
                    "resources (nodes that join later)", options.actors, fit)
    return max(1, min(tasks, options.actors or fit))


# ---- actors --------------------------------------------------------------------------------------------------


class FrameCounter:
    """Frames done across the cluster since the driver last asked (a Ray actor needing no CPU)."""

    def __init__(self) -> None:
        self.frames = 0

    def add(self, n: int) -> None:
        self.frames += n

    def take(self) -> int:
        n, self.frames = self.frames, 0
        return n


class _Reporter:
    """Counts frames in the actor and sends them to the counter at most twice a second (fire and forget)."""

    def __init__(self, counter) -> None:
        self.counter, self.pending, self.last = counter, 0, time.monotonic()

    def add(self, n: int) -> None:
        self.pending += n
        if time.monotonic() - self.last >= POLL_S:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.counter.add.remote(self.pending)
        self.pending, self.last = 0, time.monotonic()


def _limit_threads(threads: int) -> None:
    """OpenCV's own pool (resize, colour conversion, encoding) gets the actor's CPUs too, not the node's."""
    import cv2

    cv2.setNumThreads(threads)


class SegmentActor:
    """Runs archive tasks (runtime.batch.archive.ArchiveWorker) in a Ray actor."""

    def __init__(self, settings, counter) -> None:
        self.settings, self.counter, self.worker = settings, counter, None

    def load(self) -> str:
        from .worker import ArchiveWorker

        _limit_threads(self.settings.threads or 1)
        self.worker = ArchiveWorker(self.settings)
        return self.worker.describe()

    def run(self, task, attempt: int) -> list[dict]:
        reporter = _Reporter(self.counter)
        try:
            return self.worker.run(task, reporter.add, attempt=attempt)
        finally:
            reporter.flush()


class GenerateActor:
    """Writes the images of index ranges of a noise generator (the same files as `edgepix generate`)."""

    def __init__(self, model: str, backend: str, threads: int, out: str, seed: int, batch: int, counter) -> None:
        self.model, self.backend, self.threads = model, backend, threads
        self.out, self.seed, self.batch, self.counter = Path(out), seed, batch, counter
        self.gen = None

    def load(self) -> dict:
        import socket

        from ..streams.pipeline import resolve_backend
        from ..tasks.generator import NoiseGenerator
        from .worker import backend_options

        _limit_threads(self.threads)
        name = resolve_backend(self.model, self.backend)
        self.gen = NoiseGenerator.load(self.model, name, **backend_options(name, self.threads))
        self.gen.generate_from(self.gen.latents(self.gen.static_batch or self.batch, seed=self.seed))  # warm-up
        return {"worker": f"{socket.gethostname()} pid {os.getpid()}: {self.gen.backend.description}",
                "step": self.gen.static_batch or self.batch, "backend": name}

    def run(self, span: tuple[int, int], attempt: int) -> dict:
        """Images span[0] .. span[1]-1 in batches of `step` from span[0] (spans are multiples of it, so every
        batch is the one the local run makes), each written atomically."""
        from ..core.fileio import remove_stale_partials_under, write_image

        if attempt > 1:  # the partial files of the attempt whose actor died (files being written are locked)
            remove_stale_partials_under(self.out)
        reporter = _Reporter(self.counter)
        step = self.gen.static_batch or self.batch
        batch_ms = []
        for s in range(span[0], span[1], step):
            k = min(step, span[1] - s)
            t0 = time.perf_counter()
            images = self.gen.generate_from(self.gen.latents(k, seed=self.seed, start=s))
            batch_ms.append((time.perf_counter() - t0) * 1e3)
            for j, image in enumerate(images):
                write_image(self.out / f"{s + j:05d}.png", image)
            reporter.add(k)
        reporter.flush()
        return {"images": span[1] - span[0], "batch_ms": batch_ms}


# ---- the pool ------------------------------------------------------------------------------------------------


class ActorPool:
    """`count` actors of one class. Each free, loaded actor gets one task at a time; an actor that dies is
    replaced (a new process, wherever the cluster has room) and its task goes back to the front of the queue
    with its attempt count raised, so a task runs to completion at most once per attempt and is given up after
    MAX_ATTEMPTS. An exception raised by the task's own code (a full disk, a model that does not load) stops
    the run with that error."""

    def __init__(self, ray, actor_class: type, options: ClusterOptions, args: tuple, count: int) -> None:
        self.ray = ray
        self.remote_class = ray.remote(actor_class).options(
            num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor, max_restarts=0, max_task_retries=0)
        self.args = args
        self.actors: list = [None] * count
        self.ready = [False] * count
        self.busy = [False] * count
        self.running: dict = {}  # ObjectRef -> (actor slot, task or None for a load, attempt)
        self.pending: deque = deque()  # (task, attempt) not yet given to an actor
        self.lost = self.retries = self.load_failures = 0
        self.loaded: list = []  # what each actor's load() returned
        for slot in range(count):
            self._start(slot)

    def _start(self, slot: int) -> None:
        actor = self.actors[slot] = self.remote_class.remote(*self.args)
        self.ready[slot], self.busy[slot] = False, False
        self.running[actor.load.remote()] = (slot, None, 0)

    def _replace(self, slot: int, error: Exception) -> None:
        self.lost += 1
        log.warning("a Ray actor died (%s); starting another", str(error).splitlines()[0][:200])
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[slot])
        self._start(slot)

    def wait_loaded(self) -> Any:
        """Block until one actor has loaded the model; returns what its load() returned."""
        while not self.loaded:
            self._collect(on_result=None, on_given_up=None)
        return self.loaded[0]

    def run(self, tasks: Sequence[Any], *, on_result: Callable[[Any, Any], None],
            on_given_up: Callable[[Any, str, int], None], tick: Callable[[], None] = lambda: None) -> None:
        self.pending = deque((t, 1) for t in tasks)
        while self.pending or any(task is not None for _, task, _ in self.running.values()):
            for slot, actor in enumerate(self.actors):
                if self.pending and self.ready[slot] and not self.busy[slot]:
                    task, attempt = self.pending.popleft()
                    self.running[actor.run.remote(task, attempt)] = (slot, task, attempt)
                    self.busy[slot] = True
            self._collect(on_result=on_result, on_given_up=on_given_up)
            tick()

    def _collect(self, *, on_result, on_given_up) -> None:
        done, _ = self.ray.wait(list(self.running), num_returns=1, timeout=POLL_S)
        for ref in done:
            slot, task, attempt = self.running.pop(ref)
            try:
                value = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                self._lost_task(slot, task, attempt, e, on_given_up)
                continue
            except self.ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, EdgepixError):
                    raise cause from None
                raise
            if task is None:
                self.ready[slot] = True
                self.loaded.append(value)
            else:
                self.busy[slot] = False
                on_result(task, value)

    def _lost_task(self, slot: int, task, attempt: int, error: Exception, on_given_up) -> None:
        if task is None:  # died while loading the model
            self.load_failures += 1
            if self.load_failures >= MAX_ATTEMPTS * len(self.actors) and not self.loaded:
                raise EdgepixError(f"Ray actors keep dying while loading the model: {str(error).splitlines()[0]}")
        self._replace(slot, error)
        if task is None:
            return
        if attempt >= MAX_ATTEMPTS:
            on_given_up(task, f"its worker died {attempt} times while processing it", attempt)
        else:
            self.retries += 1
            self.pending.appendleft((task, attempt + 1))

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)


# ---- engines -------------------------------------------------------------------------------------------------


def run_archive_on_ray(tasks, settings, options: ClusterOptions, report) -> dict:
    """The archive engine on Ray: `report` (runtime.batch.archive.RunReport) gets outcomes and frame counts."""
    from dataclasses import replace

    ray = import_ray()
    with connected(ray, options) as where:
        counter = ray.remote(FrameCounter).options(num_cpus=0).remote()
        count = actor_count(ray, options, len(tasks))
        pool = ActorPool(ray, SegmentActor, options, (replace(settings, threads=options.threads), counter), count)
        seen = len(pool.loaded)

        def tick() -> None:
            nonlocal seen
            for description in pool.loaded[seen:]:
                report.worker_ready(description)
            seen = len(pool.loaded)
            report.add_frames(ray.get(counter.take.remote()))
            report.retries, report.lost_workers = pool.retries, pool.lost
            report.tick()

        try:
            pool.run(tasks, on_result=lambda task, outcomes: (tick(), report.task_done(task, outcomes)),
                     on_given_up=report.task_failed, tick=tick)
            tick()
        finally:
            pool.close()
    return {"cluster": where, "actors": count, "cpus_per_actor": options.cpus_per_actor,
            "gpus_per_actor": options.gpus_per_actor, "threads_per_actor": options.threads}


def index_spans(num: int, step: int, parts: int) -> list[tuple[int, int]]:
    """[0, num) cut into spans whose starts are multiples of `step`, about four per actor (so a slow actor does
    not hold up the end) and at most 2048 images each."""
    batches = math.ceil(num / step)
    per_span = max(1, min(math.ceil(batches / (4 * parts)), max(1, 2048 // step)))
    return [(b * step, min(num, (b + per_span) * step)) for b in range(0, batches, per_span)]
