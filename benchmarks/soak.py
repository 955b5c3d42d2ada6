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
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LIVE_FPS = 15.0
SAMPLE_S = 10.0


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def listening(port: int) -> bool:
    """Whether something listens on TCP `port` (the kernel's table: a probe connection would be taken as ffmpeg's
    one client)."""
    with open("/proc/net/tcp") as f:
        rows = f.read().splitlines()[1:]
    return any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A" for r in rows)


class LiveServer:
    """ffmpeg serving a looping video as MPEG-TS over HTTP (one client at a time), like an IP camera."""

    def __init__(self, video: Path, port: int) -> None:
        self.video, self.port = video, port
        self.url = f"http://127.0.0.1:{port}/live.ts"
        self.proc: subprocess.Popen | None = None

    def start(self, *, wait: bool = True) -> float:
        """Start ffmpeg; returns when it started. `wait`: first until it listens (a client that connects at once
        closes ffmpeg's one-client listening socket, so a restart does not wait)."""
        started = time.monotonic()
        self.proc = subprocess.Popen(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-stream_loop", "-1", "-i",
             str(self.video), "-an", "-c:v", "mpeg2video", "-q:v", "5", "-g", "5", "-f", "mpegts", "-listen", "1",
             self.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while wait and time.monotonic() < deadline and not listening(self.port):
            time.sleep(0.01)
        return started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    from edgepix.benchmarks.stream_bound import make_video
    from edgepix.runtime import Segmenter
    from edgepix.runtime.pipeline import Pipeline, PipelineOptions, choose_workers
    from edgepix.runtime.sinks import HttpSink, make_sink
    from edgepix.runtime.sources import SourceOptions, open_source

    video = make_video(workdir / "loop.mp4", frames=150, size=(320, 240), fps=LIVE_FPS)
    server = LiveServer(video, free_port())
    server.start()
    cond = threading.Condition()
    sources = [
        open_source(str(video), SourceOptions(loop=True, realtime=True), stream_id=0, cond=cond),
        open_source("synthetic://?size=320x240&fps=15&seed=1", stream_id=1, cond=cond),
        open_source("synthetic://?size=320x240&fps=10&seed=2", stream_id=2, cond=cond),
        open_source(server.url, SourceOptions(open_timeout=5.0, read_timeout=2.0), stream_id=3, cond=cond),
    ]
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

    n = len(sources)
    t0 = time.monotonic()
    last_count = [0] * n
    last_progress = [t0] * n
    stalls: list[list[tuple[float, float]]] = [[] for _ in range(n)]  # (start, end) of gaps > 1 s
    samples = []
    window_counts = [0] * n
    next_sample = t0 + SAMPLE_S
    next_kill = t0 + kill_every
    outages = []  # {"killed", "back", "first_frame"}
    current = None
    tick_counts: list[tuple[float, list[int]]] = []  # (time, per-stream counts) every tick, for outage FPS
    while runner.is_alive():
        time.sleep(0.1)
        now = time.monotonic()
        counts = list(pipeline.per_stream)
        tick_counts.append((now, counts))
        for i in range(n):
            if counts[i] != last_count[i]:
                if now - last_progress[i] > 1.0:
                    stalls[i].append((last_progress[i], now))
                last_count[i], last_progress[i] = counts[i], now
        if current is None and now >= next_kill and now < t0 + duration - kill_every / 2:
            server.kill()
            current = {"killed": now, "back": None, "first_frame": None}
            outages.append(current)
        if current is not None and current["back"] is None and now >= current["killed"] + outage:
            current["back"] = server.start(wait=False)
        if current is not None and current["back"] is not None:
            live = sources[3].outages[-1] if sources[3].outages else None
            if live is not None and live.first_frame is not None and live.first_frame > current["killed"]:
                current["first_frame"] = live.first_frame
                current = None
                next_kill = now + kill_every - (now - outages[-1]["killed"])
        if now >= next_sample:
            fps = [(c - w) / SAMPLE_S for c, w in zip(counts, window_counts)]
            window_counts = counts
            sample = {"t_s": round(now - t0, 1), "rss_mb": round(rss_mb(), 1), "fps": [round(f, 2) for f in fps],
                      "states": [s.state.value for s in sources], "http_viewer_frames": viewed["frames"]}
            samples.append(sample)
            print(f"{sample['t_s']:6.0f} s  RSS {sample['rss_mb']:7.1f} MB  FPS " +
                  " ".join(f"{f:5.1f}" for f in fps) + "  " + " ".join(sample["states"]), flush=True)
            next_sample += SAMPLE_S
    stop_viewer.set()
    t_end = time.monotonic()
    server.kill()
    seg.close()
    stats = pipeline.stats()

    # outage windows of the live stream: from the kill to its first frame (or the end)
    windows = [(o["killed"], o["first_frame"] or t_end) for o in outages]

    def in_outage(a: float, b: float) -> bool:
        return any(a < w1 and b > w0 for w0, w1 in windows)

    def rate(i: int, inside: bool) -> float:
        frames, seconds = 0, 0.0
        for (ta, ca), (tb, cb) in zip(tick_counts, tick_counts[1:]):
            if in_outage(ta, tb) == inside:
                frames += cb[i] - ca[i]
                seconds += tb - ta
        return frames / seconds if seconds > 0 else float("nan")

    streams = []
    for i, s in enumerate(stats["streams"]):
        gaps = [(b - a) for a, b in stalls[i] if not (i == 3 and in_outage(a, b))]
        if t_end - last_progress[i] > 1.0 and not (i == 3 and in_outage(last_progress[i], t_end)):
            gaps.append(t_end - last_progress[i])
        promised = None
        if i in (1, 2):
            promised = int((15.0 if i == 1 else 10.0) * stats["elapsed_s"])
        streams.append({
            "uri": s["uri"], "frames_read": s["frames_read"], "frames_processed": s["frames_processed"],
            "fps": s["frames_processed"] / stats["elapsed_s"] if stats["elapsed_s"] else 0.0,
            "lost_newest_frame_policy": s["frames_read"] - s["frames_processed"],
            "not_read_of_paced_rate": None if promised is None else max(0, promised - s["frames_read"]),
            "longest_stall_outside_outages_s": round(max(gaps, default=0.0), 2),
            "fps_outside_outages": round(rate(i, False), 2), "fps_during_outages": round(rate(i, True), 2),
            "frames_missed_in_outages_est": round(LIVE_FPS * s["outage_s"]) if i == 3 else 0,
            "reconnects": s["reconnects"], "outages": s["outages"]})
    rss_1min = next((x["rss_mb"] for x in samples if x["t_s"] >= 60), None)
    return {
        "minutes": minutes, "elapsed_s": round(stats["elapsed_s"], 1), "errors": errors + stats["errors"],
        "rss_mb_after_1_min": rss_1min, "rss_mb_end": samples[-1]["rss_mb"] if samples else None,
        "rss_change_pct": (round(100 * (samples[-1]["rss_mb"] - rss_1min) / rss_1min, 2)
                           if rss_1min and samples else None),
        "server_outages": [{"killed_s": round(o["killed"] - t0, 1), "back_s": o["back"] and round(o["back"] - t0, 1),
                            "first_frame_after_back_s": (round(o["first_frame"] - o["back"], 2)
                                                         if o["first_frame"] and o["back"] else None)}
                           for o in outages],
        "streams": streams, "http_viewer_frames": viewed["frames"], "samples": samples,
        "sinks": stats["sinks"], "config": stats["config"],
    }


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
        from edgepix.runtime.fileio import atomic_write_text

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
