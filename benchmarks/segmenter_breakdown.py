"""Where a Segmenter's time goes per frame: pre-processing, inference, post-processing, rendering.

    python -m edgepix.benchmarks.segmenter_breakdown [--model M.onnx] [--frames 50] [--warmup 5] [--backend auto]
                                                     [--size 576 768] [--threads N] [--no-fuse-argmax] [--no-spin]
                                                     [--json out.json]

Without --model it exports the default model (fastscnn, 6 synthetic classes, 512x512 FP32, seed 0) once into the
edgepix cache (needs torch; weights do not change the timing of a CNN). Frames are synthetic moving scenes of
--size (H W; 576x768 by default), made before timing. Each stage is timed per frame from the timings
`segment()` records (and `render()`), the calls an application makes, and reported as median and p90 over the
timed frames; the share line is (pre + post + render) / total, from the medians and from the means. The goal
is a share under 25%. By default the ONNX Runtime backends compute the argmax inside the graph
(`Segmenter.load(fuse_argmax=True)`), so it is counted in `infer`; --no-fuse-argmax moves it to `postprocess`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

DEFAULT_CLASSES = 6
DEFAULT_SIZE = (512, 512)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEPIX_CACHE", Path.home() / ".cache" / "edgepix")) / "bench"


def ensure_default_model(path: Path | None = None, *, size: tuple[int, int] = DEFAULT_SIZE) -> Path:
    """The default model as an ONNX file (fastscnn, 6 classes, FP32, static batch 1; input `size` (H, W), 512x512
    unless told), exported on first use."""
    path = path or cache_dir() / f"fastscnn-{DEFAULT_CLASSES}c-{size[0]}x{size[1]}-fp32.onnx"
    if path.exists():
        return path
    import torch

    from edgepix.export.to_onnx import OnnxExportOptions, export_onnx
    from edgepix.runtime.data.synthetic import CLASS_NAMES, PALETTE
    from edgepix.runtime.description.spec import ModelSpec
    from edgepix.train.registry import create_model

    torch.manual_seed(0)
    model = create_model("fastscnn", num_classes=DEFAULT_CLASSES).eval()
    spec = ModelSpec(task="segmentation", model_name="fastscnn", input_size=size, class_names=CLASS_NAMES,
                     palette=PALETTE)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, spec, path, OnnxExportOptions(imgsz=size))
    return path


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def measure(model: Path, *, backend: str, frames: int, warmup: int, size: tuple[int, int],
            threads: int | None, spin_wait: bool | None = None, fuse_argmax: bool = True) -> dict:
    import cv2

    from edgepix.runtime.data.synthetic import MovingScene, SceneConfig
    from edgepix.runtime.tasks.segmenter import Segmenter

    options: dict = {"threads": threads} if threads else {}
    if spin_wait is not None:
        options["spin_wait"] = spin_wait
    seg = Segmenter.load(model, backend, fuse_argmax=fuse_argmax, **options)
    scene = MovingScene(seed=0, config=SceneConfig(size=size))
    images = [scene.next()[0] for _ in range(frames + warmup)]
    stages: dict[str, list[float]] = {"preprocess": [], "infer": [], "postprocess": [], "render": []}
    totals: list[float] = []
    for i, frame in enumerate(images):
        # Exactly what an application runs: segment() (its own stage timings) then render().
        t0 = time.perf_counter()
        result = seg.segment(frame)
        seg.render(frame, result)
        t1 = time.perf_counter()
        if i < warmup:
            continue
        for key, value in result.timings.as_dict().items():
            if key in stages:
                stages[key].append(value)
        totals.append((t1 - t0) * 1e3)
    p50 = {k: statistics.median(v) for k, v in stages.items()}
    mean = {k: statistics.fmean(v) for k, v in stages.items()}
    overhead_keys = ("preprocess", "postprocess", "render")
    report = {
        "model": str(model),
        "backend": seg.backend.description,
        "frame_size": list(size),
        "input_size": list(seg.input_size),
        "frames": frames,
        "spin_wait": spin_wait,
        "warmup": warmup,
        "opencv_threads": cv2.getNumThreads(),
        "stages_ms": {k: {"p50": p50[k], "p90": _p(v, 0.9), "mean": mean[k]} for k, v in stages.items()},
        "total_ms": {"p50": statistics.median(totals), "p90": _p(totals, 0.9), "mean": statistics.fmean(totals)},
        "share_p50": sum(p50[k] for k in overhead_keys) / sum(p50.values()),
        "share_mean": sum(mean[k] for k in overhead_keys) / sum(mean.values()),
    }
    seg.close()
    return report


def format_report(r: dict) -> str:
    lines = [f"model    {r['model']}", f"backend  {r['backend']}",
             f"frames   {r['frames']} timed after {r['warmup']} warm-up, "
             f"frame {r['frame_size'][1]}x{r['frame_size'][0]}"
             f" -> input {r['input_size'][1]}x{r['input_size'][0]}, OpenCV threads {r['opencv_threads']}",
             f"{'stage':<12}{'p50 ms':>9}{'p90 ms':>9}{'mean ms':>9}"]
    for k, s in r["stages_ms"].items():
        lines.append(f"{k:<12}{s['p50']:>9.2f}{s['p90']:>9.2f}{s['mean']:>9.2f}")
    t = r["total_ms"]
    lines.append(f"{'total':<12}{t['p50']:>9.2f}{t['p90']:>9.2f}{t['mean']:>9.2f}")
    lines.append(f"pre + post + render share of the frame time: {100 * r['share_p50']:.1f}% (medians), "
                 f"{100 * r['share_mean']:.1f}% (means); goal < 25%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="an edgepix ONNX segmentation model (default: fastscnn 512x512)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=2, default=(576, 768), metavar=("H", "W"))
    ap.add_argument("--threads", type=int, help="backend threads (default: the backend's own default)")
    ap.add_argument("--no-spin", action="store_true",
                    help="ONNX Runtime backends: worker threads sleep between calls instead of spinning")
    ap.add_argument("--no-fuse-argmax", action="store_true",
                    help="take the argmax in the post-processing stage instead of inside the ONNX Runtime graph")
    ap.add_argument("--json", type=Path, help="also write the report as JSON")
    args = ap.parse_args(argv)
    if args.frames < 1 or args.warmup < 0:
        ap.error("--frames must be >= 1 and --warmup >= 0")
    model = args.model or ensure_default_model()
    report = measure(model, backend=args.backend, frames=args.frames, warmup=args.warmup, size=tuple(args.size),
                     threads=args.threads, spin_wait=False if args.no_spin else None,
                     fuse_argmax=not args.no_fuse_argmax)
    try:
        from edgepix.benchmarks.environment import describe, environment

        report["environment"] = environment(threads=args.threads)
        env_line = describe(report["environment"])
    except ImportError:
        env_line = ""
    print(format_report(report))
    if env_line:
        print(f"machine  {env_line}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
