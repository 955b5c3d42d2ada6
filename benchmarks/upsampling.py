"""How a segmentation output should reach the frame: `upsample` scores against classes, in accuracy and time.

    python -m edgepix.benchmarks.upsampling MODEL.onnx [MODEL2.onnx ...] [--frames 100] [--size 640x480]
        [--json FILE]

Each model segments the same moving synthetic scene (runtime.data.synthetic.MovingScene, whose masks are exact)
at the frame size, once per mode, on one thread:

- `scores`: the scores resized bilinearly to the frame, then the argmax (or threshold) there;
- `classes`: the argmax at the model's size, the class map resized nearest (computed in numpy/OpenCV here, not
  fused into the graph, so that the postprocess column holds the whole decision in both modes).

A model with two classes (a binary foreground model) is scored against "anything not background" (mask != 0).
Reported per model and mode: mIoU against the exact masks over all frames, the postprocess milliseconds per frame
(median and p90: crop, resize, decision) and, for scale, the inference's median; with the CPU, its AVX2/AVX-512
flags and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np


def measure(model: Path, mode: str, *, frames: int, size: tuple[int, int], seed: int = 7) -> dict:
    """mIoU and postprocess ms per frame for one model in one upsampling mode."""
    from edgepix.runtime.data.metrics import ConfusionMatrix
    from edgepix.runtime.data.synthetic import MovingScene, SceneConfig
    from edgepix.runtime.tasks.segmenter import Segmenter

    w, h = size
    with Segmenter.load(model, "ort-cpu", fuse_argmax=False, upsample=mode, threads=1) as seg:
        cm = ConfusionMatrix(seg.num_classes, seg.spec.ignore_index)
        post_ms, infer_ms = [], []
        binary = seg.num_classes == 2
        for image, mask in MovingScene(seed=seed, config=SceneConfig(size=(h, w))).frames(frames):
            result = seg.segment(image)
            cm.update(result.class_map, (mask != 0).astype(np.uint8) if binary else mask)
            post_ms.append(result.timings.postprocess)
            infer_ms.append(result.timings.infer)
        spec = seg.spec
    return {"model": model.name, "input": f"{spec.input_size[0]}x{spec.input_size[1]}", "mode": mode,
            "classes": spec.num_classes, "kind": spec.output_kind.value, "miou": cm.miou(),
            "post_ms_p50": statistics.median(post_ms), "post_ms_p90": float(np.percentile(post_ms, 90)),
            "infer_ms_p50": statistics.median(infer_ms), "frames": frames}


def machine() -> str:
    """The CPU, its AVX2 / AVX-512F flags and the load average, as the docs quote them."""
    from .environment import cpu_model

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu_model()}, avx2 {'yes' if 'avx2' in flags else 'no'}, avx512f "
            f"{'yes' if 'avx512f' in flags else 'no'}, {os.cpu_count()} CPUs, load average {load}")


def table(rows: list[dict]) -> str:
    lines = ["| model | output | input | upsample | mIoU | postprocess ms p50 | p90 | (infer ms p50) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['classes']} classes, {r['kind']} | {r['input']} | {r['mode']} | "
                     f"{r['miou']:.4f} | {r['post_ms_p50']:.2f} | {r['post_ms_p90']:.2f} | {r['infer_ms_p50']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="exported segmentation models (.onnx)")
    p.add_argument("--frames", type=int, default=100, help="frames of the moving scene per run (default 100)")
    p.add_argument("--size", default="640x480", help="frame size WxH (default 640x480)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the rows and the machine as JSON")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    before = machine()
    rows = [measure(m, mode, frames=args.frames, size=(w, h)) for m in args.models for mode in ("scores", "classes")]
    print(f"machine: {before}")
    print(f"frames: {args.frames} of a {w}x{h} moving synthetic scene per row; ONNX Runtime CPU, 1 thread")
    print(table(rows))
    after = machine()
    print(f"after: {after}", file=sys.stderr)
    if args.json:
        from edgepix.runtime.core.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({"machine_before": before, "machine_after": after,
                                                 "frames": args.frames, "size": [w, h], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
