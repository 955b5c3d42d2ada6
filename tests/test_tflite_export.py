"""`edgepix export CKPT --format tflite`: a Fast-SCNN checkpoint converted by litert-torch, the parity gate against
PyTorch on LiteRT, the spec embedded in the .tflite (read by `Segmenter.load` without a sidecar), the class maps
against the ONNX export's, and failures that leave nothing behind. One real conversion (tens of seconds) serves the
module; the failure tests reuse its .tflite or fail before converting.

The spec embedding itself (description.tflite.embed_spec) is tested on the tiny models of tests/tflite_models.py,
which needs only ai-edge-litert."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tflite_models as tm
from conftest import run_edgepix

from edgepix.runtime.core.errors import ExportError, SpecError

pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT models need pip install 'edgepix[litert]'")

needs_converter = pytest.mark.skipif(
    importlib.util.find_spec("litert_torch") is None,
    reason="the .tflite export needs litert-torch: pip install 'edgepix[tflite-export]' (make setup installs it)")


def gate_number(stdout: str, check: str) -> float:
    line = next(line for line in stdout.splitlines() if line.strip().startswith(check))
    return float(line[len(line) - len(line.lstrip()) + len(check):].split()[0])


@pytest.fixture(scope="module")
def exported(seg_checkpoint, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("tflite") / "fastscnn64.tflite"
    r = run_edgepix("export", str(seg_checkpoint), "--format", "tflite", "--out", str(out), "--verify-n", "4")
    return out, r


# ---- the export ----------------------------------------------------------------------------------------------


@needs_converter
def test_export_passes_the_gate_and_segments_as_the_onnx_export_does(exported, seg_checkpoint, seg_onnx):
    from edgepix.runtime import Segmenter
    from edgepix.runtime.data.synthetic import CLASS_NAMES, SceneConfig, make_scene
    from edgepix.runtime.description.tflite import read_tflite, sidecar_path

    out, r = exported
    assert r.returncode == 0, r.stderr
    assert "parity gate against PyTorch on LiteRT" in r.stdout and ": PASS" in r.stdout, r.stdout
    assert gate_number(r.stdout, "max abs logit difference") <= 1e-4
    assert gate_number(r.stdout, "argmax agreement") >= 0.999
    assert gate_number(r.stdout, "mIoU artifact") == pytest.approx(gate_number(r.stdout, "mIoU PyTorch FP32"),
                                                                   abs=0.005)
    assert "logits NHWC, input 64x64 NHWC; litert-torch" in r.stdout

    model = read_tflite(out)  # one NHWC image in, NHWC logits out, the spec inside and nothing beside it
    assert [t.meta.shape for t in model.inputs] == [(1, 64, 64, 3)]
    assert [t.meta.shape for t in model.outputs] == [(1, 64, 64, len(CLASS_NAMES))]
    spec = model.spec
    assert spec is not None and not sidecar_path(out).exists()
    assert (spec.input_layout.value, spec.output_layout.value, spec.input_size) == ("NHWC", "NHWC", (64, 64))
    assert (spec.input_name, spec.output_name) == (model.inputs[0].name, model.outputs[0].name)
    assert spec.class_names == CLASS_NAMES

    frames = [make_scene(9_400 + i, SceneConfig(size=(120, 160)))[0] for i in range(4)]
    with Segmenter.load(out) as litert, Segmenter.load(seg_onnx, "ort-cpu") as ort:
        assert litert.backend.name == "litert" and litert.spec == spec
        tflite_maps = np.stack([litert.segment(f).class_map for f in frames])
        onnx_maps = np.stack([ort.segment(f).class_map for f in frames])
    assert tflite_maps.shape == (4, 120, 160)
    assert float((tflite_maps == onnx_maps).mean()) >= 0.999
    assert len(np.unique(onnx_maps)) >= 3  # several classes: the agreement means something


@needs_converter
def test_a_conversion_the_gate_fails_leaves_nothing_at_out(exported, tmp_path, monkeypatch):
    """Another checkpoint of the same architecture, 'converted' to the first one's .tflite: the gate sees it."""
    import torch

    from edgepix.export import to_tflite
    from edgepix.export.gate import VerificationFailed
    from edgepix.runtime.data.synthetic import CLASS_NAMES
    from edgepix.runtime.description.spec import ModelSpec
    from edgepix.train.checkpoint import save_checkpoint, wrap_state_dict
    from edgepix.train.registry import create_model

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    spec = ModelSpec(task="segmentation", model_name="fastscnn", input_size=(64, 64), class_names=CLASS_NAMES)
    save_checkpoint(other, wrap_state_dict(create_model("fastscnn", num_classes=len(CLASS_NAMES)).state_dict(),
                                           arch="fastscnn", arch_kwargs={"num_classes": len(CLASS_NAMES)}, spec=spec))
    first, _ = exported
    monkeypatch.setattr(to_tflite, "convert_checkpoint",
                        lambda checkpoint, spec, dst, *, use_ema: dst.write_bytes(first.read_bytes()))
    out = tmp_path / "out" / "other.tflite"
    with pytest.raises(VerificationFailed, match="max abs logit difference") as failed:
        to_tflite.export_tflite_from_checkpoint(to_tflite.TfliteExportRequest(other, out=out, verify_n=2))
    assert not failed.value.report.passed
    assert not out.exists() and list(out.parent.iterdir()) == []


