"""Soak test of the stream pipeline: four streams for ten minutes, one of them a live network stream whose server is
killed and restarted every two minutes.

    python -m edgepix.benchmarks.soak MODEL.onnx [--minutes 10] [--kill-every 120] [--outage 3] [--out soak.json]

Streams: 0 a video file looping at its own rate (realtime), 1 and 2 `synthetic://` scenes at 15 and 10 fps, 3 ffmpeg
serving MPEG-TS over HTTP on 127.0.0.1 (`-listen 1`, 15 fps), killed every `--kill-every` seconds and started
again `--outage` seconds later. Sinks: an MP4 file (stream 0), the HTTP sink with one viewer reading every frame it
is sent, and null://. Every 10 s: the process's RSS and each stream's FPS over those 10 s. At the end:

- RSS at the end against RSS after the first minute;
- the longest stall of each stream (time without a processed frame), outside the live server's outages;
- every outage: when the server was back, when the first frame came, whether it reconnected;
- the other streams' FPS during the outages against their FPS outside them;
- frames lost per stream: frames read but never processed (the newest-frame policy drops frames the pipeline had
  no time for), and for paced streams the frames their rate promised but that were never read.

Not a unit test: it takes `--minutes`. Needs ffmpeg; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

LIVE_FPS = 15.0
SAMPLE_S = 10.0
LIVE_STREAM = 3  # the stream read from the live server
PACED_FPS = {1: 15.0, 2: 10.0}  # the synthetic streams' rates, by stream


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def viewer(port: int, counter: dict, stop: threading.Event) -> None:
    """A browser tab: reads the MJPEG stream of stream 1 as fast as it comes, reconnecting if dropped."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /stream/1.mjpg HTTP/1.0\r\n\r\n")
                while not stop.is_set():
                    data = s.recv(65536)
                    if not data:
                        break
                    counter["frames"] += data.count(b"--edgepixframe")
        except OSError:
            time.sleep(0.5)


def run(model: Path, *, minutes: float, kill_every: float, outage: float, workdir: Path) -> dict:
    from edgepix.benchmarks.stream_bound import LiveServer, free_port, make_video
    from edgepix.runtime import Segmenter
    from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions, choose_workers
    from edgepix.runtime.streams.sinks import HttpSink, make_sink

    video = make_video(workdir / "loop.mp4", frames=150, size=(320, 240), fps=LIVE_FPS)
    server = LiveServer(video, free_port())
    server.start()
    sources = open_streams(video, server.url)
    plan = choose_workers("ort-cpu")
    seg = Segmenter.load(model, "ort-cpu", **plan.backend_options())
    http = HttpSink("http://127.0.0.1:0", "127.0.0.1", 0)
    sinks = [make_sink(f"{workdir / 'soak.mp4'}?stream=0"), http, make_sink("null://")]
    duration = minutes * 60.0
    pipeline = Pipeline(seg, sources, sinks, PipelineOptions(workers=plan.workers, duration=duration))
    errors: list[str] = []

    def run_pipeline() -> None:
        try:
            pipeline.run()
        except Exception as e:  # noqa: BLE001 - reported in the results
            errors.append(f"{type(e).__name__}: {e}")

    runner = threading.Thread(target=run_pipeline, name="pipeline", daemon=True)
    runner.start()
    while http.server is None and runner.is_alive():
        time.sleep(0.05)
    stop_viewer = threading.Event()
    viewed = {"frames": 0}
    threading.Thread(target=viewer, args=(http.port, viewed, stop_viewer), daemon=True).start()
    watch = Watch(pipeline, sources, server, viewed, duration=duration, kill_every=kill_every, outage=outage)
    watch.until_done(runner)
    stop_viewer.set()
    t_end = time.monotonic()
    server.kill()
    seg.close()
    stats = pipeline.stats()
    samples = watch.samples
    rss_1min = next((x["rss_mb"] for x in samples if x["t_s"] >= 60), None)
    return {
        "minutes": minutes, "elapsed_s": round(stats["elapsed_s"], 1), "errors": errors + stats["errors"],
        "rss_mb_after_1_min": rss_1min, "rss_mb_end": samples[-1]["rss_mb"] if samples else None,
        "rss_change_pct": (round(100 * (samples[-1]["rss_mb"] - rss_1min) / rss_1min, 2)
                           if rss_1min and samples else None),
        "server_outages": watch.outage_rows(), "streams": watch.stream_rows(stats, t_end),
        "http_viewer_frames": viewed["frames"], "samples": samples, "sinks": stats["sinks"],
        "config": stats["config"],
    }


