"""Soak test of the stream pipeline's memory: N streams for M minutes through the code `edgepix segment` runs, and
the trend of the process's resident memory (RSS) in MB per hour with its 95% confidence interval.

    python -m edgepix.benchmarks.soak [--model M.onnx] [--streams 4] [--minutes 30] [--fps 10] [--size 320x240]
                                      [--sink URI ...] [--live] [--warmup 120] [--interval 5] [--out soak.json]

What runs: `run_stream` (runtime/streams/jobs.py), the function behind `edgepix segment`, with the CLI's logging
and status interval; so the process has what the command has: glibc's malloc tuning (`tune_malloc`), the backend
`auto` picks, the worker plan. Sources: N `synthetic://` scenes of --size at --fps (seeds 1..N). With --live the
last stream is instead a live MPEG-TS stream over HTTP from a local ffmpeg, killed every --kill-every s and back
--outage s later, so reconnects are part of the soak. Sinks: null:// unless --sink is given. Without --model, the
benchmarks' default segmenter (fastscnn, 6 classes, FP32, seed 0; see segmenter_breakdown.py) at 256x256, exported
once into the edgepix cache (needs torch).

How memory is measured: a sampler thread reads VmRSS from /proc/self/status every --interval s (5). The first
--warmup s (120, from before the model loads: the model, ONNX Runtime's arenas and the pipeline's rolling windows
filling up) are kept but left out of the fit. Over the samples after it: the least-squares slope of RSS against
time in MB/hour, with a 95% confidence interval slope +- t * SE, where SE = sqrt(SSR / (n - 2) / Sxx) and t is the
0.975 quantile of Student's t with n - 2 degrees of freedom (`t_quantile_975`: a table, linear in 1/df between its
rows, so no scipy). The fit's sums are updated sample by sample (`TrendFit`, Welford's updates), so it covers a run
of any length in constant memory; the samples themselves go to a fixed-size ring buffer (`RingBuffer`, the last
RING_CAPACITY: 11 hours at 5 s), which is what the JSON holds. The interval assumes independent residuals; RSS moves
in steps (allocator arenas, caches), so the JSON also gives the residuals' lag-1 autocorrelation: near 1, the
interval is narrower than the truth and a longer run says more.

Output: the CLI's status line every 5 s with the RSS in front, the JSON (--out, written atomically) with the
samples, slope, interval, streams, model, duration, pipeline statistics and machine, and one closing line with the
slope and the interval. Not a unit test: it takes --minutes. Exit 0 when the run completed (whatever the slope),
1 when it failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

DEFAULT_MODEL_SIZE = (256, 256)  # (H, W) of the default segmenter: small, so the streams cost little CPU
RING_CAPACITY = 8192  # samples kept for the JSON: 11 hours at 5 s; the fit covers every sample whatever the length
SAMPLE_COLUMNS = ("t_s", "rss_mb", "load_1min")

# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom; beyond the last row toward the normal's.
_T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
         10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 16: 2.1199, 17: 2.1098, 18: 2.1009,
         19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518,
         28: 2.0484, 29: 2.0452, 30: 2.0423, 40: 2.0211, 50: 2.0086, 60: 2.0003, 80: 1.9901, 100: 1.9840,
         120: 1.9799}
_Z975 = 1.959964  # the normal's 0.975 quantile: t's limit as df grows


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (two-sided 95%). Exact to 4 decimals at the
    table's rows (1-30, 40, 50, 60, 80, 100, 120); between rows, and beyond 120 toward the normal's 1.959964,
    linear in 1/df, which stays within 0.0005 of the exact value."""
    if df < 1:
        raise ValueError(f"degrees of freedom: expected >= 1, got {df}")
    if df in _T975:
        return _T975[df]
    rows = sorted(_T975)
    upper = next((d for d in rows if d > df), None)
    lower = max(d for d in rows if d < df)
    x_lo, y_lo = 1.0 / lower, _T975[lower]
    x_hi, y_hi = (1.0 / upper, _T975[upper]) if upper is not None else (0.0, _Z975)
    return y_hi + (y_lo - y_hi) * (1.0 / df - x_hi) / (x_lo - x_hi)


