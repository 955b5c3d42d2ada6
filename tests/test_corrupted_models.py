"""Damaged and crafted model files end in one line with the project's own error, never in a traceback: text that is
not UTF-8, hostile spec JSON (deep nesting, huge numbers), unknown element types, hostile engine manifests, and a
graph that loads but fails while running."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import engine_manifest_dict
from onnx import helper, numpy_helper
from test_runtime_models import channel_model

from edgepix.runtime import Segmenter
from edgepix.runtime.backends.tensorrt.manifest import read_manifest
from edgepix.runtime.core.errors import BackendError, ModelFormatError, SpecError
from edgepix.runtime.description.onnxinfo import read_onnx_info
from edgepix.runtime.description.spec import ONNX_METADATA_KEY, ModelSpec


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return channel_model(tmp_path_factory.mktemp("corrupt"))


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def with_spec_text(model, path, text: str):
    m = onnx.load(str(model))
    for prop in m.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            prop.value = text
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("target", ["producer", "input name", "spec value"])
def test_text_that_is_not_utf8_is_one_line_from_info_and_load(model, tmp_path, edgepix_cli, target):
    data = model.read_bytes()
    old = {"producer": onnx.load(str(model)).producer_name.encode(), "input name": b"images",
           "spec value": b'"model_name": "tiny"'}[target]
    assert old in data
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data.replace(old, old[:-2] + b"\xff" + old[-1:]))  # same length: only the text is damaged
    with pytest.raises(ModelFormatError, match="not valid UTF-8"):
        Segmenter.load(bad, "ort-cpu")
    with pytest.raises(ModelFormatError, match="not valid UTF-8"):
        read_onnx_info(bad)
    line = one_error_line(edgepix_cli("info", str(bad)))
    assert "not valid UTF-8" in line and "copy or export it again" in line


def spec_json(**raw: str) -> str:
    """A valid spec's JSON with some values written as raw literals (json.dumps cannot write 1e999)."""
    spec = ModelSpec(task="segmentation", model_name="tiny", input_size=(32, 48), class_names=("a", "b")).to_dict()
    text = json.dumps({**spec, **{k: f"@{k}@" for k in raw}})
    for key, literal in raw.items():
        text = text.replace(f'"@{key}@"', literal)
    return text


HOSTILE_SPECS = {
    "nested 100000 deep": ("[" * 100_000 + "]" * 100_000, "nested more than 32 levels"),
    "5000-digit integer": (spec_json(pad_value="1" * 5000), "integer of 5000 digits"),
    "1e999": (spec_json(scale="1e999"), "too large for a 64-bit float"),
    # loads (1e38 is a float), then refused by the spec's range for scale
    "integer too large for a float": (spec_json(scale="1" + "0" * 38), r"scale: expected a number in \[1e-06, "),
    "400-digit integer as a float": (spec_json(mean="[1" + "0" * 399 + ", 0, 0]"), "integer of 400 digits"),
    "NaN": (spec_json(scale="NaN"), "NaN"),
    "class name of 100000 characters": (spec_json(class_names=json.dumps(["a" * 100_000, "b"])), "100000 characters"),
    "unpaired surrogate": (spec_json(class_names='["\\ud800", "b"]'), "surrogate"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_SPECS))
def test_hostile_spec_json_is_a_spec_error(name):
    text, message = HOSTILE_SPECS[name]
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_json(text)
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_json(text.encode())


@pytest.mark.parametrize("name", ["nested 100000 deep", "5000-digit integer", "1e999"])
def test_hostile_spec_in_a_model_is_one_line_from_info_and_load(model, tmp_path, edgepix_cli, name):
    text, message = HOSTILE_SPECS[name]
    bad = with_spec_text(model, tmp_path / "bad.onnx", text)
    with pytest.raises(SpecError, match=message):
        Segmenter.load(bad, "ort-cpu")
    line = one_error_line(edgepix_cli("info", str(bad)))
    assert "embedded spec is invalid" in line and message in line


@pytest.mark.parametrize("value", [10**400, 10**5000, {1: 2, "colour": 3}, [[[[[[[[1]]]]]]]]],
                         ids=["400 digits", "5001 digits", "int key", "nested lists"])
