"""Hugging Face segmentation models: from a `save_pretrained` folder to a verified export, fine-tuning, and `edgepix
spec` for ONNX files made elsewhere.

Every model here is built from a small config with random weights and saved into a temporary folder with an id2label
of real-sounding names and a preprocessor config whose mean/std are not ImageNet's: nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="the hub extra is not installed (pip install 'edgepix[hub]')")
torch = pytest.importorskip("torch")

from conftest import run_edgepix  # noqa: E402

from edgepix.export.pipeline import ExportFormat, ExportRequest, run_export  # noqa: E402
from edgepix.export.to_onnx import Exporter, OnnxExportOptions  # noqa: E402
from edgepix.runtime.core.errors import EdgepixError, ExportError, ModelFormatError  # noqa: E402
from edgepix.runtime.data.synthetic import CLASS_NAMES  # noqa: E402

STREET = ["road", "sidewalk", "building", "vegetation", "sky", "person", "car"]
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.2, 0.3]


def _configs():
    from transformers import (
        ConvNextConfig,
        DPTConfig,
        MobileViTConfig,
        MobileViTV2Config,
        SegformerConfig,
        UperNetConfig,
    )

    labels = {"id2label": dict(enumerate(STREET)), "label2id": {n: i for i, n in enumerate(STREET)}}
    return {
        "segformer": SegformerConfig(hidden_sizes=[16, 32, 48, 64], decoder_hidden_size=32, depths=[1, 1, 1, 1],
                                     num_attention_heads=[1, 1, 2, 2], **labels),
        "mobilevit": MobileViTConfig(hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                                     aspp_out_channels=32, **labels),
        "mobilevitv2": MobileViTV2Config(width_multiplier=0.5, aspp_out_channels=32, **labels),
        "dpt": DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                         image_size=128, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                         neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8, **labels),
        "upernet": UperNetConfig(backbone_config=ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                                                out_features=["stage1", "stage2", "stage3", "stage4"]),
                                 hidden_size=16, auxiliary_channels=8, pool_scales=[1, 2, 4], **labels),
    }


# Two export sizes per architecture (multiples of 32; UperNet's pyramid pooling needs its 1/32 map divisible by 4).
SIZES = {"segformer": [(64, 96), (128, 128)], "mobilevit": [(128, 128), (160, 160)],
         "mobilevitv2": [(128, 128), (160, 160)], "dpt": [(128, 128), (160, 160)],
         "upernet": [(128, 128), (256, 256)]}


# DPT's ViT backbone reshapes its tokens into a square grid: its processors ask for square images.
PROCESSOR_SIZE = {"dpt": {"height": 128, "width": 128}}


def save_folder(arch: str, folder: Path, *, labels: list[str] | None = None) -> Path:
    """`save_pretrained` of a random model whose weights are jittered, so that its logits are far from ties."""
    from transformers import AutoModelForSemanticSegmentation

    config = _configs()[arch]
    if labels is not None:
        config.id2label, config.label2id = dict(enumerate(labels)), {n: i for i, n in enumerate(labels)}
    torch.manual_seed(0)
    model = AutoModelForSemanticSegmentation.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SegformerImageProcessor", "do_resize": True, "size": PROCESSOR_SIZE.get(arch, {
            "height": 96, "width": 128}),
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = save_folder(arch, tmp_path_factory.mktemp(arch) / f"{arch}-tiny")
        return made[arch]

    return get


def test_spec_is_filled_from_the_folder(folders):
    from edgepix.train.checkpoint import load_source

    ckpt, model = load_source(folders("segformer"))
    spec = ckpt["spec"]
    assert spec.class_names == tuple(STREET)
    assert spec.mean == tuple(MEAN) and spec.std == tuple(STD) and spec.scale == pytest.approx(1 / 255)
    assert spec.input_size == (96, 128) and spec.channel_order.value == "RGB"
    assert spec.output_stride == 4  # SegFormer's logits come out at 1/4 of the input
    assert ckpt["arch"] == "hf" and ckpt["arch_kwargs"]["config"]["model_type"] == "segformer"
    assert "segformer-tiny" not in json.dumps(ckpt["arch_kwargs"])  # the config, not a path to the folder


def test_the_real_image_processor_files_are_read(tmp_path):
    """preprocessor_config.json as transformers' own image processor writes it."""
    from edgepix.runtime.description.hfconfig import read_hf_folder, spec_fields

    folder = save_folder("segformer", tmp_path / "seg")
    processor = getattr(transformers, "SegformerImageProcessorPil", None) or transformers.SegformerImageProcessor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor(image_mean=[0.3, 0.3, 0.3], image_std=[0.1, 0.2, 0.3],
                  size={"height": 256, "width": 320}).save_pretrained(folder)
    fields = spec_fields(read_hf_folder(folder))
    assert fields["mean"] == (0.3, 0.3, 0.3) and fields["std"] == (0.1, 0.2, 0.3)
    assert fields["input_size"] == (256, 320) and fields["scale"] == pytest.approx(1 / 255)


