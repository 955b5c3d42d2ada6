#!/usr/bin/env bash
# The whole TensorRT path on a machine with an NVIDIA GPU and TensorRT:
#   1. export the FP32 reference ONNX, then FP16 and INT8 (Q/DQ, S8S8) engines from CHECKPOINT (each ONNX passes the
#      parity gate against PyTorch; each engine is checked against ONNX Runtime as it is built);
#   2. a second FP16 build with the same inputs must come from the engine cache;
#   3. compare both engines with ONNX Runtime CPU on the FP32 ONNX: argmax agreement >= 99.5% (FP16), mIoU drop
#      <= 1 point (INT8);
#   4. benchmark them (p50/p90/p99, H2D / compute / D2H as trtexec reports them), plain and with a CUDA graph;
#   5. `edgepix doctor --engines` on the output folder.
# Elsewhere it prints why it skipped and exits 0.
#
# Usage: benchmarks/gpu_check.sh CHECKPOINT [OUT_DIR]     (PYTHON=... to choose the interpreter)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$here/.venv/bin/python" ]]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi

skip() { echo "gpu_check: skipped: $1"; exit 0; }

# What is missing, if anything (no GPU first: that is the common case).
reason="$("$PYTHON" - <<'EOF'
import importlib.util
from edgepix.runtime.engine_manifest import running_device_facts
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

echo "== environment"
ep doctor | grep -E '^(tensorrt|cuda-python|gpu|engines|onnxruntime) '

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

echo "== engines vs ONNX Runtime CPU (FP32 ONNX), and benchmarks"
"$PYTHON" - "$out" <<'EOF'
import json, sys
from pathlib import Path
from edgepix.export.tensorrt import bench_engine, compare_engine

out = Path(sys.argv[1])
failed = False
results = {}
for name in ("model.fp16.engine", "model.int8.engine"):
    report = compare_engine(out / name, out / "model.onnx", n=50)
    print(report.format())
    failed |= not report.passed
    results[name] = {"passed": report.passed, "checks": {c.name: c.measured for c in report.checks}, **report.info}
    for graph in (False, True):
        stats = bench_engine(out / name, cuda_graph=graph)
        label = f"{name}{' (CUDA graph)' if graph else ''}"
        print(f"  {label:<32} p50 {stats['p50_ms']:.3f} ms  p90 {stats['p90_ms']:.3f}  p99 {stats['p99_ms']:.3f}  "
              f"H2D {stats.get('h2d_ms', float('nan')):.3f}  compute {stats.get('compute_ms', float('nan')):.3f}  "
              f"D2H {stats.get('d2h_ms', float('nan')):.3f}")
        results[name]["bench" + ("_graph" if graph else "")] = stats
(out / "gpu_check.json").write_text(json.dumps(results, indent=2))
print(f"wrote {out / 'gpu_check.json'}")
sys.exit(1 if failed else 0)
EOF

echo "== doctor --engines"
ep doctor --engines "$out" | tail -n 5
echo "gpu_check: PASS"
