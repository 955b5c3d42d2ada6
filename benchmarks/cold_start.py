"""Cold start: a fresh process that imports edgepix.runtime, loads the default model and segments one frame.

    python -m edgepix.benchmarks.cold_start [--model M.onnx] [--runs 5] [--backend auto] [--size 576 768]
                                            [--json out.json]

Each run is a new interpreter (`python -c ...`, as a user's script would be) that imports `edgepix.runtime`,
loads the model with `Segmenter.load`, reads a 768x576 PNG frame with OpenCV, segments and renders it, and exits.
The parent measures the wall time from spawning the process to its exit (interpreter start-up included) and reads
the child's peak resident set size from `os.wait4` (ru_maxrss, which Linux reports in KiB); the child reports its
own phase times and whether torch was imported. Goals: under 1 s and under 150 MB. Without --model the default
model is exported once (fastscnn, 6 classes, 512x512 FP32; see segmenter_breakdown.py); that step is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import time
t0 = time.perf_counter()
import sys, json
import edgepix.runtime
from edgepix.runtime import Segmenter
t1 = time.perf_counter()
seg = Segmenter.load(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
import cv2
frame = cv2.imread(sys.argv[3], cv2.IMREAD_COLOR)
result = seg.segment(frame)
image = seg.render(frame, result)
t3 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "first_frame_ms": (t3 - t2) * 1e3,
                  "backend": seg.backend.description, "class_map": list(result.class_map.shape),
                  "torch_imported": "torch" in sys.modules}))
"""


def run_once(model: Path, backend: str, frame_png: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(model), backend, str(frame_png)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = proc.stdout.read()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"cold-start child failed (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
    report = json.loads(out.strip().splitlines()[-1])
    report.update(wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="an edgepix ONNX segmentation model (default: fastscnn 512x512)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=2, default=(576, 768), metavar=("H", "W"))
    ap.add_argument("--json", type=Path, help="also write the runs as JSON")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    import cv2

    from edgepix.benchmarks.segmenter_breakdown import ensure_default_model
    from edgepix.runtime.data.synthetic import SceneConfig, make_scene

    model = args.model or ensure_default_model()
    with tempfile.TemporaryDirectory(prefix="edgepix-cold-") as tmp:
        frame_png = Path(tmp) / "frame.png"
        cv2.imwrite(str(frame_png), make_scene(0, SceneConfig(size=tuple(args.size)))[0])
        runs = [run_once(model, args.backend, frame_png) for _ in range(args.runs)]
    print(f"model    {model}")
    print(f"backend  {runs[0]['backend']}")
    print(f"{'run':<5}{'wall s':>8}{'peak RSS MB':>13}{'import ms':>11}{'load ms':>9}{'1st frame ms':>14}  torch")
    for i, r in enumerate(runs):
        print(f"{i + 1:<5}{r['wall_s']:>8.3f}{r['peak_rss_mb']:>13.1f}{r['import_ms']:>11.1f}{r['load_ms']:>9.1f}"
              f"{r['first_frame_ms']:>14.1f}  {'yes' if r['torch_imported'] else 'no'}")
    wall = [r["wall_s"] for r in runs]
    rss = [r["peak_rss_mb"] for r in runs]
    print(f"median wall {statistics.median(wall):.3f} s (max {max(wall):.3f}), median peak RSS "
          f"{statistics.median(rss):.1f} MB (max {max(rss):.1f}); goals < 1 s and < 150 MB, {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
