"""This machine's own ceilings: float32 GEMM throughput and memory bandwidth.

Reports state efficiency as a share of these (achieved GFLOP/s / GEMM GFLOP/s). The GEMM ceiling is the faster of
numpy's matmul (OpenBLAS, or the BLAS numpy was built with) and ONNX Runtime's MatMul with the same threads: on
CPUs where the BLAS does not use every vector extension (OpenBLAS on AVX-512 AMD CPUs, for one), ONNX Runtime's own
kernels are faster, and a model would otherwise show more than 100% of the "ceiling". BLAS reads its thread count
at load time, so `measure_ceiling` runs the measurement in a fresh interpreter with the thread variables set.

    python -m edgepix.benchmarks.ceiling --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from edgepix.runtime.core.cpuinfo import usable_cores

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Ceiling:
    threads: int
    gemm_gflops: float  # best float32 matmul throughput over the sizes tried
    gemm_size: int  # the matrix side that reached it
    memory_gbps: float  # large-array copy, bytes read + written per second
    gemm_library: str = "numpy"  # whose matmul reached it: numpy or onnxruntime

    def as_dict(self) -> dict:
        return asdict(self)


def best_seconds(call, duration: float) -> float:
    """The fastest of repeated `call()`s within `duration` seconds (after one untimed warm-up call): the ceiling is
    what the machine can do, so the minimum, not a percentile."""
    call()
    best = float("inf")
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _gemm_gflops(n: int, duration: float) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    return 2.0 * n**3 / best_seconds(lambda: np.matmul(a, b, out=c), duration) / 1e9


def gemm_session(threads: int, n: int):
    """An ONNX Runtime session computing one float32 n x n by n x n MatMul with `threads` intra-op threads, and a
    call that runs it."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.force_spinning_stop", "1")
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    return lambda: session.run(None, feed)


def ort_gemm_gflops(threads: int, n: int = 1024, duration: float = 1.5) -> float:
    """Best float32 MatMul throughput of ONNX Runtime (n x n by n x n) with `threads` intra-op threads."""
    return 2.0 * n**3 / best_seconds(gemm_session(threads, n), duration) / 1e9


def _memory_gbps(duration: float, megabytes: int = 256) -> float:
    import numpy as np

    src = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_seconds(lambda: np.copyto(dst, src), duration) / 1e9


def measure_here(threads: int, *, duration: float = 1.0) -> Ceiling:
    """Measure in this process (its BLAS thread count must already be `threads`)."""
    results = {("numpy", n): _gemm_gflops(n, duration / 6) for n in (512, 1024, 2048)}
    try:
        results.update({("onnxruntime", n): ort_gemm_gflops(threads, n, duration / 6) for n in (512, 1024, 2048)})
    except ImportError:  # onnx (to build the one-node graph) or onnxruntime missing: numpy's alone
        pass
    library, size = max(results, key=results.get)
    return Ceiling(threads, round(results[(library, size)], 1), size, round(_memory_gbps(duration / 2), 1), library)


def measure_ceiling(threads: int, *, duration: float = 1.0) -> Ceiling:
    """Measure in a fresh interpreter whose BLAS uses `threads` threads."""
    env = {**os.environ, **{v: str(threads) for v in THREAD_VARIABLES}}
    out = subprocess.run([sys.executable, "-m", "edgepix.benchmarks.ceiling", "--threads", str(threads),
                          "--duration", str(duration), "--json", "--here"],
                         env=env, capture_output=True, text=True, check=True, timeout=120).stdout
    return Ceiling(**json.loads(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)  # already in the child
    args = parser.parse_args(argv)
    ceiling = measure_here(args.threads, duration=args.duration) if args.here else measure_ceiling(
        args.threads, duration=args.duration)
    if args.json:
        print(json.dumps(ceiling.as_dict()))
    else:
        print(f"GEMM float32: {ceiling.gemm_gflops:.1f} GFLOP/s ({ceiling.gemm_library}, n={ceiling.gemm_size}, "
              f"{ceiling.threads} threads); "
              f"memory copy: {ceiling.memory_gbps:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
