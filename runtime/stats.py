"""Latency statistics as benchmark reports and the stream pipeline need them: percentiles, not means alone.

Lives in the runtime (which ships to devices and imports no sibling package); `edgepix.benchmarks.stats`
re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linearly interpolated (numpy's default method)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


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
        values = sorted(float(v) for v in samples_ms)
        if not values:
            raise ValueError("no latency samples")
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
        return cls(n, values[0], mean, percentile(values, 50), percentile(values, 90), percentile(values, 95),
                   percentile(values, 99), values[-1], std)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def relative_spread(a: float, b: float) -> float:
    """|a - b| relative to their mean: how far two runs of the same configuration disagree."""
    mean = (a + b) / 2
    return abs(a - b) / mean if mean else 0.0