@pytest.mark.parametrize("arch", list(SIZES))
def test_head_replacement_keeps_every_other_weight_bit_identical(arch, folders, caplog):
    from edgepix.train.models.hf import pretrained

    saved = _reference_state(folders(arch))
    new_names = list(CLASS_NAMES)
    with caplog.at_level(logging.INFO, logger="edgepix.train"):
        model = pretrained(folders(arch), class_names=new_names)
    state = {k.removeprefix("hf."): v for k, v in model.state_dict().items()}
    head = {k.removeprefix("hf.") for k in model.head_parameter_names()}
    assert head and all(state[k].shape[0] == len(new_names) for k in head)
    assert all(saved[k].shape[0] == len(STREET) for k in head)
    kept = [k for k in saved if k not in head]
    assert kept and all(torch.equal(saved[k], state[k]) for k in kept)
    assert model.config.id2label == dict(enumerate(new_names))
    assert "replaced the classifier" in caplog.text and "ellipse" in caplog.text


def test_same_number_of_different_classes_still_gets_a_new_head(folders):
    from edgepix.train.models.hf import pretrained

    renamed = [f"{n}-x" for n in STREET]
    model = pretrained(folders("segformer"), class_names=renamed)
    original = pretrained(folders("segformer"))
    head = model.head_parameter_names()
    assert any(not torch.equal(model.state_dict()[k], original.state_dict()[k]) for k in head)
    assert pretrained(folders("segformer"), class_names=STREET).state_dict().keys() == original.state_dict().keys()


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(SIZES))
def test_export_passes_the_gate_at_two_sizes(arch, folders, tmp_path):
    from edgepix.train.models.hf import ARCHITECTURES

    exporter = Exporter(ARCHITECTURES[arch].exporter or "torchscript")
    opset = 18 if exporter is Exporter.DYNAMO else 17
    for size in SIZES[arch]:
        result = run_export(ExportRequest(folders(arch), out=tmp_path / f"{arch}-{size[0]}.onnx", verify_n=3,
                                          onnx=OnnxExportOptions(imgsz=size, exporter=exporter, opset=opset)))
        checks = {c.name: c.measured for c in result.report.checks}
        assert result.report.passed, result.report.format()
        assert checks["max abs logit difference"] <= 1e-4 and checks["argmax agreement"] >= 0.999
        assert result.spec.input_size == size and result.spec.class_names == tuple(STREET)
    # The logits are not degenerate: the gate compared real numbers.
    with torch.no_grad():
        logits = _model(folders(arch))(torch.randn(1, 3, *SIZES[arch][0]))
    assert float(logits.std()) > 1e-2


