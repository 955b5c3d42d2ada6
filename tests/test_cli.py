import json

import pytest

from edgepix.runtime.description.spec import ModelSpec, default_palette


def test_help_and_version(edgepix_cli):
    r = edgepix_cli("--help")
    assert r.returncode == 0 and "doctor" in r.stdout and "data" in r.stdout
    r = edgepix_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("edgepix ")


def test_bad_usage_exits_2(edgepix_cli):
    r = edgepix_cli("no-such-verb")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_info_on_a_non_model_file_is_one_line_and_exit_1(edgepix_cli, tmp_path):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("these are not weights")
    r = edgepix_cli("info", str(bogus))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an ONNX model" in lines[0] and str(bogus) in lines[0]
    assert "Traceback" not in r.stderr
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    r = edgepix_cli("info", str(text))
    assert r.returncode == 1 and "expected a model file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_info_missing_file_and_verbose_traceback(edgepix_cli, tmp_path):
    r = edgepix_cli("info", str(tmp_path / "absent.onnx"))
    assert r.returncode == 1 and "model file not found" in r.stderr
    r = edgepix_cli("--verbose", "info", str(tmp_path / "absent.onnx"))
    assert r.returncode == 1 and "Traceback" in r.stderr


def _tiny_onnx_with_spec(path, spec):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgepix.spec", spec.to_json()
    onnx.save(model, str(path))


def test_spec_read_from_onnx_metadata_and_shown_by_info(edgepix_cli, tmp_path):
    spec = ModelSpec(task="segmentation", model_name="tiny", input_size=(8, 8),
                     class_names=("a", "b", "c"), palette=default_palette(3), output_name="output")
    path = tmp_path / "tiny.onnx"
    _tiny_onnx_with_spec(path, spec)
    assert ModelSpec.from_onnx(path) == spec
    r = edgepix_cli("info", str(path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["spec"]["model_name"] == "tiny" and info["inputs"] == ["images: tensor(float) [1, 3, 8, 8]"]
    r = edgepix_cli("info", str(path))
    assert r.returncode == 0 and "class_names = ['a', 'b', 'c']" in r.stdout


def test_data_synth_writes_a_dataset(edgepix_cli, tmp_path):
    r = edgepix_cli("-q", "data", "synth", "--out", str(tmp_path / "d"), "--n", "20", "--size", "64", "64")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "d" / "images").glob("*.png"))) == 20
    assert len(list((tmp_path / "d" / "masks").glob("*.png"))) == 20
    r = edgepix_cli("data", "synth", "--out", str(tmp_path / "e"), "--n", "0")
    assert r.returncode == 1 and "--n must be at least 1" in r.stderr
    r = edgepix_cli("data", "synth", "--out", str(tmp_path / "lit"), "--n", "2", "--size", "32", "32",
                    "--appearance", "lit")
    assert r.returncode == 0 and "wrote 2 lit scenes of 32x32" in r.stdout, r.stderr


def test_doctor_reports_components(edgepix_cli):
    r = edgepix_cli("doctor")
    assert r.returncode == 0
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    import cv2
    import onnxruntime

    assert cv2.__version__ in lines["opencv"] and "FFmpeg" in lines["opencv"]
    assert onnxruntime.__version__ in lines["onnxruntime"] and "CPUExecutionProvider" in lines["onnxruntime"]
    # Every missing piece says what it disables and how to get it.
    for line in r.stdout.splitlines():
        if line.split()[1:2] == ["missing"]:
            assert "disables" in line, line


# A stand-in for a runtime-only install (`pip install 'edgepix[cpu]'` on a device): the interpreter refuses to
# import the training side, so every verb sees exactly what it would see without those packages.
RUNTIME_ONLY = r"""
import importlib.abc, sys
BLOCKED = {"torch", "onnx", "onnxscript", "onnxslim", "transformers", "safetensors"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from edgepix.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_runtime_only_install_names_the_extra_for_training_verbs_and_runs_the_rest(seg_checkpoint, seg_onnx,
                                                                                      tmp_path):
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", RUNTIME_ONLY, *args], capture_output=True, text=True,
                              timeout=120)

    needs_train = [("export", str(seg_checkpoint), "--out", str(tmp_path / "m.onnx")),
                   ("verify", str(seg_onnx), str(seg_checkpoint)),
                   ("bench", str(seg_onnx), "--torch", str(seg_checkpoint), "--runs", "2"),
                   ("train", "seg", "--data", "synthetic", "--out", str(tmp_path / "run")),
                   ("val", "seg", str(seg_checkpoint), "--data", "synthetic"),
                   ("info", str(seg_checkpoint))]
    for args in needs_train:
        r = run(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (args, r.stderr)
        assert "'torch'" in lines[0] and "pip install 'edgepix[train]'" in lines[0], (args, lines)
    works = [("info", str(seg_onnx)), ("spec", str(seg_onnx), "--json"),
             ("segment", str(seg_onnx), "--source", "synthetic://?size=64x64&frames=3&fps=0", "--sink", "null://"),
             ("bench", str(seg_onnx), "--runs", "2", "--warmup", "1", "--accuracy-n", "0"), ("doctor",)]
    for args in works:
        r = run(*args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