class TrendFit:
    """Least squares y = a + b x, updated one point at a time in constant memory (Welford's running means and
    co-moments: no sums of squares of large numbers that cancel)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean_x = self.mean_y = 0.0
        self.sxx = self.sxy = self.syy = 0.0  # sums of squared deviations and cross-deviations from the means

    def add(self, x: float, y: float) -> None:
        self.n += 1
        dx = x - self.mean_x
        dy = y - self.mean_y
        self.mean_x += dx / self.n
        self.mean_y += dy / self.n
        self.sxx += dx * (x - self.mean_x)
        self.sxy += dx * (y - self.mean_y)
        self.syy += dy * (y - self.mean_y)

    @property
    def slope(self) -> float:
        return self.sxy / self.sxx if self.n >= 2 and self.sxx > 0 else math.nan

    @property
    def intercept(self) -> float:
        return self.mean_y - self.slope * self.mean_x

    def slope_se(self) -> float:
        """The slope's standard error: sqrt(SSR / (n - 2) / Sxx), SSR the residuals' sum of squares."""
        if self.n < 3 or self.sxx <= 0:
            return math.nan
        ssr = max(0.0, self.syy - self.sxy * self.sxy / self.sxx)
        return math.sqrt(ssr / (self.n - 2) / self.sxx)

    def slope_ci95(self) -> tuple[float, float]:
        """The slope's two-sided 95% confidence interval (Student's t with n - 2 degrees of freedom)."""
        if self.n < 3:
            return math.nan, math.nan
        half = t_quantile_975(self.n - 2) * self.slope_se()
        return self.slope - half, self.slope + half


class RingBuffer:
    """The last `capacity` rows of `columns` floats, in a buffer allocated once: appending never grows it."""

    def __init__(self, capacity: int, columns: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: expected >= 1, got {capacity}")
        self.rows = np.full((capacity, columns), np.nan)
        self.capacity = capacity
        self.appended = 0  # rows ever appended; those beyond `capacity` overwrote the oldest

    def append(self, row: Sequence[float]) -> None:
        self.rows[self.appended % self.capacity] = row
        self.appended += 1

    def __len__(self) -> int:
        return min(self.appended, self.capacity)

    @property
    def dropped(self) -> int:
        return self.appended - len(self)

    def values(self) -> np.ndarray:
        """The rows kept, oldest first (a copy)."""
        if self.appended <= self.capacity:
            return self.rows[:self.appended].copy()
        start = self.appended % self.capacity
        return np.concatenate([self.rows[start:], self.rows[:start]])

    def last(self) -> np.ndarray | None:
        return self.rows[(self.appended - 1) % self.capacity] if self.appended else None


def residual_lag1_autocorrelation(x: np.ndarray, y: np.ndarray) -> float:
    """The lag-1 autocorrelation of the residuals of y's least-squares line against x: near 0 when they are
    independent (the t interval holds), near 1 when RSS wanders in steps (the interval is too narrow)."""
    if len(x) < 4:
        return math.nan
    slope, intercept = np.polyfit(x, y, 1)
    r = y - (intercept + slope * x)
    denominator = float(np.dot(r, r))
    return float(np.dot(r[1:], r[:-1]) / denominator) if denominator > 0 else math.nan


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: None for a number that could not be measured."""
    return float(value) if math.isfinite(value) else None


def rss_mb() -> float:
    """This process's resident set size (VmRSS) in MB, NaN where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, None where the system has none."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def load_1min() -> float:
    load = load_average()
    return load[0] if load is not None else math.nan


class BackgroundThread:
    """A daemon thread that runs `_run` from `start()` until `stop()`, which sets `_stop` (the event `_run` waits on)
    and joins it."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class RssSampler(BackgroundThread):
    """Samples RSS every `interval` s in its own thread: every sample into the ring buffer, those from `warmup` s
    on into the fit (time in hours, so the slope is in MB/hour). Bounded: the ring and the fit's seven numbers."""

    def __init__(self, *, interval: float, warmup: float, capacity: int = RING_CAPACITY,
                 read_rss: Callable[[], float] = rss_mb) -> None:
        self.interval, self.warmup, self.read_rss = interval, warmup, read_rss
        self.ring = RingBuffer(capacity, len(SAMPLE_COLUMNS))
        self.fit = TrendFit()
        self.first_fitted_mb = math.nan
        self.min_mb, self.max_mb = math.inf, -math.inf
        self.t0 = time.monotonic()
        super().__init__("rss-sampler")

    def start(self) -> RssSampler:
        self.t0 = time.monotonic()
        return super().start()

    def _run(self) -> None:
        self.sample()
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self, t: float | None = None) -> None:
        """Record one sample at `t` seconds from the start (now, unless told)."""
        t = time.monotonic() - self.t0 if t is None else t
        rss = self.read_rss()
        self.ring.append((t, rss, load_1min()))
        self.min_mb, self.max_mb = min(self.min_mb, rss), max(self.max_mb, rss)
        if t >= self.warmup:
            if self.fit.n == 0:
                self.first_fitted_mb = rss
            self.fit.add(t / 3600.0, rss)

    def last_mb(self) -> float:
        last = self.ring.last()
        return float(last[1]) if last is not None else math.nan

    def result(self) -> dict:
        """The fit and the samples, JSON-ready."""
        rows = self.ring.values()
        fitted = rows[rows[:, 0] >= self.warmup]
        low, high = self.fit.slope_ci95()
        lag1 = (residual_lag1_autocorrelation(fitted[:, 0] / 3600.0, fitted[:, 1])
                if len(fitted) == self.fit.n else math.nan)  # only when the ring still holds every fitted sample
        return {
            "rss_slope_mb_per_hour": _finite(self.fit.slope),
            "rss_slope_ci95_mb_per_hour": [_finite(low), _finite(high)],
            "rss_slope_se_mb_per_hour": _finite(self.fit.slope_se()), "fit_samples": self.fit.n,
            "t_quantile": t_quantile_975(self.fit.n - 2) if self.fit.n >= 3 else None,
            "residual_lag1_autocorrelation": _finite(lag1),
            "rss_mb": {"first": _finite(rows[0, 1]) if len(rows) else None,
                       "first_after_warmup": _finite(self.first_fitted_mb), "last": _finite(self.last_mb()),
                       "min": _finite(self.min_mb), "max": _finite(self.max_mb)},
            "samples": {"columns": list(SAMPLE_COLUMNS), "rows": [[round(float(v), 3) for v in r] for r in rows],
                        "appended": self.ring.appended, "dropped_oldest": self.ring.dropped},
        }