@pytest.mark.slow
def test_argmax_export_of_low_resolution_logits_runs_in_the_segmenter(folders, tmp_path):
    """SegFormer's class map comes out of the graph at 1/4 of the input; the runtime maps it to the frame exactly
    as it maps the argmax of low-resolution logits."""
    from edgepix.runtime import Segmenter

    folder = folders("segformer")
    logits = run_export(ExportRequest(folder, out=tmp_path / "logits.onnx", verify_n=3,
                                      onnx=OnnxExportOptions(imgsz=(96, 128))))
    argmax = run_export(ExportRequest(folder, out=tmp_path / "argmax.onnx", verify_n=3,
                                      onnx=OnnxExportOptions(imgsz=(96, 128), argmax=True)))
    assert argmax.report.passed and argmax.spec.output_kind.value == "class_map"
    frame = np.random.default_rng(0).integers(0, 255, (150, 210, 3), dtype=np.uint8)
    # The graph decides at the model's size: the logits model too, with upsample classes (not the default scores).
    with Segmenter.load(argmax.path, backend="ort-cpu") as a, Segmenter.load(logits.path, backend="ort-cpu",
                                                                            fuse_argmax=False, upsample="classes") as b:
        ra, rb = a.segment(frame), b.segment(frame)
    assert ra.class_map.shape == (150, 210) and ra.model_map.shape == (24, 32)
    assert float((ra.class_map == rb.class_map).mean()) >= 0.999


def _reference_state(folder: Path) -> dict:
    """The folder's weights as transformers itself loads them (its in-memory names, not the file's)."""
    from transformers import AutoModelForSemanticSegmentation

    return AutoModelForSemanticSegmentation.from_pretrained(folder).state_dict()


def _model(folder: Path):
    from edgepix.train.checkpoint import load_source

    return load_source(folder)[1]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "untraced"), [("segformer", (96, 224)), ("mobilevitv2", (160, 224))])
def test_dynamic_size_export_computes_the_same_at_an_untraced_size(arch, untraced, folders, tmp_path):
    from edgepix.runtime.description.onnxinfo import open_session
    from edgepix.train.models.hf import ARCHITECTURES

    exporter = Exporter(ARCHITECTURES[arch].exporter or "torchscript")
    options = OnnxExportOptions(imgsz=(128, 128), dynamic_size=True, exporter=exporter,
                                opset=18 if exporter is Exporter.DYNAMO else 17)
    result = run_export(ExportRequest(folders(arch), out=tmp_path / "dyn.onnx", verify_n=2, onnx=options))
    assert result.report.passed and result.spec.dynamic_size
    session = open_session(result.path)
    x = np.random.default_rng(1).standard_normal((1, 3, *untraced), dtype=np.float32)  # traced at 128x128
    out = session.run(None, {"images": x})[0]
    with torch.no_grad():
        ref = _model(folders(arch))(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape and float(np.abs(out - ref).max()) <= 1e-4


@pytest.mark.parametrize(("arch", "options", "words"), [
    ("mobilevit", {"dynamic_size": True}, "patch grid"),
    ("upernet", {"dynamic_size": True}, "pyramid pooling"),
    ("dpt", {"dynamic_size": True}, "square grid"),
    ("mobilevitv2", {}, "--exporter dynamo"),
])
def test_what_cannot_export_is_named_before_export(arch, options, words, folders, tmp_path, monkeypatch):
    import edgepix.export.to_onnx as to_onnx

    def no_export(*args, **kwargs):
        raise AssertionError("torch.onnx.export ran although the audit knew it would fail")

    monkeypatch.setattr(to_onnx, "_torch_export", no_export)
    with pytest.raises(ExportError) as e:
        run_export(ExportRequest(folders(arch), out=tmp_path / "m.onnx", onnx=OnnxExportOptions(**options)))
    message = str(e.value)
    assert "\n" not in message and words in message and arch in message
    assert not (tmp_path / "m.onnx").exists()


def test_a_folder_without_safetensors_or_with_a_classifier_config_is_refused_in_one_line(tmp_path, folders):
    from edgepix.train.models.hf import pretrained

    bare = tmp_path / "bare"
    shutil.copytree(folders("segformer"), bare)
    (bare / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no model.safetensors"):
        pretrained(bare)
    classifier = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           id2label={0: "cat", 1: "dog"}).save_pretrained(classifier)
    (classifier / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="not a semantic-segmentation architecture"):
        pretrained(classifier)


@pytest.mark.slow
def test_fine_tuning_replaces_the_head_freezes_the_backbone_and_resumes_offline(folders, tmp_path):
    """The trainer's whole path for hf: models: a new head for the dataset's classes, the folder's normalisation,
    the backbone frozen for the first epoch and at lr x ratio after, a checkpoint that resumes without the folder,
    and an INT8 export of it through the gate (logits at 1/4, scored as the runtime delivers them)."""
    from edgepix.train.checkpoint import load_checkpoint
    from edgepix.train.segmentation import SegTrainConfig, train_segmentation

    folder = tmp_path / "pretrained"
    shutil.copytree(folders("segformer"), folder)
    saved = _reference_state(folder)
    cfg = SegTrainConfig(data="synthetic", out=str(tmp_path / "run"), model=f"hf:{folder}", imgsz=(64, 64), epochs=2,
                         batch=4, synthetic_n=8, synthetic_val_n=4, threads=1, workers=0, quiet=True,
                         freeze_epochs=1, pretrained_lr_ratio=0.1, lr=2e-3)

    def stop_after_first(epoch: int, row: dict) -> None:  # last.pt of the epoch is written before this runs
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(cfg, on_epoch_end=stop_after_first)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "replaced the classifier of segformer for 6 classes" in log and "the model had 7: road" in log
    assert "backbone frozen from epoch 1" in log and "at lr x 0.1" in log
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["arch"] == "hf" and ckpt["arch_kwargs"]["config"]["id2label"]["0"] == "background"
    spec = ckpt["spec"]
    assert spec.class_names == CLASS_NAMES and spec.mean == tuple(MEAN) and spec.std == tuple(STD)
    assert spec.output_stride == 4
    assert sorted({g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]}) == pytest.approx([2e-4, 2e-3])
    backbone = [k for k in saved if k.startswith("segformer.")]
    assert backbone and all(torch.equal(saved[k], ckpt["model"][f"hf.{k}"]) for k in backbone)  # frozen
    assert not torch.equal(saved["decode_head.linear_fuse.weight"], ckpt["model"]["hf.decode_head.linear_fuse.weight"])

    shutil.rmtree(folder)  # the checkpoint holds the config: resuming needs no folder
    train_segmentation(cfg, resume=True)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 2
    assert any(not torch.equal(saved[k], ckpt["model"][f"hf.{k}"]) for k in backbone)  # unfrozen in epoch 2

    result = run_export(ExportRequest(tmp_path / "run" / "last.pt", format=ExportFormat.ONNX_INT8,
                                      out=tmp_path / "int8.onnx", calib_n=8, verify_n=6))
    assert result.report.passed, result.report.format()
    assert result.spec.precision.value == "int8" and result.spec.output_stride == 4


