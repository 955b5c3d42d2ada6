"""`edgepix bench stream`: the stream pipeline and a naive loop side by side, per stage, on the same frames."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
from pathlib import Path

import pytest
from test_stream_support import channel_model, video_info, write_scene_video

from edgepix.benchmarks.stream_bound import STREAM_STAGES, make_video
from edgepix.cli import join_compound_verb


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return channel_model(tmp_path_factory.mktemp("bench_stream") / "channels.onnx")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _check_stats(stats: dict) -> None:
    assert stats["n"] >= 1
    assert all(isinstance(stats[q], float) for q in ("p50", "p90", "p99"))
    assert 0 <= stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


def test_synthetic_source_both_runtimes_every_stage_in_all_reports(edgepix_cli, model, tmp_path):
    out = tmp_path / "report"
    r = edgepix_cli("bench", "stream", str(model), "--source", "synthetic://?size=96x64", "--frames", "20",
                    "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Environment:") and "onnxruntime" in lines[0]
    rows = {_cells(line)[0]: _cells(line)[1:] for line in lines if line.startswith("| ")}
    assert rows["frames"] == ["20", "20"] and rows["drops"] == ["0", "0"]
    assert all(float(v) > 0 for v in rows["FPS (end to end)"])
    for stage in STREAM_STAGES:  # naive p50/p90/p99, then the pipeline's: all measured (encode: the temporary mp4)
        assert len(rows[stage]) == 6 and all(float(v) >= 0 for v in rows[stage]), (stage, rows[stage])
    assert "pipeline / naive loop:" in r.stdout and "x FPS" in r.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["frames_requested"] == report["frames_per_run"] == 20
    assert report["input"]["kind"] == "synthetic" and report["input"]["identical_frames"] is True
    assert report["environment"]["cores"] >= 1 and "onnxruntime" in report["environment"]["packages"]
    assert report["codec"] in ("avc1", "mp4v")
    for name in ("naive", "pipeline"):
        run = report["results"][name]
        assert run["frames"] == 20 and run["fps"] > 0 and run["drops"] == 0
        assert run["fps"] == pytest.approx(run["frames"] / run["seconds"], rel=1e-6)
        assert set(run["stages"]) == set(STREAM_STAGES)
        for stats in run["stages"].values():
            _check_stats(stats)
            assert stats["n"] == 20
        _check_stats(run["frame_age_ms"])
    naive = report["results"]["naive"]
    # The naive loop's frame age is its end-to-end latency: no shorter than the stages it contains.
    assert naive["frame_age_ms"]["min"] >= naive["stages"]["infer"]["min"]
    assert naive["frame_age_ms"]["mean"] == pytest.approx(sum(s["mean"] for s in naive["stages"].values()), rel=1e-3)
    assert report["speedup_fps"] == pytest.approx(report["results"]["pipeline"]["fps"] / naive["fps"])
    assert any("frame age" in n for n in report["notes"]) and any("0 by construction" in n for n in report["notes"])

    with open(out / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {(row["runtime"], row["stage"]) for row in table} == {
        (name, stage) for name in ("naive", "pipeline") for stage in (*STREAM_STAGES, "frame_age", "latency")}
    assert all(float(row["p50_ms"]) <= float(row["p99_ms"]) and float(row["fps"]) > 0 for row in table)
    assert (out / "report.md").read_text() == r.stdout
    if importlib.util.find_spec("matplotlib"):
        assert (out / "stream_stages.png").stat().st_size > 5000
    else:
        assert not (out / "stream_stages.png").exists() and "matplotlib is not installed" in r.stdout


def test_video_file_shorter_than_asked_and_a_kept_output_video(edgepix_cli, model, tmp_path):
    video = write_scene_video(tmp_path / "in.mp4", n=12, size=(96, 64))
    kept = tmp_path / "out" / "seg.avi"
    r = edgepix_cli("-q", "bench", "stream", str(model), "--source", str(video), "--frames", "30", "--threads", "1",
                    "--sink", str(kept), "--format", "json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["input"]["kind"] == "file" and report["frames_per_run"] == 12
    assert any("12 of the 30" in n for n in report["notes"])
    assert report["codec"] == "MJPG"
    for name, path in (("pipeline", kept), ("naive", tmp_path / "out" / "seg.naive.avi")):
        assert report["results"][name]["frames"] == 12
        assert report["results"][name]["stages"]["encode"]["n"] == 12
        assert video_info(path)[0] == 12 and video_info(path)[2] == (96, 64)


def test_null_sink_measures_no_encode_stage(model, tmp_path):
    from edgepix.benchmarks.stream import StreamBenchOptions, csv_text, markdown, run_stream_bench

    report = run_stream_bench(model, "synthetic://?size=64x48&frames=8", StreamBenchOptions(frames=50, threads=1,
                                                                                            sink="null://"))
    assert report["frames_per_run"] == 8
    for run in report["results"].values():
        assert run["frames"] == 8 and "encode" not in run["stages"] and set(run["stages"]) == set(STREAM_STAGES[:-1])
    assert report["codec"] is None
    encode_row = next(line for line in markdown(report).splitlines() if line.startswith("| encode |"))
    assert _cells(encode_row) == ["encode"] + ["-"] * 6
    assert not any(row["stage"] == "encode" for row in csv.DictReader(io.StringIO(csv_text(report))))
    assert report["load"]["mode"] == "quiet" and "\nLoad: quiet (nothing else started" in markdown(report)


def _spinning_children() -> list[int]:
    """This process's children that run the busy mode's spin loop (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"while os.getppid() == parent" in command:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the spinning process in /proc")
def test_busy_keeps_a_spinning_process_through_both_runs_and_says_so(model, monkeypatch):
    from edgepix.benchmarks import stream
    from edgepix.benchmarks.stream import StreamBenchOptions, markdown, run_stream_bench

    seen = {}

    def spying(name: str):
        run = getattr(stream, name)

        def spy(*args, **kwargs):
            seen[name] = _spinning_children()
            return run(*args, **kwargs)

        return spy

    for name in ("pipeline_run", "naive_loop"):
        monkeypatch.setattr(stream, name, spying(name))
    report = run_stream_bench(model, "synthetic://?size=64x48&frames=8",
                              StreamBenchOptions(frames=8, threads=1, sink="null://", busy=True))
    assert len(seen["pipeline_run"]) == 1 and seen["naive_loop"] == seen["pipeline_run"]
    assert _spinning_children() == []  # stopped with the runs
    assert report["load"]["mode"] == "busy" and report["load"]["burner_wall_s"] > 0
    assert "\nLoad: busy: one core kept busy by a pure-Python spin loop in a child process" in markdown(report)


def test_the_busy_flag_is_refused_where_it_does_not_apply(edgepix_cli, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    r = edgepix_cli("bench", str(model), "--busy")
    assert r.returncode == 1 and "--busy applies to --peers and to bench stream" in r.stderr


def test_stream_options_check_busy():
    from edgepix.benchmarks.stream import StreamBenchOptions
    from edgepix.runtime.core.errors import EdgepixError

    assert StreamBenchOptions(busy=True).busy
    with pytest.raises(EdgepixError, match=r"StreamBenchOptions.busy: expected True or False, got 'yes'"):
        StreamBenchOptions(busy="yes")


def test_errors_are_one_line_and_bad_usage_exits_2(edgepix_cli, model, tmp_path):
    # A model without an edgepix spec is measured as the runtime runs it, with the spec inferred from its graph
    # (tests/test_foreign_outputs.py), so it is not among the errors.
    for args, expected in (((str(model), "--source", str(tmp_path / "absent.mp4")), "no such file or folder"),
                           ((str(model), "--source", str(tmp_path)), "needs a video"),
                           ((str(model), "--sink", "http://127.0.0.1:8080"), "writes a video file"),
                           ((str(tmp_path / "absent.onnx"),), "model file not found")):
        r = edgepix_cli("bench", "stream", *args)
        assert r.returncode == 1, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgepix bench stream: error:") and expected in lines[0], lines
    r = edgepix_cli("bench", "stream", str(model), "--frames", "0")
    assert r.returncode == 2 and "positive integer" in r.stderr
    r = edgepix_cli("bench", "--help")
    assert r.returncode == 0 and "edgepix bench stream MODEL" in r.stdout


def test_only_bench_followed_by_stream_becomes_the_stream_verb():
    verbs = frozenset({"bench stream"})
    assert join_compound_verb(["-q", "bench", "stream", "m.onnx"], verbs) == ["-q", "bench stream", "m.onnx"]
    assert join_compound_verb(["bench", "a.onnx", "stream"], verbs) == ["bench", "a.onnx", "stream"]
    assert join_compound_verb(["segment", "stream"], verbs) == ["segment", "stream"]
    assert join_compound_verb(["bench"], verbs) == ["bench"]


def test_a_synthetic_uri_is_rendered_with_its_own_size_and_frame_limit(tmp_path):
    path = make_video(tmp_path / "s.mp4", frames=20, source="synthetic://?size=80x48&frames=7&fps=0")
    n, fps, size = video_info(path)
    assert (n, size) == (7, (80, 48)) and fps == pytest.approx(30.0)


def test_a_temporal_mode_reports_the_flicker_of_the_pipelines_masks(model):
    from edgepix.benchmarks.stream import StreamBenchOptions, markdown, run_stream_bench
    from edgepix.runtime.core.errors import InputError

    source = "synthetic://?size=96x72&frames=20"
    flicker = {}
    for mode in ("off", "ema"):
        report = run_stream_bench(model, source, StreamBenchOptions(frames=20, threads=1, sink="null://",
                                                                    temporal=mode))
        temporal = report["results"]["pipeline"]["temporal"]
        assert temporal["mode"] == mode and 0.0 <= temporal["flicker"] < 1.0, temporal
        row = next(line for line in markdown(report).splitlines() if line.startswith("| flicker"))
        assert _cells(row) == [f"flicker (--temporal {mode})", "-", f"{temporal['flicker']:.5f}"]
        flicker[mode] = temporal["flicker"]
    assert flicker["ema"] < flicker["off"], flicker
    plain = run_stream_bench(model, source, StreamBenchOptions(frames=20, threads=1, sink="null://"))
    assert "temporal" not in plain["results"]["pipeline"] and "| flicker" not in markdown(plain)
    with pytest.raises(InputError, match="StreamBenchOptions.temporal"):
        StreamBenchOptions(temporal="smooth")