class LiveOutages(BackgroundThread):
    """Kills a LiveServer every `every` s and starts it again `outage` s later, in its own thread."""

    def __init__(self, server, *, every: float, outage: float) -> None:
        self.server, self.every, self.outage = server, every, outage
        self.kills = 0
        super().__init__("live-outages")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.server.kill()
            self.kills += 1
            if self._stop.wait(self.outage):
                return
            self.server.start(wait=False)


def soak(model: Path, *, streams: int, minutes: float, fps: float, size: tuple[int, int], sinks: Sequence[str],
         live: bool, kill_every: float, outage: float, warmup: float, interval: float, workdir: Path) -> dict:
    """Run the streams through `run_stream` for `minutes` while sampling RSS; returns the results (see the
    module docstring)."""
    from edgepix.runtime.streams.jobs import StreamJob, run_stream
    from edgepix.runtime.streams.sources import quiet_decoder_logs

    from .environment import environment

    quiet_decoder_logs()  # as `edgepix segment` does without --verbose
    w, h = size
    sources = [f"synthetic://?size={w}x{h}&fps={fps:g}&seed={i + 1}" for i in range(streams)]
    server = None
    if live:
        from .stream_bound import LiveServer, free_port, make_video

        video = make_video(workdir / "live.mp4", frames=150, size=size, fps=fps)
        server = LiveServer(video, free_port(), fps=fps)
        server.start()
        sources[-1] = server.url
    job = StreamJob(model=model, sources=sources, sinks=list(sinks) or ["null://"], duration=minutes * 60.0,
                    status_interval=5.0)  # the CLI's interval when stderr is not a terminal
    load_start = load_average()
    sampler = RssSampler(interval=interval, warmup=warmup).start()
    outages = LiveOutages(server, every=kill_every, outage=outage).start() if server is not None else None

    def status(line: str) -> None:
        if line.endswith("\n"):  # the pipeline's final line: it has finished; what follows is teardown, not soak
            sampler.stop()
        print(f"RSS {sampler.last_mb():7.1f} MB | {line.rstrip()}", file=sys.stderr, flush=True)

    try:
        stats = run_stream(job, status=status, describe=lambda line: print(line, file=sys.stderr))
    finally:
        sampler.stop()
        if outages is not None:
            outages.stop()
        if server is not None:
            server.kill()
    return {
        "benchmark": "soak", "model": str(model), "backend": stats["config"].get("backend"),
        "streams": sources, "sinks": list(job.sinks), "fps_per_stream": fps, "frame_size": f"{w}x{h}",
        "live_server_kills": outages.kills if outages is not None else None,
        "minutes": minutes, "duration_s": stats["elapsed_s"], "warmup_s": warmup, "interval_s": interval,
        **sampler.result(),
        "pipeline": stats,
        "machine": {**environment(threads=stats["config"].get("threads_per_worker")),
                    "load_average_start": load_start, "load_average_end": load_average()},
    }


