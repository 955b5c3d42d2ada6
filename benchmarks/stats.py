"""Latency statistics: re-exported from `edgepix.runtime.core.stats`, where the stream pipeline can use them too
(the runtime imports no sibling package)."""

from edgepix.runtime.core.stats import LatencyStats, relative_spread

__all__ = ["LatencyStats", "relative_spread"]