def open_streams(video: Path, live_url: str) -> list:
    """The four sources, numbered as in the module docstring, sharing one condition."""
    from edgepix.runtime.streams.sources import SourceOptions, open_source

    cond = threading.Condition()
    return [
        open_source(str(video), SourceOptions(loop=True, realtime=True), stream_id=0, cond=cond),
        open_source("synthetic://?size=320x240&fps=15&seed=1", stream_id=1, cond=cond),
        open_source("synthetic://?size=320x240&fps=10&seed=2", stream_id=2, cond=cond),
        open_source(live_url, SourceOptions(open_timeout=5.0, read_timeout=2.0), stream_id=LIVE_STREAM, cond=cond),
    ]


class Watch:
    """Watches the running pipeline every 0.1 s: each stream's progress (its stalls), the live server's kills and
    restarts, and a sample every SAMPLE_S. Times are time.monotonic()."""

    def __init__(self, pipeline, sources: list, server, viewed: dict, *, duration: float, kill_every: float,
                 outage: float) -> None:
        self.pipeline, self.sources, self.server, self.viewed = pipeline, sources, server, viewed
        self.duration, self.kill_every, self.outage = duration, kill_every, outage
        n = len(sources)
        self.t0 = time.monotonic()
        self.last_count = [0] * n
        self.last_progress = [self.t0] * n
        self.stalls: list[list[tuple[float, float]]] = [[] for _ in range(n)]  # (start, end) of gaps > 1 s
        self.samples: list[dict] = []
        self.window_counts = [0] * n
        self.next_sample = self.t0 + SAMPLE_S
        self.next_kill = self.t0 + kill_every
        self.outages: list[dict] = []  # {"killed", "back", "first_frame"}
        self.current: dict | None = None  # the outage under way
        self.tick_counts: list[tuple[float, list[int]]] = []  # (time, per-stream counts) every tick, for outage FPS

    def until_done(self, runner: threading.Thread) -> None:
        while runner.is_alive():
            time.sleep(0.1)
            now = time.monotonic()
            counts = list(self.pipeline.per_stream)
            self.tick_counts.append((now, counts))
            self._track_progress(now, counts)
            self._drive_live_server(now)
            if now >= self.next_sample:
                self._sample(now, counts)

    def _track_progress(self, now: float, counts: list[int]) -> None:
        for i in range(len(self.sources)):
            if counts[i] != self.last_count[i]:
                if now - self.last_progress[i] > 1.0:
                    self.stalls[i].append((self.last_progress[i], now))
                self.last_count[i], self.last_progress[i] = counts[i], now

    def _drive_live_server(self, now: float) -> None:
        """Kill the server every `kill_every` s (not in the last half interval), start it `outage` s later, and
        record when the live stream's first frame came back."""
        current = self.current
        if current is None and now >= self.next_kill and now < self.t0 + self.duration - self.kill_every / 2:
            self.server.kill()
            current = {"killed": now, "back": None, "first_frame": None}
            self.outages.append(current)
        if current is not None and current["back"] is None and now >= current["killed"] + self.outage:
            current["back"] = self.server.start(wait=False)
        if current is not None and current["back"] is not None:
            live_outages = self.sources[LIVE_STREAM].outages
            live = live_outages[-1] if live_outages else None
            if live is not None and live.first_frame is not None and live.first_frame > current["killed"]:
                current["first_frame"] = live.first_frame
                current = None
                self.next_kill = now + self.kill_every - (now - self.outages[-1]["killed"])
        self.current = current

    def _sample(self, now: float, counts: list[int]) -> None:
        fps = [(c - w) / SAMPLE_S for c, w in zip(counts, self.window_counts)]
        self.window_counts = counts
        sample = {"t_s": round(now - self.t0, 1), "rss_mb": round(rss_mb(), 1), "fps": [round(f, 2) for f in fps],
                  "states": [s.state.value for s in self.sources], "http_viewer_frames": self.viewed["frames"]}
        self.samples.append(sample)
        print(f"{sample['t_s']:6.0f} s  RSS {sample['rss_mb']:7.1f} MB  FPS " +
              " ".join(f"{f:5.1f}" for f in fps) + "  " + " ".join(sample["states"]), flush=True)
        self.next_sample += SAMPLE_S

    # ---- after the run

    def outage_rows(self) -> list[dict]:
        t0 = self.t0
        return [{"killed_s": round(o["killed"] - t0, 1), "back_s": o["back"] and round(o["back"] - t0, 1),
                 "first_frame_after_back_s": (round(o["first_frame"] - o["back"], 2)
                                              if o["first_frame"] and o["back"] else None)}
                for o in self.outages]

    def stream_rows(self, stats: dict, t_end: float) -> list[dict]:
        """Per stream: frames read, processed and lost, its longest stall and its FPS outside and during the live
        server's outages."""
        # outage windows of the live stream: from the kill to its first frame (or the end)
        windows = [(o["killed"], o["first_frame"] or t_end) for o in self.outages]

        def in_outage(a: float, b: float) -> bool:
            return any(a < w1 and b > w0 for w0, w1 in windows)

        def rate(i: int, inside: bool) -> float:
            frames, seconds = 0, 0.0
            for (ta, ca), (tb, cb) in zip(self.tick_counts, self.tick_counts[1:]):
                if in_outage(ta, tb) == inside:
                    frames += cb[i] - ca[i]
                    seconds += tb - ta
            return frames / seconds if seconds > 0 else float("nan")

        streams = []
        for i, s in enumerate(stats["streams"]):
            live = i == LIVE_STREAM
            last = self.last_progress[i]
            gaps = [(b - a) for a, b in self.stalls[i] if not (live and in_outage(a, b))]
            if t_end - last > 1.0 and not (live and in_outage(last, t_end)):
                gaps.append(t_end - last)
            promised = int(PACED_FPS[i] * stats["elapsed_s"]) if i in PACED_FPS else None
            streams.append({
                "uri": s["uri"], "frames_read": s["frames_read"], "frames_processed": s["frames_processed"],
                "fps": s["frames_processed"] / stats["elapsed_s"] if stats["elapsed_s"] else 0.0,
                "lost_newest_frame_policy": s["frames_read"] - s["frames_processed"],
                "not_read_of_paced_rate": None if promised is None else max(0, promised - s["frames_read"]),
                "longest_stall_outside_outages_s": round(max(gaps, default=0.0), 2),
                "fps_outside_outages": round(rate(i, False), 2), "fps_during_outages": round(rate(i, True), 2),
                "frames_missed_in_outages_est": round(LIVE_FPS * s["outage_s"]) if live else 0,
                "reconnects": s["reconnects"], "outages": s["outages"]})
        return streams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgepix.benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="an exported segmentation .onnx")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--kill-every", type=float, default=120.0, metavar="S", help="kill the live server every S s")
    p.add_argument("--outage", type=float, default=3.0, metavar="S", help="seconds the live server stays away")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        print("soak: needs ffmpeg (apt-get install ffmpeg)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="edgepix-soak-") as tmp:
        result = run(args.model, minutes=args.minutes, kill_every=args.kill_every, outage=args.outage,
                     workdir=Path(tmp))
    from edgepix.benchmarks.environment import environment

    result["environment"] = environment()
    if args.out is not None:
        from edgepix.runtime.core.fileio import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
    print(f"RSS after 1 min {result['rss_mb_after_1_min']} MB, at the end {result['rss_mb_end']} MB "
          f"({result['rss_change_pct']}%)")
    for o in result["server_outages"]:
        print(f"live server killed at {o['killed_s']} s, restarted at {o['back_s']} s, first frame "
              f"{o['first_frame_after_back_s']} s after the restart")
    for i, s in enumerate(result["streams"]):
        print(f"stream {i} {s['uri']}: {s['fps']:.2f} fps, outside outages {s['fps_outside_outages']}, during "
              f"{s['fps_during_outages']}; longest stall outside outages {s['longest_stall_outside_outages_s']} s; "
              f"lost to the newest-frame policy {s['lost_newest_frame_policy']}, not read of the paced rate "
              f"{s['not_read_of_paced_rate']}, missed during outages ~{s['frames_missed_in_outages_est']}; "
              f"reconnects {s['reconnects']}")
    print(f"HTTP viewer frames {result['http_viewer_frames']}; errors {result['errors'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