def default_model() -> Path:
    """The default segmenter's file, exported in a child process the first time: torch must not be imported into
    the process being measured (`edgepix segment` never imports it)."""
    from edgepix.runtime.core.errors import ModelFormatError

    code = ("import sys; from edgepix.benchmarks.segmenter_breakdown import ensure_default_model; "
            f"print(ensure_default_model(size={DEFAULT_MODEL_SIZE!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ModelFormatError(f"could not export the default model (needs torch: pip install 'edgepix[train]'): "
                               f"{last}; or pass --model M.onnx")
    return Path(done.stdout.strip().splitlines()[-1])


def closing_line(result: dict) -> str:
    p = result["pipeline"]
    if result["fit_samples"] < 3:
        return (f"soak: no slope: {result['fit_samples']} sample(s) after the {result['warmup_s']:g} s warm-up (the "
                f"run ended after {result['duration_s'] / 60:.1f} min, {p['frames']} frames); at least 3 are needed")
    low, high = result["rss_slope_ci95_mb_per_hour"]
    return (f"soak: RSS slope {result['rss_slope_mb_per_hour']:+.2f} MB/hour, 95% CI [{low:+.2f}, {high:+.2f}] "
            f"({result['fit_samples']} samples after a {result['warmup_s']:g} s warm-up; "
            f"{len(result['streams'])} streams, {result['duration_s'] / 60:.1f} min, {p['frames']} frames; "
            f"RSS {result['rss_mb']['first_after_warmup']:.1f} -> {result['rss_mb']['last']:.1f} MB)")


def _size(text: str) -> tuple[int, int]:
    from edgepix.runtime.streams.sources import parse_size

    try:
        return parse_size(text)
    except Exception as e:  # argparse turns this into a usage error (exit 2)
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    import logging

    p = argparse.ArgumentParser(prog="python -m edgepix.benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="an exported segmentation .onnx (default: fastscnn 256x256, exported "
                                              "once into the edgepix cache; needs torch)")
    p.add_argument("--streams", type=int, default=4, metavar="N", help="streams at once (4)")
    p.add_argument("--minutes", type=float, default=30.0, metavar="M", help="how long to run (30)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of each synthetic stream (10)")
    p.add_argument("--size", type=_size, default=(320, 240), metavar="WxH", help="frame size (320x240)")
    p.add_argument("--sink", action="append", default=[], metavar="URI", help="a sink (repeatable; null://)")
    p.add_argument("--live", action="store_true",
                   help="the last stream is a live ffmpeg HTTP stream, killed and restarted (needs ffmpeg)")
    p.add_argument("--kill-every", type=float, default=120.0, metavar="S", help="with --live: kill every S s (120)")
    p.add_argument("--outage", type=float, default=3.0, metavar="S", help="with --live: seconds away (3)")
    p.add_argument("--warmup", type=float, default=120.0, metavar="S",
                   help="seconds left out of the slope at the start (120)")
    p.add_argument("--interval", type=float, default=5.0, metavar="S", help="seconds between RSS samples (5)")
    p.add_argument("--out", type=Path, metavar="JSON", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.streams < 1 or args.minutes <= 0 or args.fps <= 0 or args.interval <= 0 or args.warmup < 0:
        p.error("--streams must be >= 1, --warmup >= 0, and --minutes, --fps and --interval > 0")
    if (args.minutes * 60 - args.warmup) / args.interval < 3:
        p.error(f"--minutes {args.minutes:g} leaves fewer than 3 samples after the {args.warmup:g} s warm-up at one "
                f"per {args.interval:g} s: run longer, or lower --warmup or --interval")
    if args.live and shutil.which("ffmpeg") is None:
        print("soak: error: --live needs ffmpeg (apt-get install ffmpeg)", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # as the edgepix CLI
    from edgepix.runtime.core.errors import EdgepixError, SinkError

    try:
        if args.out is not None:  # a bad --out path fails now, not after the run
            from edgepix.runtime.core.fileio import check_writable

            check_writable(args.out, "--out", SinkError)
        if args.model is None:
            args.model = default_model()
        with tempfile.TemporaryDirectory(prefix="edgepix-soak-") as tmp:
            result = soak(args.model, streams=args.streams, minutes=args.minutes, fps=args.fps, size=args.size,
                          sinks=args.sink, live=args.live, kill_every=args.kill_every, outage=args.outage,
                          warmup=args.warmup, interval=args.interval, workdir=Path(tmp))
        if args.out is not None:
            from edgepix.runtime.core.fileio import atomic_write_text

            atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
    except EdgepixError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 1
    print(closing_line(result))
    return 0 if result["fit_samples"] >= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
