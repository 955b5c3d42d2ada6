"""Transposed convolutions exported in other forms (`--deconv subpixel | col2im`): the same function as PyTorch's
ConvTranspose2d (+ the BatchNorm and ReLU folded into it) at several batch sizes and image sizes, through ONNX
Runtime, through the parity gate and `edgepix export`, and the same images whatever the batch size."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgepix.export.generators import TransposedConvForm, transposed_conv_graph
from edgepix.export.pipeline import ExportRequest, run_export
from edgepix.export.to_onnx import OnnxExportOptions, export_onnx
from edgepix.runtime.core.errors import ExportError
from edgepix.runtime.data.metrics import psnr
from edgepix.runtime.description.spec import ModelSpec
from edgepix.runtime.tasks.generator import NoiseGenerator
from edgepix.train.checkpoint import save_checkpoint, wrap_state_dict
from edgepix.train.registry import create_model

LATENT = 32
DCGAN_KWARGS = {"image_size": 64, "ngf": 16, "latent_size": LATENT}  # widths 128, 64, 32, 16, then RGB


def lively(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights that keep activations near unit scale and BatchNorm statistics far from (0, 1), so a wrong fold, tap
    or phase shows in the output (DCGAN's N(0, 0.02) initialisation shrinks everything towards 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = m.weight.shape[0 if isinstance(m, nn.ConvTranspose2d) else 1] * 4
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def noise_spec() -> ModelSpec:
    return ModelSpec(task="generation-noise", model_name="dcgan", input_size=(64, 64), latent_size=LATENT,
                     output_range=(-1.0, 1.0), output_kind="image", mean=(0.5,) * 3, std=(0.5,) * 3)


def to_uint8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.round((y.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def dcgan_exports(tmp_path_factory):
    """A DCGAN-64 (ngf 16) exported in each form, dynamic batch, with the graph's op counts."""
    tmp = tmp_path_factory.mktemp("forms")
    model = lively(create_model("dcgan", **DCGAN_KWARGS))
    paths = {}
    for form in TransposedConvForm:
        paths[form] = tmp / f"dcgan_{form.value}.onnx"
        export_onnx(model, noise_spec(), paths[form], OnnxExportOptions(
            dynamic_batch=True, deconv=form, opset=18 if form is TransposedConvForm.COL2IM else 17))
    return model, paths


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.LeakyReLU(0.2), None])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_subpixel_layer_equals_convtranspose_batchnorm_activation(activation, batch):
    layers = [nn.ConvTranspose2d(24, 32, 4, 2, 1, bias=True), nn.BatchNorm2d(32)]
    model = lively(nn.Sequential(*layers, *([activation] if activation is not None else [])))
    x = torch.randn(batch, 24, 5, 7, generator=torch.Generator().manual_seed(batch))
    rewritten = transposed_conv_graph(model, TransposedConvForm.SUBPIXEL, x, opset=17, dynamic_size=True)
    assert type(rewritten[0]).__name__ == "SubPixelConvTranspose"
    assert all(isinstance(m, nn.Identity) for m in list(rewritten)[1:])  # folded into the 2x2 convolutions
    assert isinstance(model[0], nn.ConvTranspose2d)  # the caller's model is untouched
    with torch.no_grad():
        expected, got = model(x), rewritten(x)
    assert got.shape == expected.shape == (batch, 32, 10, 14)
    assert float(expected.abs().mean()) > 0.1  # a signal that a wrong tap would change
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_forms_compute_the_same_images_in_onnx_runtime(dcgan_exports, batch):
    model, paths = dcgan_exports
    z = np.random.default_rng(batch).standard_normal((batch, LATENT), dtype=np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(z)).numpy()
    assert reference.std() > 0.2  # images with contrast, not a flat grey
    for form, path in paths.items():
        out = run_onnx(path, z)
        assert out.shape == (batch, 3, 64, 64)
        assert np.abs(out - reference).max() < 1e-5, form
        assert psnr(to_uint8(out), to_uint8(reference)) >= 60, form


