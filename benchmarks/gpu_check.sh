#!/usr/bin/env bash
# The whole TensorRT path on a machine with an NVIDIA GPU and TensorRT:
#   1. export the FP32 reference ONNX, then FP16 and INT8 (Q/DQ, S8S8) engines from CHECKPOINT (each ONNX passes the
#      parity gate against PyTorch; each engine is checked against ONNX Runtime as it is built);
#   2. a second FP16 build with the same inputs must come from the engine cache;
#   3. compare both engines with ONNX Runtime CPU on the FP32 ONNX: argmax agreement >= 99.5% (FP16), mIoU drop
#      <= 1 point (INT8);
#   4. benchmark them (p50/p90/p99, H2D / compute / D2H as trtexec reports them, enqueue), plain and with a CUDA graph;
#   5. a dynamic-batch ONNX built with a fixed batch (--batch 4): the engine reports the batch as dynamic (-1), so the
#      backend must take "fixed" from the profile; the CUDA graph must be used and be faster than the plain path;
#   6. implicit INT8 calibration with an OPT batch > 1 (--batch 1 4 8; TensorRT 10 only, 11 removed it): TensorRT
#      calibrates at the OPT shape, and the engine must pass the INT8 check;
#   7. when trtexec is on the PATH: its H2D / GPU compute / D2H / enqueue means next to ours for the same engines;
#   8. `edgepix doctor --engines` on the output folder.
# Steps that cannot run here (TensorRT 11 and calibration, no trtexec) are skipped with the reason, and listed at
# the end. Without a GPU, TensorRT or cuda-python it prints why it skipped everything and exits 0.
#
# Usage: benchmarks/gpu_check.sh CHECKPOINT [OUT_DIR]     (PYTHON=... to choose the interpreter, TRTEXEC=... trtexec)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$here/.venv/bin/python" ]]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi

skip() { echo "gpu_check: skipped: $1"; exit 0; }

# What is missing, if anything (no GPU first: that is the common case).
reason="$("$PYTHON" - <<'EOF'
import importlib.util
from edgepix.runtime.backends.tensorrt.manifest import running_device_facts
facts = running_device_facts()
if not facts.gpu:
    print("no NVIDIA GPU visible (nvidia-smi / cuda-python found none); TensorRT engines need one")
elif importlib.util.find_spec("tensorrt") is None:
    print("no TensorRT (pip install 'edgepix[gpu]'; on Jetson it comes with JetPack)")
elif not any(importlib.util.find_spec(m.split('.')[0]) and importlib.util.find_spec(m) for m in ("cuda.bindings", "cuda.cudart")):
    print("no cuda-python (pip install 'edgepix[gpu]')")
EOF
)"
[[ -z "$reason" ]] || skip "$reason"

ckpt="${1:-}"
if [[ -z "$ckpt" ]]; then
    echo "usage: $0 CHECKPOINT [OUT_DIR]   (e.g. a checkpoint from edgepix train seg)" >&2
    exit 2
fi
out="${2:-gpu_check_out}"
mkdir -p "$out"
ep() { "$PYTHON" -m edgepix "$@"; }
skipped=()
failed=0

echo "== environment"
ep doctor | grep -E '^(tensorrt|cuda-python|gpu|engines|onnxruntime) ' || true
trt_major="$("$PYTHON" -c 'import tensorrt; print(tensorrt.__version__.split(".")[0])')"

echo "== FP32 reference ONNX"
ep export "$ckpt" --format onnx --out "$out/model.onnx"

echo "== FP16 engine (from the FP16 ONNX)"
ep export "$ckpt" --format engine --precision fp16 --out "$out/model.fp16.engine" \
    --cache "$out/cache" --timing-cache "$out/timing.cache"

echo "== INT8 engine (from the S8S8 Q/DQ ONNX)"
ep export "$ckpt" --format engine --precision int8 --out "$out/model.int8.engine" \
    --cache "$out/cache" --timing-cache "$out/timing.cache"

echo "== the same FP16 build again must come from the cache"
again="$(ep export "$out/model.fp16.onnx" --format engine --precision fp16 --out "$out/again.fp16.engine" \
    --cache "$out/cache" --no-verify)"
echo "$again"
if ! grep -q "reused from the engine cache" <<<"$again"; then
    echo "gpu_check: FAIL: the second identical build did not reuse the cached engine" >&2
    exit 1
fi

echo "== dynamic-batch FP16 ONNX built with a fixed batch of 4"
ep export "$ckpt" --format onnx-fp16 --dynamic-batch --out "$out/model.dynbatch.fp16.onnx"
# --no-verify: the engine check feeds one image, and this engine takes exactly 4
ep export "$out/model.dynbatch.fp16.onnx" --format engine --precision fp16 --batch 4 \
    --out "$out/model.batch4.fp16.engine" --cache "$out/cache" --timing-cache "$out/timing.cache" --no-verify

if (( trt_major <= 10 )); then
    echo "== implicit INT8 calibration at an OPT batch of 4 (--batch 1 4 8, 64 calibration images)"
    ep export "$ckpt" --format engine --precision int8 --int8-mode calibrate --dynamic-batch --batch 1 4 8 \
        --calib-n 64 --out "$out/model.int8cal.engine" --cache "$out/cache" --timing-cache "$out/timing.cache"
else
    skipped+=("implicit INT8 calibration: TensorRT $trt_major removed it (INT8 comes from the Q/DQ ONNX)")
