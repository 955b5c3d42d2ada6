"""This machine's own ceilings: float32 GEMM throughput and memory bandwidth.

Reports state efficiency as a share of these (achieved GFLOP/s / GEMM GFLOP/s). The GEMM is numpy's (OpenBLAS or
the BLAS numpy was built with); BLAS reads its thread count at load time, so `measure_ceiling` runs the
measurement in a fresh interpreter with the thread variables set.

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

from edgepix.runtime.cpuinfo import usable_cores

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Ceiling:
    threads: int
    gemm_gflops: float  # best float32 matmul throughput over the sizes tried
    gemm_size: int  # the matrix side that reached it
    memory_gbps: float  # large-array copy, bytes read + written per second

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


def _memory_gbps(duration: float, megabytes: int = 256) -> float:
    import numpy as np

    src = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_seconds(lambda: np.copyto(dst, src), duration) / 1e9


def measure_here(threads: int, *, duration: float = 1.0) -> Ceiling:
    """Measure in this process (its BLAS thread count must already be `threads`)."""
    results = {n: _gemm_gflops(n, duration / 3) for n in (512, 1024, 2048)}
    size = max(results, key=results.get)
    return Ceiling(threads, round(results[size], 1), size, round(_memory_gbps(duration / 2), 1))


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
        print(f"GEMM float32: {ceiling.gemm_gflops:.1f} GFLOP/s (n={ceiling.gemm_size}, {ceiling.threads} threads); "
              f"memory copy: {ceiling.memory_gbps:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