def test_each_form_writes_the_graph_it_names(dcgan_exports):
    _, paths = dcgan_exports
    ops = {form: [n.op_type for n in onnx.load(str(path)).graph.node] for form, path in paths.items()}
    assert ops[TransposedConvForm.CONVTRANSPOSE].count("ConvTranspose") == 4
    # three layers of 64, 32 and 16 output channels become four 2x2 Convs each; the RGB layer stays ConvTranspose
    assert ops[TransposedConvForm.SUBPIXEL].count("Conv") == 12
    assert ops[TransposedConvForm.SUBPIXEL].count("ConvTranspose") == 1
    assert ops[TransposedConvForm.SUBPIXEL].count("BatchNormalization") == 1  # the first MatMul's; others folded
    assert ops[TransposedConvForm.COL2IM].count("Col2Im") == 4
    assert "ConvTranspose" not in ops[TransposedConvForm.COL2IM]


@pytest.mark.parametrize("form", list(TransposedConvForm))
def test_images_do_not_depend_on_the_batch_size(dcgan_exports, form):
    _, paths = dcgan_exports
    with NoiseGenerator.load(paths[form], "ort-cpu", threads=2) as gen:
        runs = {b: np.stack(list(gen.generate(12, batch_size=b, seed=7))) for b in (1, 5, 12)}
    assert runs[1].shape == (12, 64, 64, 3)
    assert np.array_equal(runs[1], runs[5]) and np.array_equal(runs[1], runs[12])


def test_subpixel_export_passes_the_gate_and_carries_its_spec(tmp_path, edgepix_cli):
    model = lively(create_model("dcgan", **DCGAN_KWARGS))
    ckpt = tmp_path / "dcgan.pt"
    save_checkpoint(ckpt, wrap_state_dict(model.state_dict(), arch="dcgan", arch_kwargs=DCGAN_KWARGS,
                                          spec=noise_spec()))
    out = tmp_path / "dcgan_subpixel.onnx"
    result = run_export(ExportRequest(ckpt, out=out, onnx=OnnxExportOptions(
        dynamic_batch=True, deconv=TransposedConvForm.SUBPIXEL), verify_n=8))
    assert result.report.passed and result.report.checks[0].measured >= 40
    assert ModelSpec.from_onnx(out) == result.spec and result.spec.dynamic_batch
    assert "Conv" in {n.op_type for n in onnx.load(str(out)).graph.node}

    cli_out = tmp_path / "cli.onnx"
    r = edgepix_cli("export", str(ckpt), "--deconv", "subpixel", "--dynamic-batch", "--verify-n", "4",
                    "--out", str(cli_out))
    assert r.returncode == 0, r.stderr
    assert "PSNR" in r.stdout and ModelSpec.from_onnx(cli_out) is not None
    r = edgepix_cli("export", str(ckpt), "--deconv", "col2im", "--out", str(tmp_path / "c.onnx"))
    assert r.returncode == 1 and "--opset 18" in r.stderr and not (tmp_path / "c.onnx").exists()