def test_spec_dicts_from_checkpoints_with_huge_or_odd_values_are_spec_errors(value):
    spec = json.loads(spec_json())
    with pytest.raises(SpecError) as e:
        ModelSpec.from_dict({**spec, "scale": value} if not isinstance(value, dict) else {**spec, **value})
    assert len(str(e.value)) < 300 and "\n" not in str(e.value)


@pytest.mark.parametrize("elem_type", [99, 0, 16])  # not an ONNX type, undefined, bfloat16 (no numpy dtype)
def test_an_element_type_edgepix_cannot_hold_is_a_model_format_error(model, tmp_path, elem_type):
    m = onnx.load(str(model))
    m.graph.output[0].type.tensor_type.elem_type = elem_type
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(ModelFormatError, match="element type"):
        Segmenter.load(bad, "ort-cpu")


def runtime_failing_model(model, path):
    """The channel model behind a Gather of channels (0, 1, 5): it loads, and fails on every run (3 channels)."""
    m = onnx.load(str(model))
    g = m.graph
    name = g.input[0].name
    for node in g.node:
        node.input[:] = ["gathered" if x == name else x for x in node.input]
    g.initializer.append(numpy_helper.from_array(np.array([0, 1, 5], np.int64), "bad_index"))
    g.node.insert(0, helper.make_node("Gather", [name, "bad_index"], ["gathered"], axis=1))
    onnx.save(m, str(path))
    return path


def test_a_graph_that_fails_while_running_is_a_backend_error(model, tmp_path):
    bad = runtime_failing_model(model, tmp_path / "runfail.onnx")
    with Segmenter.load(bad, "ort-cpu") as seg:
        with pytest.raises(BackendError, match="failed while running") as e:
            seg.segment(np.zeros((32, 48, 3), np.uint8))
    assert "\n" not in str(e.value) and "Gather" in str(e.value)


def test_a_graph_that_fails_while_running_through_iobinding_is_a_backend_error(model, tmp_path):
    from edgepix.runtime.backends.ort import IoBindingRunner, OrtCpuBackend, OrtOptions, run_options

    bad = runtime_failing_model(model, tmp_path / "runfail.onnx")
    with OrtCpuBackend(bad) as backend:  # the runner ort-cuda uses, here on the CPU device
        runner = IoBindingRunner(backend.session, device_type="cpu", device_id=0, output_names=["output"], path=bad,
                                 run_options=run_options(OrtOptions()))
        with pytest.raises(BackendError, match="failed while running"):
            runner.run({"images": np.zeros((1, 3, 32, 48), np.float32)})


def test_segment_with_a_graph_that_fails_while_running_ends_in_one_line(model, tmp_path, edgepix_cli):
    bad = runtime_failing_model(model, tmp_path / "runfail.onnx")
    result = edgepix_cli("--quiet", "segment", str(bad), "--source", "synthetic://?frames=3", "--sink", "null://",
                         "--backend", "ort-cpu")
    line = one_error_line(result)
    assert line.startswith("edgepix segment: error: runfail.onnx: the model failed while running")


def manifest_text(**changes) -> str:
    return json.dumps({**engine_manifest_dict(json.loads(spec_json()), [1, 3, 32, 48]), **changes})


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested more than 32 levels"),
    (manifest_text().replace('"manifest_version": 1', '"manifest_version": ' + "1" * 5000), "5000 digits"),
    (manifest_text(io=[{"name": "images", "mode": "input", "dtype": "float32", "shape": ["x"]}]), "list of integers"),
    (manifest_text(io=True), "io: expected a list"),
    (manifest_text(onnx=7), "onnx: expected a string"),
])
def test_hostile_engine_manifests_are_model_format_errors(tmp_path, text, message):
    path = tmp_path / "model.engine.json"
    path.write_text(text)
    with pytest.raises(ModelFormatError, match=message):
        read_manifest(tmp_path / "model.engine")


def test_a_valid_manifest_still_reads(tmp_path):
    (tmp_path / "model.engine.json").write_text(manifest_text())
    assert read_manifest(tmp_path / "model.engine").spec.model_name == "tiny"
