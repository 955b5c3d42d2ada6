import json

import pytest

from edgepix.runtime.core.errors import SpecError
from edgepix.runtime.description.spec import ModelSpec, OutputKind, ResizeMode, Task, default_palette


def seg_spec(**overrides) -> ModelSpec:
    fields = dict(task="segmentation", model_name="fastscnn", input_size=(256, 320),
                  class_names=("background", "cat", "dog"), palette=default_palette(3))
    fields.update(overrides)
    return ModelSpec(**fields)


def test_json_round_trip_keeps_every_field_and_type():
    spec = seg_spec(resize="letterbox", mean=(0.5, 0.5, 0.5), std=[0.25, 0.25, 0.25], dynamic_batch=True)
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert again.task is Task.SEGMENTATION and again.resize is ResizeMode.LETTERBOX
    assert again.std == (0.25, 0.25, 0.25) and isinstance(again.palette[1], tuple)
    assert json.loads(spec.to_json())["task"] == "segmentation"


def test_generator_spec_round_trip():
    spec = ModelSpec(task="generation-noise", model_name="dcgan", input_size=(64, 64), latent_size=100,
                     output_range=(-1, 1), output_kind="image", mean=(0, 0, 0), std=(1, 1, 1))
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert spec.output_kind is OutputKind.IMAGE


def test_sidecar_file_round_trip(tmp_path):
    spec = seg_spec()
    spec.save_json(tmp_path / "m.json")
    assert ModelSpec.load_json(tmp_path / "m.json") == spec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # no partial file left beside it


def test_manifest_with_wrapped_spec_is_read(tmp_path):
    spec = seg_spec()
    (tmp_path / "e.engine.json").write_text(json.dumps({"spec": spec.to_dict(), "tensorrt": "10.3"}))
    assert ModelSpec.load_json(tmp_path / "e.engine.json") == spec


@pytest.mark.parametrize("text, field", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_json_is_rejected(text, field):
    with pytest.raises(SpecError, match=field):
        ModelSpec.from_json(text)


def test_unknown_key_is_named():
    data = seg_spec().to_dict() | {"colour_space": "RGB"}
    with pytest.raises(SpecError, match=r"^colour_space: unknown key"):
        ModelSpec.from_dict(data)


def test_missing_key_is_named():
    data = seg_spec().to_dict()
    del data["mean"]
    with pytest.raises(SpecError, match=r"^mean: missing"):
        ModelSpec.from_dict(data)


@pytest.mark.parametrize("key, value, message", [
    ("input_size", [256, "wide"], r"input_size\[1\]: expected an integer, got 'wide'"),
    ("input_size", [256], r"input_size: expected 2 values"),
    ("scale", "1/255", r"scale: expected a number, got '1/255'"),
    ("dynamic_batch", 1, r"dynamic_batch: expected true or false, got 1"),
    ("task", "detection",
     r"task: expected one of 'segmentation', 'generation-noise', 'generation-image', got 'detection'"),
    ("std", [0.2, 0.0, 0.2], r"std\[1\]: expected a number in \[0.0001, 10000\]"),
    ("class_names", ["background"], r"class_names: a segmentation model needs at least 2 classes"),
    ("palette", [[0, 0, 0], [300, 0, 0], [1, 2, 3]], r"palette\[1\]: colour values must be in 0..255"),
    ("ignore_index", 1, r"ignore_index: must not be a class index"),
    ("format_version", 99, r"format_version: this edgepix reads spec versions 1, 2, got 99"),
    ("pad_value", True, r"pad_value: expected an integer, got True"),
])
def test_wrong_values_name_the_field_and_value(key, value, message):
    data = seg_spec().to_dict() | {key: value}
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_dict(data)


def test_generators_must_state_range_and_latent():
    with pytest.raises(SpecError, match="latent_size"):
        ModelSpec(task="generation-noise", model_name="dcgan", input_size=(64, 64), output_range=(-1, 1),
                  output_kind="image")
    with pytest.raises(SpecError, match="output_range"):
        ModelSpec(task="generation-image", model_name="pix2pix", input_size=(256, 256), output_kind="image")


def test_spec_is_immutable():
    spec = seg_spec()
    with pytest.raises(AttributeError):
        spec.model_name = "other"  # type: ignore[misc]
    assert spec.replace(model_name="other").model_name == "other"


def test_default_palette_is_voc():
    assert default_palette(4) == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0))



# ---- sane numbers: checked in the spec's own validation, so every way a spec arrives is held to them -------------

NOISE = dict(task="generation-noise", model_name="dcgan", input_size=(64, 64), latent_size=100, output_range=(-1, 1),
             output_kind="image", mean=(0, 0, 0), std=(1, 1, 1))