def test_freeze_epochs_needs_a_pretrained_model(tmp_path):
    from edgepix.train.segmentation import SegTrainConfig, train_segmentation

    cfg = SegTrainConfig(data="synthetic", out=str(tmp_path / "run"), model="fastscnn", imgsz=(64, 64), epochs=2,
                         batch=4, synthetic_n=8, synthetic_val_n=4, threads=1, quiet=True, freeze_epochs=1)
    with pytest.raises(EdgepixError, match="--freeze-epochs needs a pretrained model"):
        train_segmentation(cfg)


def test_val_and_torch_baseline_take_a_folder(tmp_path):
    from edgepix.benchmarks.torch_baseline import TorchBackend
    from edgepix.train.segmentation import evaluate_checkpoint

    folder = save_folder("segformer", tmp_path / "synthetic-classes", labels=list(CLASS_NAMES))
    result = evaluate_checkpoint(folder, "synthetic", synthetic_n=4, quiet=True, device="cpu")
    assert result.samples == 4 and 0.0 <= result.metrics.miou <= 1.0
    with TorchBackend(folder, threads=1, imgsz=(64, 64)) as b:
        out = b.infer({"images": np.zeros((1, 3, 64, 64), np.float32)})
    assert next(iter(out.values())).shape == (1, len(CLASS_NAMES), 16, 16)


# ---- edgepix spec: a spec for any ONNX file -------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_onnx(folders, tmp_path_factory) -> Path:
    """A SegFormer exported straight from transformers (no edgepix): pixel_values in, logits out, dynamic axes."""
    from transformers import AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(folders("segformer")).eval()
    path = tmp_path_factory.mktemp("foreign") / "segformer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 128, 128),), str(path), input_names=["pixel_values"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"},
                                        "logits": {0: "batch", 2: "h", 3: "w"}})
    return path


