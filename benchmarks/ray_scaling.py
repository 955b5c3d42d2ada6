"""Ray's overhead and scaling on one machine: the same archive through the single-process runs and Ray actors.

    python -m edgepix.benchmarks.ray_scaling MODEL.onnx [--videos 20 --frames 30 --images 200 --size 640x480]
        [--configs 1x1,1x2,2x1] [--rounds 2] [--work DIR] [--json FILE] [--markdown FILE]

Inputs: `--videos` short videos of moving synthetic scenes and `--images` synthetic scene images (made here with
runtime.data.synthetic, seeded, so every run reads the same archive). Each round runs, in this order:
- `edgepix segment` as a stream (today's single-process pipeline over the glob, into a folder of JPEG frames), with
  its default plan and with 2 workers x 1 thread, the best plans for throughput on a 2-core CPU;
- the archive on the local engine (`--archive`: one output per input) with 1 worker x all threads and with one
  single-threaded worker per core;
- the archive on Ray, one run per `--configs` entry (actors x CPUs per actor), on one local cluster started once.

Rates are frames per second while the model is loaded (from the first worker ready to the last output; the
pipeline's own `fps`), the median over rounds; the wall time with start-up (model loads, actors; the cluster's
own start is reported once) is beside it, and the CPU time per frame of this process and every process it
started (Ray's daemons and actors included, start-up included): on a machine shared with other work the rates
follow the share of the cores each plan gets, while the CPU time per frame says what the plan costs.

The Ray outputs of the first config are compared with those of the local engine's first plan: the same names,
PNGs byte for byte, videos frame for frame. Prints a Markdown table; --json keeps everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from edgepix.runtime.core.cpuinfo import usable_cores

from .environment import describe, environment
from .stream_bound import load_average, make_video


def make_inputs(folder: Path, *, videos: int, frames: int, images: int, size: tuple[int, int]) -> str:
    """The archive: videos in two folders and images in a third; returns its recursive glob."""
    from edgepix.runtime.data.synthetic import SceneConfig, make_scene

    w, h = size
    for i in range(videos):
        sub = folder / f"day{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        make_video(sub / f"cam{i:02d}.mp4", frames=frames, size=size, seed=100 + i)
    shots = folder / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        cv2.imwrite(str(shots / f"shot{i:03d}.jpg"), make_scene(1000 + i, SceneConfig(size=(h, w)))[0])
    return f"{folder}/**/*.*"


def _tree_ticks() -> dict[int, int]:
    """pid -> user + system clock ticks of this process and every process below it (Ray's GCS, raylet, workers)."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))

    def below_me(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = stats.get(pid, (0, 0))[0]
        return False

    return {pid: ticks for pid, (_, ticks) in stats.items() if below_me(pid)}


class TreeCpu:
    """CPU seconds of this process and every process below it over a `with` block, sampled ten times a second:
    Ray reaps the actors it kills without adding their time to the raylet's counters, so an actor counts up to its
    last sample (at most 0.1 s of it is lost)."""

    def __enter__(self) -> TreeCpu:
        self.base = _tree_ticks()
        self.last = dict(self.base)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.1):
            self.last.update(_tree_ticks())

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.last.update(_tree_ticks())
        self.seconds = sum(t - self.base.get(pid, 0) for pid, t in self.last.items()) / os.sysconf("SC_CLK_TCK")


def stream_run(model: Path, source: str, out: Path, *, workers: int | None, threads: int | None) -> dict:
    """Today's `edgepix segment --source GLOB --sink out/`: one stream through the pipeline."""
    from edgepix.runtime.streams.jobs import SegmentJob, run_segment

    t0 = time.perf_counter()
    stats = run_segment(SegmentJob(model=model, sources=[source], sinks=[f"{out}/"], workers=workers,
                                   threads=threads, status_interval=0.0))
    return {"frames": stats["frames"], "fps": stats["fps"], "wall_s": time.perf_counter() - t0}


def archive_run(model: Path, source: str, out: Path, *, engine: str, workers: int | None = None,
                threads: int | None = None, actors: int | None = None, cpus: float = 1.0) -> dict:
    from edgepix.runtime.batch.archive import ArchiveJob, run_archive
    from edgepix.runtime.batch.cluster import ClusterOptions

    summary = run_archive(ArchiveJob(model=model, sources=[source], sink=str(out), engine=engine, workers=workers,
                                     threads=threads, cluster=ClusterOptions(actors=actors, cpus_per_actor=cpus),
                                     quiet=True))
    seconds = [r["seconds"] for r in summary["items"] if r["outcome"] == "done" and "seconds" in r]
    return {"frames": summary["frames"], "fps": summary["fps"], "wall_s": summary["seconds"],
            "failed": summary["failed"], "input_s_p50": float(np.percentile(seconds, 50)),
            "input_s_p90": float(np.percentile(seconds, 90)), "input_s_p99": float(np.percentile(seconds, 99))}


def same_outputs(a: Path, b: Path) -> bool:
    """The same output names; PNGs byte for byte; videos frame for frame, decoded."""
    def names(folder: Path) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts))

    if names(a) != names(b):
        return False
    for name in names(a):
        if name.endswith(".png"):
            if (a / name).read_bytes() != (b / name).read_bytes():
                return False
            continue
        caps = [cv2.VideoCapture(str(a / name)), cv2.VideoCapture(str(b / name))]
        while True:
            (ok_a, x), (ok_b, y) = (c.read() for c in caps)
            if ok_a != ok_b or (ok_a and not np.array_equal(x, y)):
                return False
            if not ok_a:
                break
    return True