@needs_converter
def test_a_converter_that_fails_leaves_nothing_and_says_why(seg_checkpoint, tmp_path, monkeypatch):
    """The real child process, given a checkpoint it cannot read: its reason comes back in one line."""
    from edgepix.export import to_tflite

    real = to_tflite.convert_checkpoint
    missing = tmp_path / "gone.pt"
    monkeypatch.setattr(to_tflite, "convert_checkpoint",
                        lambda checkpoint, spec, dst, *, use_ema: real(missing, spec, dst, use_ema=use_ema))
    out = tmp_path / "out" / "model.tflite"
    with pytest.raises(ExportError, match=r"litert-torch could not convert .*gone\.pt: ModelFormatError: "):
        to_tflite.export_tflite_from_checkpoint(to_tflite.TfliteExportRequest(seg_checkpoint, out=out))
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_without_litert_torch_one_line_says_what_to_install(seg_checkpoint, tmp_path, monkeypatch, capsys):
    from edgepix.cli import main

    monkeypatch.setitem(sys.modules, "litert_torch", None)  # as if it were not installed
    out = tmp_path / "model.tflite"
    assert main(["export", str(seg_checkpoint), "--format", "tflite", "--out", str(out)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'edgepix[tflite-export]'" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_options_that_do_not_apply_are_refused_before_any_work(seg_checkpoint, tmp_path, capsys):
    from edgepix.cli import main

    def export(*args: str) -> str:
        assert main(["export", str(seg_checkpoint), "--format", "tflite", *args]) == 1
        return capsys.readouterr().err

    out = str(tmp_path / "model.tflite")
    assert "--dynamic-size, --argmax: not for --format tflite" in export("--dynamic-size", "--argmax", "--out", out)
    assert "--no-verify: a .tflite export is always checked" in export("--no-verify", "--out", out)
    assert "give a path ending in .tflite" in export("--out", str(tmp_path / "model.onnx"))
    assert list(tmp_path.iterdir()) == []


# ---- the embedded spec -------------------------------------------------------------------------------------


def _binary_spec(**changes):
    from edgepix.runtime.description.spec import ModelSpec

    fields = dict(task="segmentation", model_name="tiny", input_size=(64, 64), input_name="input",
                  output_name="mask", input_layout="NHWC", output_layout="NHWC", output_kind="binary_probability",
                  class_names=("background", "person"), mean=(0.0,) * 3, std=(1.0,) * 3)
    return ModelSpec(**{**fields, **changes})


def test_an_embedded_spec_is_read_back_and_the_graph_runs_unchanged(tmp_path):
    from edgepix.runtime.backends import load_backend
    from edgepix.runtime.description.tflite import embed_spec, read_tflite, stored_spec

    plain, described = tmp_path / "plain.tflite", tmp_path / "described.tflite"
    tm.segmenter_tflite(plain)
    spec = _binary_spec()
    described.write_bytes(embed_spec(plain.read_bytes(), spec))
    assert read_tflite(plain).spec is None and stored_spec(plain) is None
    assert read_tflite(described).spec == spec and stored_spec(described) == spec
    x = np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32)
    with load_backend(plain, "litert") as a, load_backend(described, "litert") as b:
        assert b.spec == spec
        assert np.array_equal(a.infer(x)["mask"], b.infer(x)["mask"])

    again = tmp_path / "again.tflite"  # embedding again replaces the entry: one spec, the new one
    again.write_bytes(embed_spec(described.read_bytes(), _binary_spec(model_name="renamed")))
    assert read_tflite(again).spec.model_name == "renamed"


def test_a_sidecar_overrides_the_embedded_spec_and_segment_reads_either(tmp_path):
    from edgepix.runtime import Segmenter
    from edgepix.runtime.description.tflite import embed_spec, sidecar_path, stored_spec

    path = tmp_path / "model.tflite"
    tm.segmenter_tflite(path)
    path.write_bytes(embed_spec(path.read_bytes(), _binary_spec(threshold=0.3)))
    frame = (np.random.default_rng(1).random((48, 80, 3)) * 255).astype(np.uint8)
    with Segmenter.load(path, "litert") as seg:  # no overrides, no sidecar: the embedded spec
        assert seg.spec.threshold == 0.3 and seg.spec.class_names == ("background", "person")
        assert seg.segment(frame).class_map.shape == (48, 80)
    r = run_edgepix("spec", str(path))
    assert r.returncode == 0 and "(embedded)" in r.stdout and re.search(r"threshold\s+0\.3", r.stdout), r.stdout

    _binary_spec(threshold=0.7).save_json(sidecar_path(path))
    assert stored_spec(path).threshold == 0.7
    with Segmenter.load(path, "litert") as seg:
        assert seg.spec.threshold == 0.7


def test_a_damaged_embedded_spec_is_a_spec_error_naming_the_model(tmp_path):
    from edgepix.runtime.description.tflite import SPEC_METADATA_NAME, read_tflite

    path = tmp_path / "bad.tflite"
    w = tm.TfliteWriter()
    x = w.tensor("input", (1, 4, 4, 3))
    y = w.tensor("y", (1, 4, 4, 3))
    w.op(tm._schema().BuiltinOperator.RELU, [x], [y])
    path.write_bytes(w.finish([x], [y], metadata={SPEC_METADATA_NAME: b'{"task": "segmentation", "bogus": 1}'}))
    with pytest.raises(SpecError, match=r"bad\.tflite: embedded spec is invalid"):
        read_tflite(path)
