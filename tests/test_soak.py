"""The soak benchmark (benchmarks/soak.py): the RSS slope and its confidence interval, bounded bookkeeping, and a
short run through the code `edgepix segment` runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepix.benchmarks.soak import (
    RingBuffer,
    RssSampler,
    TrendFit,
    main,
    residual_lag1_autocorrelation,
    t_quantile_975,
)


def fit(x, y) -> TrendFit:
    f = TrendFit()
    for a, b in zip(x, y):
        f.add(float(a), float(b))
    return f


@pytest.mark.parametrize(("df", "exact"), [(1, 12.7062), (4, 2.7764), (10, 2.2281), (30, 2.0423), (35, 2.0301),
                                           (45, 2.0141), (70, 1.9944), (200, 1.9719), (1000, 1.9623)])
def test_t_quantiles_from_the_table_and_between_its_rows(df, exact):
    assert t_quantile_975(df) == pytest.approx(exact, abs=5e-4)


def test_t_quantile_needs_a_degree_of_freedom():
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_a_known_slope_is_found_with_an_interval_that_contains_it():
    rng = np.random.default_rng(0)
    hours = np.arange(360) * 5 / 3600  # 30 minutes, one sample every 5 s
    rss = 480.0 + 2.0 * hours + rng.normal(0, 0.5, hours.size)  # 2 MB/hour under 0.5 MB of noise
    f = fit(hours, rss)
    low, high = f.slope_ci95()
    assert low < 2.0 < high and low > 0  # contains the truth, and tells the creep from nothing
    # Against numpy's least squares and the textbook standard error computed from the residuals.
    slope, intercept = np.polyfit(hours, rss, 1)
    residuals = rss - (intercept + slope * hours)
    se = np.sqrt(residuals @ residuals / (hours.size - 2) / np.sum((hours - hours.mean()) ** 2))
    assert f.slope == pytest.approx(slope, rel=1e-9) and f.intercept == pytest.approx(intercept, rel=1e-9)
    assert f.slope_se() == pytest.approx(se, rel=1e-6)
    assert (high - low) / 2 == pytest.approx(t_quantile_975(358) * se, rel=1e-6)


def test_a_flat_series_gives_an_interval_around_zero():
    rng = np.random.default_rng(1)
    hours = np.arange(360) * 5 / 3600
    low, high = fit(hours, 300.0 + rng.normal(0, 0.5, hours.size)).slope_ci95()
    assert low < 0.0 < high


def test_the_interval_covers_the_true_slope_95_percent_of_the_time_even_with_few_samples():
    # With 6 samples (4 degrees of freedom) the normal's 1.96 would cover only about 88%; Student's t covers 95%.
    rng = np.random.default_rng(2)
    x = np.arange(6, dtype=float)
    trials = 4000
    covered = 0
    for _ in range(trials):
        low, high = fit(x, 1.5 * x + rng.normal(0, 1.0, x.size)).slope_ci95()
        covered += low <= 1.5 <= high
    assert 0.935 <= covered / trials <= 0.965


def test_too_few_points_give_no_interval():
    f = fit([0.0, 1.0], [1.0, 2.0])
    assert f.slope == pytest.approx(1.0)
    assert all(np.isnan(v) for v in f.slope_ci95())


def test_the_ring_buffer_keeps_the_newest_rows_and_never_grows():
    ring = RingBuffer(100, 2)
    buffer = ring.rows
    for i in range(1050):
        ring.append((i, 2 * i))
        assert len(ring) <= 100
    assert ring.rows is buffer and ring.rows.shape == (100, 2)  # allocated once
    assert len(ring) == 100 and ring.appended == 1050 and ring.dropped == 950
    values = ring.values()
    assert values[:, 0].tolist() == list(range(950, 1050))
    assert values[:, 1].tolist() == [2 * i for i in range(950, 1050)]
    assert ring.last().tolist() == [1049, 2098]


def test_the_sampler_is_bounded_however_long_it_runs():
    rss = iter(100.0 + 3.0 * (k * 5 / 3600) for k in range(10**6))  # 3 MB/hour, exactly
    sampler = RssSampler(interval=5, warmup=120, capacity=64, read_rss=lambda: next(rss))
    for k in range(20_000):  # 28 hours of samples at 5 s
        sampler.sample(t=k * 5.0)
    assert len(sampler.ring) == 64 and sampler.ring.rows.shape == (64, 3)
    assert sampler.fit.n == 20_000 - 24  # the first 120 s (24 samples) are the warm-up
    result = sampler.result()
    assert result["rss_slope_mb_per_hour"] == pytest.approx(3.0, rel=1e-9)
    assert len(result["samples"]["rows"]) == 64 and result["samples"]["dropped_oldest"] == 20_000 - 64
    assert result["rss_mb"]["first_after_warmup"] == pytest.approx(100.0 + 3.0 * 120 / 3600)
    assert result["residual_lag1_autocorrelation"] is None  # the ring no longer holds every fitted sample


def test_residual_autocorrelation_tells_independent_noise_from_steps():
    rng = np.random.default_rng(3)
    x = np.arange(400, dtype=float)
    assert abs(residual_lag1_autocorrelation(x, rng.normal(0, 1, x.size))) < 0.15
    steps = np.repeat(rng.normal(0, 1, 20), 20)  # RSS that moves in steps and stays
    assert residual_lag1_autocorrelation(x, steps) > 0.8


def test_a_short_soak_through_the_stream_job(seg_onnx, tmp_path, capsys):
    out = tmp_path / "soak.json"
    code = main(["--model", str(seg_onnx), "--streams", "2", "--minutes", "0.2", "--fps", "15", "--size", "96x64",
                 "--warmup", "3", "--interval", "0.5", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    result = json.loads(out.read_text())
    assert len(result["streams"]) == 2 and result["pipeline"]["frames"] > 100
    assert result["pipeline"]["config"]["done"] == "segmented"  # the job code's own statistics
    n = result["fit_samples"]
    assert 15 <= n <= 20  # about (12 s - 3 s) / 0.5 s
    low, high = result["rss_slope_ci95_mb_per_hour"]
    assert low <= result["rss_slope_mb_per_hour"] <= high
    rows = result["samples"]["rows"]
    assert result["samples"]["columns"] == ["t_s", "rss_mb", "load_1min"] and len(rows) == result["samples"]["appended"]
    assert sum(1 for t, _, _ in rows if t >= 3) == n and all(r[1] > 10 for r in rows)
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1
    closing = printed.out.strip().splitlines()[-1]
    assert closing.startswith("soak: RSS slope ") and f"{n} samples after a 3 s warm-up" in closing
    assert "RSS " in printed.err  # the status lines carry the RSS


def test_a_run_too_short_for_a_slope_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--minutes", "1", "--warmup", "120"])
    assert exit_info.value.code == 2
    assert "fewer than 3 samples after the 120 s warm-up" in capsys.readouterr().err