def plans(configs: list[tuple[int, float]], cores: int) -> list[tuple[str, str, dict]]:
    """(label, kind, run arguments) of every plan a round runs."""
    rows = [(f"stream pipeline, default plan (1 worker x {cores} threads)", "stream", {"workers": None,
                                                                                        "threads": None}),
            (f"stream pipeline, {cores} workers x 1 thread", "stream", {"workers": cores, "threads": 1}),
            (f"archive, local engine, 1 worker x {cores} threads", "archive",
             {"engine": "local", "workers": 1, "threads": cores}),
            (f"archive, local engine, {cores} workers x 1 thread", "archive",
             {"engine": "local", "workers": cores, "threads": 1})]
    rows += [(f"archive, Ray, {a} actor{'s' if a > 1 else ''} x {c:g} CPU", "archive",
              {"engine": "ray", "actors": a, "cpus": c}) for a, c in configs]
    return rows


def run_rounds(model: Path, source: str, work: Path, configs: list[tuple[int, float]], rounds: int) -> dict:
    """Every plan once per round, rounds one after the other (so slow drifts of the machine's load hit all plans
    alike). The first round's outputs of the first local plan (1 worker x all threads) and of the first Ray
    config are kept and compared."""
    results: dict[str, list[dict]] = {}
    kept: dict[str, Path] = {}
    for r in range(rounds):
        for n, (label, kind, plan) in enumerate(plans(configs, usable_cores())):
            out = work / "out" / f"round{r}-plan{n}"
            shutil.rmtree(out, ignore_errors=True)
            with TreeCpu() as cpu:
                run = stream_run(model, source, out, **plan) if kind == "stream" else archive_run(model, source,
                                                                                                   out, **plan)
            run["cpu_ms_per_frame"] = cpu.seconds / run["frames"] * 1e3
            print(f"round {r + 1}: {label}: {run['fps']:.1f} frames/s ({run['frames']} frames), "
                  f"{run['wall_s']:.1f} s with start-up, {run['cpu_ms_per_frame']:.1f} ms CPU per frame", flush=True)
            results.setdefault(label, []).append(run)
            engine = plan.get("engine")
            if r == 0 and engine in ("local", "ray") and engine not in kept:
                kept[engine] = out
            else:
                shutil.rmtree(out, ignore_errors=True)
    identical = same_outputs(kept["local"], kept["ray"]) if "ray" in kept else None
    return {"runs": results, "ray_outputs_identical_to_local": identical}


