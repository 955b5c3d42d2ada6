import csv
import json

import pytest

from edgepix.export.pipeline import ExportRequest, run_export
from edgepix.export.to_onnx import OnnxExportOptions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(seg_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-models")
    dynamic = run_export(ExportRequest(seg_checkpoint, out=folder / "dyn.onnx", verify=False,
                                       onnx=OnnxExportOptions(dynamic_batch=True))).path
    static = run_export(ExportRequest(seg_checkpoint, out=folder / "static.onnx", verify=False)).path
    return dynamic, static


def test_bench_reports_rows_side_by_side_with_torch(edgepix_cli, exported, seg_checkpoint, tmp_path):
    dynamic, static = exported
    out = tmp_path / "report"
    r = edgepix_cli("bench", str(dynamic), str(static), "--batch", "1,2", "--runs", "4", "--warmup", "1",
                    "--accuracy-n", "3", "--threads", "1", "--torch", str(seg_checkpoint), "--out", str(out),
                    "--format", "json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    rows = report["results"]
    keys = {(row["model"], row["batch"]) for row in rows}
    assert keys == {("dyn.onnx", 1), ("dyn.onnx", 2), ("static.onnx", 1), ("fastscnn64.pt", 1), ("fastscnn64.pt", 2)}
    assert any("static.onnx" in n and "batch 2 skipped" in n for n in report["notes"])
    for row in rows:
        assert row["calls"] == 4
        assert row["latency_min_ms"] <= row["latency_p50_ms"] <= row["latency_p90_ms"] <= row["latency_p99_ms"] \
            <= row["latency_max_ms"]
        # Throughput is images over the timed calls' total time.
        assert row["throughput"] == pytest.approx(row["batch"] * 1000 / row["latency_mean_ms"], rel=1e-6)
        assert row["accuracy_name"] == "mIoU" and 0 < row["accuracy"] <= 1
    onnx_rows = [row for row in rows if row["model"] != "fastscnn64.pt"]
    for row in onnx_rows:
        assert row["gflops_per_image"] > 0 and row["efficiency"] > 0
        assert row["achieved_gflops"] == pytest.approx(row["gflops_per_image"] * row["throughput"])
    # The same weights give the same mIoU in ONNX Runtime and in PyTorch (same pre-processing, same scenes).
    torch_miou = next(row["accuracy"] for row in rows if row["model"] == "fastscnn64.pt")
    assert all(row["accuracy"] == pytest.approx(torch_miou, abs=2e-3) for row in onnx_rows)
    assert report["environment"]["cores"] >= 1 and "onnxruntime" in report["environment"]["packages"]
    assert report["ceiling"]["gemm_gflops"] > 0
    assert (out / "report.md").read_text().startswith("Environment:")
    with open(out / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "latency_vs_batch.png").stat().st_size > 5000


def test_torch_baseline_runs_on_the_artifacts_input_size(edgepix_cli, seg_checkpoint, tmp_path):
    """A checkpoint trained at 64x64 and exported at 96x96: without --imgsz, PyTorch runs at 96x96 too."""
    onnx96 = run_export(ExportRequest(seg_checkpoint, out=tmp_path / "seg96.onnx", verify=False,
                                      onnx=OnnxExportOptions(imgsz=(96, 96)))).path
    r = edgepix_cli("bench", str(onnx96), "--runs", "2", "--warmup", "1", "--accuracy-n", "0", "--threads", "1",
                    "--torch", str(seg_checkpoint), "--format", "json")
    assert r.returncode == 0, r.stderr
    shapes = {row["model"]: row["input_shape"] for row in json.loads(r.stdout)["results"]}
    assert shapes == {"seg96.onnx": [1, 3, 96, 96], "fastscnn64.pt": [1, 3, 96, 96]}
    table = edgepix_cli("bench", str(onnx96), "--runs", "2", "--warmup", "1", "--accuracy-n", "0", "--threads", "1",
                        "--torch", str(seg_checkpoint)).stdout
    assert "| input |" in table and table.count("| 1x3x96x96 |") == 2


def test_bench_errors_are_one_line(edgepix_cli, tmp_path):
    r = edgepix_cli("bench", str(tmp_path / "missing.onnx"))
    assert r.returncode == 1 and "model file not found" in r.stderr
    r = edgepix_cli("bench", "--batch", "1,x", str(tmp_path / "m.onnx"))
    assert r.returncode == 2 and "comma-separated integers" in r.stderr
    (tmp_path / "m.onnx").write_bytes(b"not a model")
    r = edgepix_cli("bench", str(tmp_path / "m.onnx"), "--backends", "ort-cpux")
    assert r.returncode == 1 and "Did you mean 'ort-cpu'" in r.stderr


def test_flops_count_is_hand_checkable_and_the_same_for_static_and_dynamic_graphs(exported, tmp_path):
    import torch
    from torch import nn

    from edgepix.benchmarks.flops import count_flops, flops_per_image

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, groups=2),
                          nn.Upsample(scale_factor=2.0, mode="bilinear"), nn.Conv2d(4, 2, 3, stride=2, padding=1))
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model.eval(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    # 2 FLOPs per multiply-add: conv3x3 3->8 at 16x16, grouped 1x1 8->4 (4 inputs per output), 3x3 4->2 at 16x16.
    expected = 2 * (8 * 256 * 27 + 4 * 256 * 4 + 2 * 256 * 36)
    assert count_flops(path, (1, 3, 16, 16)).total == expected
    dynamic, static = exported
    assert flops_per_image(dynamic, (3, 64, 64)) == flops_per_image(static, (3, 64, 64)) > 0


def _row(model: str, precision: str, p50_ms: float, backend: str = "ort-cpu (CPUExecutionProvider, 2 threads)"):
    from edgepix.benchmarks.harness import BenchRow
    from edgepix.benchmarks.stats import LatencyStats

    return BenchRow(model=model, model_name="fastscnn", precision=precision, backend=backend, batch=1,
                    input_shape=(1, 3, 64, 64), load_ms=1.0, first_ms=1.0,
                    latency=LatencyStats.from_samples([p50_ms] * 5), throughput=1e3 / p50_ms, peak_rss_mb=1.0,
                    file_mb=1.0, gflops_per_image=None, achieved_gflops=None)


def test_bench_states_the_int8_time_against_fp32_with_the_cpus_instruction_sets():
    from edgepix.benchmarks.report import speed_ratios
    from edgepix.runtime.core.cpuinfo import cpu_features

    rows = [_row("m.onnx", "fp32", 4.0), _row("m.int8.onnx", "int8", 3.0),
            _row("m.int8.onnx", "int8", 5.0, backend="openvino (CPU)")]  # no FP32 row on openvino: no line
    lines = speed_ratios(rows)
    assert len(lines) == 1, lines
    assert lines[0].startswith("batch 1: m.int8.onnx (int8) on ort-cpu takes 0.75x the time of m.onnx (fp32)")
    assert "1.33x the FP32 speed" in lines[0] and cpu_features().model in lines[0]
    slower = speed_ratios([_row("m.onnx", "fp32", 4.0), _row("m.int8.onnx", "int8", 5.0)])
    assert "takes 1.25x the time" in slower[0] and "INT8 is the slower here: ship m.onnx" in slower[0]
    assert speed_ratios([_row("m.int8.onnx", "int8", 5.0)]) == []  # nothing to compare with
