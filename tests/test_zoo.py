"""`python -m edgepix.benchmarks.zoo`: the zoo builds offline, and its table gives every model and mode a number or a
stated reason in every column, with the ratios computed from those numbers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepix.benchmarks import zoo
from edgepix.benchmarks.zoo import COLUMNS, DEFAULT, LITERT, OPENVINO, ORT, PEER_COLUMNS, TORCH, TUNED, ZOO

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_zoo_gives_each_model_and_mode_numbers_or_reasons(tmp_path):
    from edgepix.export.cli import FORMATS
    from edgepix.runtime.backends.registry import backend_status

    out, report = tmp_path / "zoo", tmp_path / "zoo.json"
    done = subprocess.run([sys.executable, "-m", "edgepix.benchmarks.zoo", "--quick", "--rounds", "2", "--warmup",
                           "0", "--models", "nhwc-sigmoid-256,dcgan-64", "--out", str(out), "--json", str(report)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())
    rows = result["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [("nhwc-sigmoid-256", "quiet"), ("nhwc-sigmoid-256", "busy"),
                                                      ("dcgan-64", "quiet"), ("dcgan-64", "busy")]
    assert result["rounds"] == 2 and result["columns"] == list(COLUMNS)
    openvino_missing = backend_status()["openvino"]
    for row in rows:
        assert row["input_shape"] == ([1, 256, 256, 3] if row["model"] == "nhwc-sigmoid-256" else [1, 100])
        assert row["load_mode"]["mode"] == row["mode"] and row["load"].startswith(f"{row['mode']}")
        assert list(row["columns"]) == list(COLUMNS)
        for name, cell in row["columns"].items():
            if "p50_ms" in cell:  # a number: measured over every round
                assert cell["calls"] == 2 and 0 < cell["p50_ms"] <= cell["p90_ms"], (name, cell)
            else:
                assert isinstance(cell["skipped"], str) and cell["skipped"], (name, cell)
        for name in (DEFAULT, TUNED, ORT, TORCH):  # installed wherever the tests run
            assert "p50_ms" in row["columns"][name], (name, row["columns"][name])
        for name in (DEFAULT, TUNED):
            assert row["columns"][name]["backend"] in ("ort-cpu", "openvino", "opencv", "litert")
        assert ("p50_ms" in row["columns"][OPENVINO]) == (openvino_missing is None)
        if "tflite" not in FORMATS:
            assert row["columns"][LITERT]["skipped"] == "no tflite export"
        elif row["model"] == "nhwc-sigmoid-256":  # made with torch.onnx.export: no checkpoint to convert
            assert row["columns"][LITERT]["skipped"] == "no edgepix checkpoint to export a .tflite from"
        elif "p50_ms" in row["columns"][LITERT]:  # its NHWC output handed back in the ONNX file's layout
            assert row["columns"][LITERT]["agreement"].startswith("max diff"), row["columns"][LITERT]
        p50 = {c: row["columns"][c]["p50_ms"] for c in COLUMNS if "p50_ms" in row["columns"][c]}
        ratios = row["ratios"]
        assert ratios["default_vs_ort"]["ratio"] == pytest.approx(p50[DEFAULT] / p50[ORT])
        fastest = min((c for c in PEER_COLUMNS if c in p50), key=p50.get)
        assert ratios["tuned_vs_fastest_peer"] == pytest.approx({"ratio": p50[TUNED] / p50[fastest], "peer": fastest})
        exact = min((c for c in PEER_COLUMNS if c in p50 and not row["columns"][c].get("reduced_precision")),
                    key=p50.get)
        assert ratios["tuned_vs_fastest_exact_peer"] == pytest.approx({"ratio": p50[TUNED] / p50[exact],
                                                                       "peer": exact})
    busy = [r["load_mode"] for r in rows if r["mode"] == "busy"]
    assert all(b["description"].startswith("busy: one core kept busy") and b["burner_wall_s"] > 0 for b in busy)

    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    table = lines[header + 2:header + 6]
    assert [line.split()[:3] for line in table] == [[m, s, mode] for m, s in (("nhwc-sigmoid-256", "1x256x256x3"),
                                                                             ("dcgan-64", "1x100"))
                                                    for mode in ("quiet", "busy")]
    footnotes = {m.group(0) for line in lines[header + 6:] if (m := re.match(r"\[\d+\]", line))}
    assert set(re.findall(r"\[\d+\]", " ".join(table))) <= footnotes  # each reason cited is written below
    assert any(line.startswith("busy: one core kept busy") for line in lines[:header])

    built = {p.name for p in out.iterdir()}
    assert {"nhwc-sigmoid-256.onnx", "dcgan-64.onnx", "src"} <= built
    said: list[str] = []
    assert zoo.build(out, ZOO["dcgan-64"], say=said.append) == out / "dcgan-64.onnx"
    assert said == []  # already built: reused, nothing made or exported again


def test_an_unknown_model_or_mode_is_one_line_naming_the_valid_ones(tmp_path, capsys):
    assert zoo.main(["--models", "fastscnn-265", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'fastscnn-265'" in err[0] and "Did you mean 'fastscnn-256'" in err[0]
    assert zoo.main(["--modes", "quiet,loud", "--out", str(tmp_path)]) == 1
    assert "unknown mode 'loud'; valid: busy, quiet." in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing built before the arguments were checked


def test_the_litert_column_feeds_an_nchw_benchmark_input_to_an_nhwc_tflite(tmp_path):
    pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")
    from tflite_models import segmenter_reference, segmenter_tflite

    path = tmp_path / "seg.tflite"
    weights = segmenter_tflite(path)
    runs, call, close = zoo.litert_defaults(path, 1)
    assert runs.startswith("LiteRT ") and runs.endswith("Interpreter defaults (XNNPACK), 1 threads") and close is None
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)  # the ONNX file's NCHW input
    expected = segmenter_reference(x.transpose(0, 2, 3, 1), weights)
    for _ in range(2):  # the NHWC copy is made once and reused
        np.testing.assert_allclose(call(x), expected, atol=1e-4)
    np.testing.assert_allclose(call(np.ascontiguousarray(x.transpose(0, 2, 3, 1))), expected, atol=1e-4)
