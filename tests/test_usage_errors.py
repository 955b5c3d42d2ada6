"""Usage errors end in one line that says what was expected, before any work: a training size the models cannot
take, an ONNX file given where a checkpoint belongs, checkpoints whose fields have the wrong types."""

from __future__ import annotations

import pytest
import torch
from test_runtime_models import channel_model, seg_spec

from edgepix.export.to_onnx import OnnxExportOptions, exported_spec
from edgepix.runtime.core.errors import ExportError, ModelFormatError
from edgepix.train.checkpoint import load_checkpoint, wrap_state_dict


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("kind, imgsz, expected", [
    ("pix2pix", 64, "must be a multiple of 128 (at least 128)"),
    ("pix2pix", 192, "must be a multiple of 256 (at least 256)"),
    ("gan", 48, "dcgan image_size must be one of (32, 64, 128), got 48"),
])
def test_train_with_a_size_the_models_cannot_take_fails_in_one_line_before_any_work(edgepix_cli, tmp_path, kind,
                                                                                     imgsz, expected):
    out = tmp_path / "run"
    result = edgepix_cli("train", kind, "--data", "synthetic", "--imgsz", str(imgsz), "--epochs", "1",
                         "--synthetic-n", "8", "--batch", "2", "--out", str(out))
    line = one_error_line(result)
    assert expected in line and f"--imgsz {imgsz}" in line
    assert not out.exists()  # nothing was made: no data, no run folder


def test_export_size_below_the_divisor_suggests_a_size_that_exists():
    spec = seg_spec(input_size=(128, 128), size_divisor=128)
    with pytest.raises(ExportError, match="multiple of 128 for this model, got 64x64; try 128x128"):
        exported_spec(spec, OnnxExportOptions(imgsz=(64, 64)))


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    return channel_model(tmp_path_factory.mktemp("onnx"))


def test_export_of_an_onnx_file_says_it_is_onnx_not_a_checkpoint(edgepix_cli, onnx_model):
    line = one_error_line(edgepix_cli("export", str(onnx_model), "--no-verify"))
    assert f"{onnx_model} is an ONNX model, not a training checkpoint" in line
    assert f"edgepix info {onnx_model}" in line and "--format engine" in line
    assert "Python objects" not in line


def test_an_onnx_file_named_like_a_checkpoint_is_named_as_onnx(edgepix_cli, onnx_model, tmp_path):
    disguised = tmp_path / "model.pt"
    disguised.write_bytes(onnx_model.read_bytes())
    line = one_error_line(edgepix_cli("info", str(disguised)))
    assert "is an ONNX model, not a training checkpoint (.pt); rename it to model.onnx" in line


def crafted(tmp_path, **fields):
    ckpt = wrap_state_dict({"w": torch.zeros(2)}, arch="fastscnn", arch_kwargs={"num_classes": 3}, spec=seg_spec())
    path = tmp_path / "crafted.pt"
    torch.save({**ckpt, **fields}, path)
    return path


CRAFTED = {
    "arch is an int": (dict(arch=5), "'arch' must be a model name"),
    "arch is empty": (dict(arch=""), "'arch' must be a model name"),
    "arch_kwargs is a list": (dict(arch_kwargs=[1, 2]), "'arch_kwargs' must be a dict"),
    "arch_kwargs has an int key": (dict(arch_kwargs={1: 2}), "'arch_kwargs' must be a dict"),
    "spec is a str": (dict(spec="x"), "'spec' must be a dict"),
    "spec has an int key": (dict(spec={**seg_spec().to_dict(), 1: 2}), "keys must be strings"),
    "spec scale is a 400-digit int": (dict(spec={**seg_spec().to_dict(), "scale": 10**400}),
                                      "scale: expected a finite number"),
    "model is a list": (dict(model=[1, 2]), "'model' must be a dict of parameter names to tensors"),
    "model holds an int": (dict(model={"w": 1}), "'model' must be a dict of parameter names to tensors"),
    "ema is a str": (dict(ema="x"), "'ema' must be a dict of parameter names to tensors"),
    "epoch is a str": (dict(epoch="x"), "'epoch' must be a non-negative int"),
    "epoch is negative": (dict(epoch=-3), "'epoch' must be a non-negative int"),
    "metrics is a list": (dict(metrics=[1]), "'metrics' must be a dict"),
    "optimizer is a str": (dict(optimizer="adam"), "'optimizer' must be a dict"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_checkpoint_fields_of_the_wrong_type_are_named(tmp_path, name):
    fields, message = CRAFTED[name]
    with pytest.raises(ModelFormatError, match=message) as e:
        load_checkpoint(crafted(tmp_path, **fields))
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("verb", ["info", "export"])
@pytest.mark.parametrize("name", ["arch is an int", "model is a list", "metrics is a list"])
def test_info_and_export_of_crafted_checkpoints_end_in_one_line(edgepix_cli, tmp_path, verb, name):
    fields, message = CRAFTED[name]
    line = one_error_line(edgepix_cli(verb, str(crafted(tmp_path, **fields)), *(["--no-verify"] if verb == "export"
                                                                                 else [])))
    assert line.startswith(f"edgepix {verb}: error: ") and message in line


def test_arch_kwargs_that_do_not_build_the_architecture_end_in_one_line(edgepix_cli, tmp_path):
    line = one_error_line(edgepix_cli("export", str(crafted(tmp_path, arch_kwargs={"num_classes": "six"})),
                                      "--no-verify"))
    assert line.startswith("edgepix export: error: ") and "'arch_kwargs' does not build" in line