@pytest.mark.parametrize("train_mode", [False, True])
def test_subpixel_pix2pix_at_other_sizes_and_in_train_mode(tmp_path, train_mode):
    """A U-Net decoder (ReLU, ConvTranspose, norm, skip Concat): BatchNorm folds in eval mode; in train mode the
    per-image normalisation stays after the interleave. The dynamic-size graph holds at an untraced size."""
    torch.manual_seed(0)
    model = lively(create_model("pix2pix", variant="unet_128", ngf=8))
    spec = ModelSpec(task="generation-image", model_name="pix2pix", input_size=(128, 128), mean=(0.5,) * 3,
                     std=(0.5,) * 3, output_range=(-1, 1), output_kind="image", size_divisor=128)
    paths = {}
    for form in (TransposedConvForm.CONVTRANSPOSE, TransposedConvForm.SUBPIXEL):
        paths[form] = tmp_path / f"{form.value}.onnx"
        export_onnx(model, spec, paths[form], OnnxExportOptions(dynamic_batch=True, dynamic_size=True,
                                                                train_mode=train_mode, deconv=form))
    ops = [n.op_type for n in onnx.load(str(paths[TransposedConvForm.SUBPIXEL])).graph.node]
    assert ops.count("Conv") > 8 and ("InstanceNormalization" in ops) == train_mode
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 256, 128)).astype(np.float32)
    a, b = (run_onnx(p, x) for p in paths.values())
    assert a.shape == b.shape == (2, 3, 256, 128) and a.std() > 0.05
    assert np.abs(a - b).max() < 1e-4


def test_forms_refuse_what_they_cannot_do():
    model = nn.Sequential(nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.ReLU()).eval()
    x = torch.zeros(1, 8, 4, 4)
    with pytest.raises(ExportError, match="no 4x4, stride-2, padding-1 ConvTranspose2d with a multiple of 16"):
        transposed_conv_graph(model, TransposedConvForm.SUBPIXEL, x, opset=17, dynamic_size=False)
    with pytest.raises(ExportError, match="--opset 18"):
        transposed_conv_graph(model, TransposedConvForm.COL2IM, x, opset=17, dynamic_size=False)
    with pytest.raises(ExportError, match="--dynamic-size"):
        transposed_conv_graph(model, TransposedConvForm.COL2IM, x, opset=18, dynamic_size=True)
    assert transposed_conv_graph(model, TransposedConvForm.CONVTRANSPOSE, x, opset=17, dynamic_size=False) is model


@pytest.mark.slow
def test_generate_throughput_reports_every_form_against_torch_and_the_ceiling(tmp_path, capsys):
    from edgepix.benchmarks.generate_throughput import GOAL_CEILING_SHARE, main

    ckpt = tmp_path / "dcgan.pt"
    save_checkpoint(ckpt, wrap_state_dict(lively(create_model("dcgan", **DCGAN_KWARGS)).state_dict(), arch="dcgan",
                                          arch_kwargs=DCGAN_KWARGS, spec=noise_spec()))
    out = tmp_path / "r.json"
    assert main([str(ckpt), "--batches", "1", "4", "--num", "8", "--rounds", "1", "--threads", "1",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # FLOPs from the graph equal the layers' own: 2 * Cin * Cout * 16 * input pixels, summed
    layer_gflop = 2 * 16 * (32 * 128 + 128 * 64 * 16 + 64 * 32 * 64 + 32 * 16 * 256 + 16 * 3 * 1024) / 1e9
    assert r["gflop_per_image"] == pytest.approx(layer_gflop, rel=1e-9)
    run = r["threads"]["1"]
    assert run["per_layer"]["whole graph"]["gflop"] == pytest.approx(layer_gflop, rel=1e-9)
    for row in run["batches"].values():
        assert row["ceiling_gflops"] >= max(row["gemm_ort_gflops"], run["square_gemm_gflops"])
        for form in TransposedConvForm:
            f = row["forms"][form.value]
            assert f["ceiling_share"] == pytest.approx(f["images_per_s"] * layer_gflop / row["ceiling_gflops"])
            assert f["over_torch"] == pytest.approx(f["images_per_s"] / row["torch_images_per_s"])
    best = run["best"]
    assert best["images_per_s"] == max(f["images_per_s"] for row in run["batches"].values()
                                       for f in row["forms"].values())
    assert best["goal_met"] == (best["ceiling_share"] >= GOAL_CEILING_SHARE) and best["generate_cli_images_per_s"] > 0
    assert all(r["gate_psnr_db"][form.value] >= 40 for form in TransposedConvForm)
    assert "per layer, 1 thread(s)" in capsys.readouterr().out
