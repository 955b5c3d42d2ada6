import numpy as np
import pytest

from edgepix.benchmarks.stats import LatencyStats, relative_spread


def test_percentiles_match_numpy_on_known_inputs():
    values = list(range(1, 101))  # 1..100 ms
    stats = LatencyStats.from_samples(reversed(values))
    assert stats.n == 100 and stats.min == 1 and stats.max == 100
    assert stats.p50 == pytest.approx(50.5) and stats.p90 == pytest.approx(90.1) and stats.p99 == pytest.approx(99.01)
    assert stats.mean == pytest.approx(50.5) and stats.std == pytest.approx(np.std(values))
    rng = np.random.default_rng(1)
    sample = rng.lognormal(1.0, 0.5, size=337)
    s = LatencyStats.from_samples(sample)
    for q, v in ((50, s.p50), (90, s.p90), (95, s.p95), (99, s.p99)):
        assert v == pytest.approx(np.percentile(sample, q))


def test_single_sample_and_errors():
    s = LatencyStats.from_samples([3.0])
    assert s.p50 == s.p99 == s.min == s.max == 3.0 and s.std == 0
    with pytest.raises(ValueError):
        LatencyStats.from_samples([])


def test_relative_spread():
    assert relative_spread(10.0, 11.0) == pytest.approx(1 / 10.5)
    assert relative_spread(0.0, 0.0) == 0.0
