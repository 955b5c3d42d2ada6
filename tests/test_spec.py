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
    ("std", [0.2, 0.0, 0.2], r"std: every value must be positive"),
    ("class_names", ["background"], r"class_names: a segmentation model needs at least 2 classes"),
    ("palette", [[0, 0, 0], [300, 0, 0], [1, 2, 3]], r"palette\[1\]: colour values must be in 0..255"),
    ("ignore_index", 1, r"ignore_index: must not be a class index"),
    ("format_version", 99, r"format_version: this edgepix reads spec version 1, got 99"),
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
