"""Latency statistics as benchmark reports and the stream pipeline need them: percentiles, not means alone.

Lives in the runtime (which ships to devices and imports no sibling package); `edgepix.benchmarks.stats`
re-exports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-call latencies in milliseconds."""

    n: int
    min: float
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    std: float  # population standard deviation

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        values = np.asarray(list(samples_ms), np.float64)
        if values.size == 0:
            raise ValueError("no latency samples")
        p50, p90, p95, p99 = (float(v) for v in np.percentile(values, (50, 90, 95, 99)))  # linear interpolation
        return cls(int(values.size), float(values.min()), float(values.mean()), p50, p90, p95, p99,
                   float(values.max()), float(values.std()))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def relative_spread(a: float, b: float) -> float:
    """|a - b| relative to their mean: how far two runs of the same configuration disagree."""
    mean = (a + b) / 2
    return abs(a - b) / mean if mean else 0.0