def markdown(report: dict) -> str:
    runs = report["runs"]
    medians = {label: statistics.median(r["fps"] for r in rs) for label, rs in runs.items()}
    single = {k: v for k, v in medians.items() if "Ray" not in k}
    best_label = max(single, key=single.get)
    lines = ["| plan | frames/s (median; each round) | x best single-process | CPU ms per frame, all processes, "
             "start-up included (median) | wall s with start-up | s per input p50 / p90 / p99 |",
             "|---|---|---|---|---|---|"]
    for label, rs in runs.items():
        per_input = (f"{statistics.median(r['input_s_p50'] for r in rs):.2f} / "
                     f"{statistics.median(r['input_s_p90'] for r in rs):.2f} / "
                     f"{statistics.median(r['input_s_p99'] for r in rs):.2f}") if "input_s_p50" in rs[0] else "-"
        rounds = ", ".join(f"{r['fps']:.1f}" for r in rs)
        lines.append(f"| {label} | {medians[label]:.1f} ({rounds}) | "
                     f"{medians[label] / single[best_label]:.2f} | "
                     f"{statistics.median(r['cpu_ms_per_frame'] for r in rs):.1f} | "
                     f"{statistics.median(r['wall_s'] for r in rs):.1f} | {per_input} |")
    lines.append("")
    for label in (k for k in runs if "Ray" in k):  # against the best single-process run of the same round
        paired = [r["fps"] / max(runs[k][i]["fps"] for k in single) for i, r in enumerate(runs[label])]
        lines.append(f"- {label}: x the best single-process run of the same round: median "
                     f"{statistics.median(paired):.2f} (rounds: {', '.join(f'{p:.2f}' for p in paired)})")
    lines.append("")
    lines.append(f"Best single-process plan: {best_label} ({single[best_label]:.1f} frames/s). Ray outputs "
                 f"identical to the local engine's: {report['ray_outputs_identical_to_local']}. Cluster start: "
                 f"{report['cluster_start_s']:.1f} s. Inputs: {report['inputs']}. Load average before / after: "
                 f"{report['load_before']} / {report['load_after']}. {report['environment_text']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="an exported segmentation model (.onnx)")
    ap.add_argument("--videos", type=int, default=20)
    ap.add_argument("--frames", type=int, default=30, help="frames per video")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", default="640x480", help="WxH of the videos and images")
    ap.add_argument("--configs", default="1x1,1x2,2x1", help="Ray actors x CPUs per actor, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("ray_scaling_work"), help="inputs and outputs (kept)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    import logging

    import ray

    from edgepix.runtime.batch.cluster import ClusterOptions, connected
    from edgepix.runtime.streams.sources import parse_size, quiet_decoder_logs

    logging.basicConfig(level=logging.WARNING)
    quiet_decoder_logs()
    size = parse_size(args.size)
    configs = [(int(a), float(c)) for a, c in (item.split("x") for item in args.configs.split(","))]
    source = make_inputs(args.work / "inputs", videos=args.videos, frames=args.frames, images=args.images, size=size)
    t0 = time.perf_counter()
    with connected(ray, ClusterOptions()):  # one private cluster for every Ray run (the engine joins it)
        cluster_start = time.perf_counter() - t0
        load_before = load_average()
        report = run_rounds(args.model, source, args.work, configs, args.rounds)
    env = environment()
    report.update(cluster_start_s=cluster_start, load_before=load_before, load_after=load_average(),
                  environment=env, environment_text=describe(env), model=str(args.model),
                  inputs=f"{args.videos} videos x {args.frames} frames + {args.images} images, {args.size}")
    text = markdown(report)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