# field changes -> the start of the one-line refusal (field, allowed range) and the value it must name
INSANE = {
    "scale 2^63": (dict(scale=2**63), r"scale: expected a number in [1e-06, 1e+06]", "9.223372036854776e+18"),
    "scale 1e-320": (dict(scale=1e-320), r"scale: expected a number in [1e-06, 1e+06]", "1e-320"),
    "std 1e-320": (dict(std=(0.229, 1e-320, 0.225)), "std[1]: expected a number in [0.0001, 10000] for scale "
                   "0.00392157, whose pixels span 0..1", "1e-320"),
    "mean 1e308": (dict(mean=(1e308, 0.456, 0.406)), "mean[0]: expected a number in [-1, 2] for scale 0.00392157",
                   "1e+308"),
    "mean in 0..255 units with scale 1/255": (dict(mean=(123.675, 116.28, 103.53)), "mean[0]: expected a number in "
                                              "[-1, 2]", "123.675"),
    "std of 0": (dict(std=(0.0, 1.0, 1.0)), "std[0]: expected a number in [0.0001, 10000]", "0.0"),
    "size_divisor 0": (dict(size_divisor=0), "size_divisor: expected an integer in 1..65536", "0"),
    "output_stride 2^20": (dict(output_stride=2**20), "output_stride: expected an integer in 1..65536", "1048576"),
    "pad_value 256": (dict(pad_value=256), "pad_value: expected an integer in 0..255", "256"),
}
INSANE_GENERATORS = {
    "latent_size 0": (dict(latent_size=0), "latent_size: expected an integer in 1..65536", "0"),
    "latent_size 2^20": (dict(latent_size=2**20), "latent_size: expected an integer in 1..65536", "1048576"),
    "output_range beyond float16": (dict(output_range=(-1e6, 1)), "output_range[0]: expected a number in "
                                    "[-65504, 65504]", "-1000000.0"),
    "output_range of no width": (dict(output_range=(0, 1e-9)), "output_range: expected low < high, at least 0.001 "
                                 "apart", "1e-09"),
}


def _refused(build, message: str, value: str) -> None:
    with pytest.raises(SpecError) as e:
        build()
    text = str(e.value)
    assert text.startswith(message) and value in text and "\n" not in text, text


@pytest.mark.parametrize("case", sorted(INSANE))
def test_numbers_outside_sane_ranges_are_refused_naming_field_value_and_range(case):
    changes, message, value = INSANE[case]
    _refused(lambda: seg_spec(**changes), message, value)
    _refused(lambda: ModelSpec.from_dict(seg_spec().to_dict() | changes), message, value)  # JSON: every stored form
    _refused(lambda: seg_spec().replace(**changes), message, value)  # replace, as --set and overrides do


@pytest.mark.parametrize("case", sorted(INSANE_GENERATORS))
def test_generator_numbers_outside_sane_ranges_are_refused(case):
    changes, message, value = INSANE_GENERATORS[case]
    _refused(lambda: ModelSpec(**(NOISE | changes)), message, value)


@pytest.mark.parametrize("changes", [
    dict(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),  # ImageNet, pixels in 0..1
    dict(scale=1.0, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)),  # the same in pixel units
    dict(scale=1 / 127.5, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0)),  # inputs in [-1, 1]
    dict(scale=1 / 255, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),  # no normalisation
    dict(scale=1.0, mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0)),  # scaling by std
    dict(scale=1e-6, mean=(0.0, 0.0, 0.0), std=(1e-6, 1e-6, 1e-6)),  # the ends of the scale range
    dict(scale=1e6, mean=(0.0, 0.0, 0.0), std=(1e6, 1e6, 1e6)),
])
def test_real_normalisations_are_accepted(changes):
    assert ModelSpec.from_json(seg_spec(**changes).to_json()).scale == changes.get("scale", 1 / 255)


def test_an_insane_number_is_refused_on_every_path_a_spec_arrives_by(tmp_path):
    """Sidecar files, engine manifests and ONNX metadata all build the spec through its validation."""
    bad = seg_spec().to_dict() | {"std": [0.229, 1e-320, 0.225]}
    (tmp_path / "m.json").write_text(json.dumps(bad))
    (tmp_path / "e.engine.json").write_text(json.dumps({"spec": bad, "tensorrt": "10.3"}))
    for path in (tmp_path / "m.json", tmp_path / "e.engine.json"):
        with pytest.raises(SpecError, match=r"^std\[1\]: expected a number in \[0.0001, 10000\]"):
            ModelSpec.load_json(path)
    with pytest.raises(SpecError, match=r"model.onnx: embedded spec is invalid: std\[1\]: expected a number in"):
        ModelSpec.from_onnx_metadata({"edgepix.spec": json.dumps(bad)}, source="model.onnx")


@pytest.mark.parametrize("setting, message", [
    ("scale=9223372036854775808", "scale: expected a number in [1e-06, 1e+06], got 9.223372036854776e+18"),
    ("scale=1e-320", "scale: expected a number in [1e-06, 1e+06], got 1e-320"),
    ("std=1e-320,1,1", "std[0]: expected a number in [0.0001, 10000]"),
    ("mean=1e308,0,0", "mean[0]: expected a number in [-1, 2]"),
])
def test_spec_set_refuses_insane_numbers_in_one_line_and_writes_nothing(edgepix_cli, tmp_path, setting, message):
    from test_runtime_models import channel_model

    model = channel_model(tmp_path)
    out = tmp_path / "new.onnx"
    r = edgepix_cli("spec", str(model), "--set", setting, "--out", str(out))
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("edgepix spec: error: ") and message in lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["channel.onnx"]