fi

echo "== engines vs ONNX Runtime CPU (FP32 ONNX), and benchmarks"
"$PYTHON" - "$out" <<'EOF' || failed=1
import json, sys
from pathlib import Path
from edgepix.export.tensorrt import bench_engine, compare_engine

out = Path(sys.argv[1])
failed = False
results = {}


def line(label, stats):
    return (f"  {label:<34} p50 {stats['p50_ms']:.3f} ms  p90 {stats['p90_ms']:.3f}  p99 {stats['p99_ms']:.3f}  "
            f"H2D {stats.get('h2d_ms', float('nan')):.3f}  compute {stats.get('compute_ms', float('nan')):.3f}  "
            f"D2H {stats.get('d2h_ms', float('nan')):.3f}  enqueue {stats.get('enqueue_ms', float('nan')):.3f}")


checked = ["model.fp16.engine", "model.int8.engine"]
if (out / "model.int8cal.engine").is_file():
    checked.append("model.int8cal.engine")
for name in checked:
    report = compare_engine(out / name, out / "model.onnx", n=50)
    print(report.format())
    failed |= not report.passed
    results[name] = {"passed": report.passed, "checks": {c.name: c.measured for c in report.checks}, **report.info}
    for graph in (False, True):
        stats = bench_engine(out / name, cuda_graph=graph)
        print(line(f"{name}{' (CUDA graph)' if graph else ''}", stats))
        results[name]["bench" + ("_graph" if graph else "")] = stats

# A dynamic-batch ONNX built with --batch 4: TensorRT reports the batch as -1, the profile fixes it at 4.
name = "model.batch4.fp16.engine"
plain, graph = bench_engine(out / name, cuda_graph=False), bench_engine(out / name, cuda_graph=True)
print(line(name, plain))
print(line(f"{name} (CUDA graph)", graph))
used, faster = graph["cuda_graph_used"] == 1.0, graph["p50_ms"] < plain["p50_ms"]
print(f"  CUDA graph used: {'yes' if used else 'NO'}; p50 {plain['p50_ms']:.3f} -> {graph['p50_ms']:.3f} ms "
      f"({plain['p50_ms'] / graph['p50_ms']:.2f}x): {'faster' if faster else 'NOT faster'}")
failed |= not (used and faster)
results[name] = {"bench": plain, "bench_graph": graph, "cuda_graph_used": used, "graph_faster": faster}

(out / "gpu_check.json").write_text(json.dumps(results, indent=2))
print(f"wrote {out / 'gpu_check.json'}")
sys.exit(1 if failed else 0)
EOF

trtexec_bin="${TRTEXEC:-$(command -v trtexec || true)}"
if [[ -z "$trtexec_bin" && -x /usr/src/tensorrt/bin/trtexec ]]; then trtexec_bin=/usr/src/tensorrt/bin/trtexec; fi
if [[ -n "$trtexec_bin" ]]; then
    echo "== per-stage means: edgepix vs trtexec ($trtexec_bin), same engines, same shapes"
    "$PYTHON" - "$out" "$trtexec_bin" <<'EOF' || failed=1
import json, re, subprocess, sys
from pathlib import Path
from edgepix.runtime.backends.tensorrt.manifest import read_manifest

out, trtexec = Path(sys.argv[1]), sys.argv[2]
ours = json.loads((out / "gpu_check.json").read_text())
stages = (("H2D Latency", "h2d_ms"), ("GPU Compute Time", "compute_ms"), ("D2H Latency", "d2h_ms"),
          ("Enqueue Time", "enqueue_ms"))
failed = False
for name, stats in ours.items():
    engine = out / name
    manifest = read_manifest(engine)
    cmd = [trtexec, f"--loadEngine={engine}", "--warmUp=500", "--duration=5"]
    if any(d < 0 for t in manifest.io if t.mode == "input" for d in t.shape):  # dynamic inputs: the shape we timed
        cmd.append("--shapes=" + ",".join(f"{p.input}:{'x'.join(map(str, p.opt))}" for p in manifest.profiles[0]))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        print(f"  {name}: trtexec could not run it (exit {r.returncode}; a trtexec from another TensorRT version "
              f"cannot load this engine): {tail}")
        failed = True
        continue
    theirs = {key: float(m.group(1)) for label, key in stages
              if (m := re.search(rf"{label}: .*?mean = ([0-9.eE+-]+) ms", r.stdout))}
    print(f"  {name} (ms, means)     " + "  ".join(f"{key[:-3]:>8}" for _, key in stages))
    print("    edgepix             " + "  ".join(f"{stats['bench'].get(key, float('nan')):8.4f}" for _, key in stages))
    print("    trtexec             " + "  ".join(f"{theirs.get(key, float('nan')):8.4f}" for _, key in stages))
sys.exit(1 if failed else 0)
EOF
else
    # trtexec comes with TensorRT's tar/deb packages and JetPack (/usr/src/tensorrt/bin); the pip wheels lack it
    skipped+=("edgepix vs trtexec stage timings: no trtexec on the PATH (set TRTEXEC=/path/to/trtexec)")
fi

echo "== doctor --engines"
ep doctor --engines "$out" | tail -n 8 || true

for s in "${skipped[@]+"${skipped[@]}"}"; do echo "gpu_check: skipped: $s"; done
if (( failed )); then
    echo "gpu_check: FAIL (see above)"
    exit 1
fi
echo "gpu_check: PASS"