def test_spec_set_gives_a_foreign_model_a_spec_the_runtime_uses(foreign_onnx, folders, tmp_path):
    from edgepix.runtime import Segmenter
    from edgepix.runtime.description.foreign import ForeignModelWarning
    from edgepix.runtime.description.onnxproto import read_onnx_header

    out = tmp_path / "described.onnx"
    r = run_edgepix("spec", str(foreign_onnx), "--from-hf", str(folders("segformer")), "--set",
                    "input_size=128,160", "model_name=street-segformer", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and "street-segformer" in r.stdout
    before, after = foreign_onnx.read_bytes(), out.read_bytes()
    assert len(after) > len(before) and after.startswith(before[:64])
    header = read_onnx_header(out)
    spec = json.loads(header.metadata["edgepix.spec"])
    assert spec["class_names"] == STREET and spec["mean"] == MEAN and spec["std"] == STD
    assert spec["input_size"] == [128, 160] and spec["output_stride"] == 4 and spec["input_name"] == "pixel_values"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForeignModelWarning)
        with Segmenter.load(out, backend="ort-cpu") as seg:
            result = seg.segment(np.zeros((120, 150, 3), np.uint8))
            assert seg.class_names == tuple(STREET) and result.class_map.shape == (120, 150)
            assert seg.renderer.class_names == tuple(STREET)


def test_spec_set_refuses_invalid_values_with_one_line_naming_the_field(foreign_onnx, tmp_path):
    out = tmp_path / "x.onnx"
    cases = [(["classes=a,b"], "7 channels"), (["mean=1,2"], "mean"), (["std=0,1,1"], "std"),
             (["scale=abc"], "scale"), (["precision=int8"], "precision"), (["channel_order=RGBA"], "channel_order"),
             (["nokey"], "KEY=VALUE")]
    for values, words in cases:
        r = run_edgepix("spec", str(foreign_onnx), "--set", *values, "--out", str(out))
        assert r.returncode == 1, (values, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (values, r.stderr)
        assert not out.exists()
    r = run_edgepix("spec", str(foreign_onnx), "--set", "classes=a,b,c,d,e,f,g")
    assert r.returncode == 1 and "--out" in r.stderr


def test_spec_round_trip_keeps_the_graph_and_prints_the_assumptions(foreign_onnx, tmp_path):
    r = run_edgepix("spec", str(foreign_onnx), "--json")
    assert r.returncode == 0, r.stderr
    assumed = json.loads(r.stdout)
    assert assumed["class_names"][0] == "class0" and assumed["output_stride"] == 4
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run_edgepix("spec", str(foreign_onnx), "--set", f"classes={','.join(STREET)}", "--out",
                       str(first)).returncode == 0
    palette = tmp_path / "palette.json"
    palette.write_text(json.dumps([[i * 30, 255 - i * 30, 7] for i in range(len(STREET))]))
    assert run_edgepix("spec", str(first), "--palette", str(palette), "--out", str(second)).returncode == 0
    shown = json.loads(run_edgepix("spec", str(second), "--json").stdout)
    assert shown["class_names"] == STREET and shown["palette"][1] == [30, 225, 7]
    # Only the metadata entry was replaced: every other field of the file is the same bytes.
    assert _without_metadata(second.read_bytes()) == _without_metadata(foreign_onnx.read_bytes())


def _without_metadata(data: bytes) -> bytes:
    from edgepix.runtime.description.onnxedit import _raw_fields

    return b"".join(bytes(raw) for number, _, _, raw in _raw_fields(memoryview(data)) if number != 14)


def test_info_reads_a_folder_without_loading_the_model(folders):
    r = run_edgepix("info", str(folders("segformer")), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "hugging-face-folder" and info["arch"] == "segformer"
    assert info["spec"]["class_names"] == STREET and info["spec"]["mean"] == MEAN and info["spec"]["std"] == STD
    assert info["spec"]["input_size"] == [96, 128] and "model.safetensors" in info["metadata"]["files"]
