"""Stable masks on video, measured: flicker, lag, accuracy and cost of each temporal mode.

    python -m edgepix.benchmarks.temporal MODEL.onnx [--frames 150] [--size 480x640] [--seed 11] [--video FILE] \
        [--strip docs/temporal_strip.png] [--json out.json]

- The synthetic moving scenes at --size (exact masks): per mode, flicker (class changes where the truth did not
  change; and `static`, where no true class changed within 4 pixels), lag (frames the masks trail the objects),
  mIoU, and the stabilizer's own cost per frame (p50 and p90 ms, measured around the temporal step alone, with the
  rest of the post-processing between steps as in a stream; also the calling thread's CPU time, which other
  processes do not inflate; the report keeps the load average before and after, since a shared machine's load
  shows in the wall-clock times).
- A real video (--video; e.g. Debian's opencv-doc vtest.avi, 768x576 street footage): flicker measured with optical
  flow (runtime.data.flicker.FlickerMeter) per mode, and optionally a strip of frames (off above, each mode below)
  for the docs.

Every mode runs on the same model outputs (the model runs once per frame), so the comparison isolates the
stabilizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edgepix.runtime.core.fileio import atomic_write_text, write_image
from edgepix.runtime.data.flicker import FlickerMeter, TemporalScore
from edgepix.runtime.data.synthetic import MovingScene, SceneConfig
from edgepix.runtime.tasks.segmenter import Segmenter
from edgepix.runtime.tasks.temporal import TemporalOptions, TemporalState

from .environment import describe, environment
from .stream_bound import load_average

MODES = ("off", "ema", "flow")
STRIP_FRAMES = 4  # consecutive frames from the middle of the video in --strip


def model_outputs(seg: Segmenter, frames: list[np.ndarray]):
    """(raw output, Prepared) per frame: what every mode post-processes."""
    outputs = []
    for frame in frames:
        prepared = seg.preprocess([frame])
        outputs.append((seg.run(prepared.tensor), prepared))
    return outputs


def decide(seg: Segmenter, outputs, frames, mode: str, alpha: float, keep: range = range(0)
           ) -> tuple[list[np.ndarray], dict, dict]:
    """The class maps under `mode`, the SegmentationResults of the frames in `keep`, and the stabilizer's cost per
    frame: wall-clock ms (p50, p90) and the calling thread's CPU ms (p50; what other processes on a shared machine
    do not inflate). Only the class maps are kept of the other frames, as a stream lets each result go: a kept
    result holds its scores, and the heap's growth would be charged to the next frame's stabilizer."""
    state = TemporalState(TemporalOptions(mode=mode, alpha=alpha))
    class_maps, kept, wall, cpu = [], {}, [], []
    for i, ((raw, prepared), frame) in enumerate(zip(outputs, frames)):
        t0, c0 = time.perf_counter(), time.thread_time()
        stabilized = seg.stabilize(raw, [(state, frame)]) if mode != "off" else raw
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
        result = seg.postprocess(stabilized, prepared)[0]
        class_maps.append(result.class_map)
        if i in keep:
            kept[i] = result
    wall, cpu = wall[5:], cpu[5:]  # past the first frames (the state's start, first allocations)
    return class_maps, kept, {"ms_p50": float(np.median(wall)), "ms_p90": float(np.percentile(wall, 90)),
                              "cpu_ms_p50": float(np.median(cpu))}


def synthetic(seg: Segmenter, n: int, size: tuple[int, int], alpha: float, seed: int) -> dict:
    scene = MovingScene(seed=seed, config=SceneConfig(size=size))
    pairs = [scene.next() for _ in range(n)]
    frames, truths = [p[0] for p in pairs], [p[1] for p in pairs]
    outputs = model_outputs(seg, frames)
    rows = {}
    for mode in MODES:
        class_maps, _, cost = decide(seg, outputs, frames, mode, alpha)
        score = TemporalScore(seg.num_classes)
        for classes, t in zip(class_maps, truths):
            score.update(classes, t)
        rows[mode] = {**score.summary(), **cost}
    return rows


def real_video(seg: Segmenter, path: Path, n: int, alpha: float, strip: Path | None) -> dict:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < n:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if not frames:
        raise SystemExit(f"{path}: no frames")
    outputs = model_outputs(seg, frames)
    rows, by_mode = {}, {}
    picks = range(len(frames) // 2, len(frames) // 2 + STRIP_FRAMES)
    for mode in MODES:
        class_maps, by_mode[mode], cost = decide(seg, outputs, frames, mode, alpha, keep=picks)
        meter = FlickerMeter()
        for frame, classes in zip(frames, class_maps):
            meter.update(frame, classes)
        rows[mode] = {"flicker": meter.flicker, **cost}
    if strip is not None:
        write_strip(seg, frames, by_mode, strip)
    return {"video": str(path), "frames": len(frames), **rows}


def write_strip(seg: Segmenter, frames, by_mode: dict[str, dict], path: Path) -> None:
    """Consecutive frames side by side, one row per mode, each with its mask drawn over it, at half size."""
    rows = []
    for mode, results in by_mode.items():
        tiles = []
        for i, result in sorted(results.items()):
            tile = seg.render(frames[i], result)
            tile = cv2.resize(tile, (tile.shape[1] // 2, tile.shape[0] // 2), interpolation=cv2.INTER_AREA)
            cv2.putText(tile, f"{mode} frame {i}", (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
            tiles.append(tile)
        rows.append(np.hstack(tiles))
    write_image(path, np.vstack(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--size", default="480x640", help="synthetic frame size HxW")
    ap.add_argument("--seed", type=int, default=11, help="which synthetic scene (its objects, colours and motion)")
    ap.add_argument("--alpha", type=float, default=TemporalOptions().alpha)
    ap.add_argument("--video", type=Path)
    ap.add_argument("--strip", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    load_before = load_average()
    with Segmenter.load(args.model, "ort-cpu", threads=args.threads, fuse_argmax=False) as seg:
        report = {"model": str(args.model), "alpha": args.alpha,
                  "environment": describe(environment(threads=args.threads)),
                  "synthetic": {"size": [h, w], "frames": args.frames, "seed": args.seed,
                                **synthetic(seg, args.frames, (h, w), args.alpha, args.seed)}}
        if args.video is not None:
            report["video"] = real_video(seg, args.video, args.frames, args.alpha, args.strip)
    report["load_average"] = {"before": load_before, "after": load_average()}
    for mode, row in report["synthetic"].items():
        if mode in MODES:
            print(f"synthetic {mode:5s} flicker {row['flicker']:.5f} static {row['flicker_static']:.5f} lag "
                  f"{row['lag_frames']} mIoU {row['miou']:.4f} stabilizer {row['ms_p50']:.2f} ms p50 "
                  f"({row['ms_p90']:.2f} p90, {row['cpu_ms_p50']:.2f} CPU)")
    if "video" in report:
        v = report["video"]
        print(f"video {Path(v['video']).name} ({v['frames']} frames): " + ", ".join(
            f"{m} flicker {v[m]['flicker']:.5f} ({v[m]['ms_p50']:.2f} ms p50, {v[m]['ms_p90']:.2f} p90, "
            f"{v[m]['cpu_ms_p50']:.2f} CPU)"
            for m in MODES))
    print(f"load average before {report['load_average']['before']}, after {report['load_average']['after']}")
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
