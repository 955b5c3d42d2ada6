"""GAN training end to end on tiny models: run folder, resume, NaN stop, evaluation, export + parity gate, runtime."""

import csv

import numpy as np
import pytest
import torch

from edgepix.runtime.core.errors import EdgepixError
from edgepix.train.checkpoint import load_checkpoint, model_from_checkpoint
from edgepix.train.gan_trainer import GanTrainConfig, TrainingDiverged, train_gan

pytestmark = pytest.mark.slow


def tiny_dcgan(out, **kw) -> GanTrainConfig:
    args = dict(out=str(out), imgsz=32, batch=8, epochs=2, synthetic_n=24, latent_size=16, sample_n=4,
                model_kwargs={"ngf": 4}, discriminator_kwargs={"ndf": 4}, ema=True, quiet=True, device="cpu")
    args.update(kw)
    return GanTrainConfig.for_kind("dcgan", **args)


def tiny_pix2pix(out, **kw) -> GanTrainConfig:
    args = dict(out=str(out), imgsz=128, batch=2, epochs=1, synthetic_n=4, synthetic_val_n=2, val_n=2, sample_n=2,
                model_kwargs={"ngf": 4}, discriminator_kwargs={"ndf": 4}, quiet=True, device="cpu")
    args.update(kw)
    return GanTrainConfig.for_kind("pix2pix", **args)


@pytest.fixture(scope="module")
def dcgan_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcgan")
    result = train_gan(tiny_dcgan(out))
    return out, result


@pytest.fixture(scope="module")
def pix2pix_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pix2pix")
    result = train_gan(tiny_pix2pix(out))
    return out, result


def test_dcgan_run_folder(dcgan_run):
    out, result = dcgan_run
    assert result.epochs == 2 and not result.stopped_early
    for name in ("last.pt", "metrics.csv", "curves.png", "train.log", "samples/epoch_001.png", "samples/epoch_002.png"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["loss_d"]) > 0 and float(r["loss_g"]) > 0 and int(r["iterations"]) == 3 for r in rows)
    ckpt = load_checkpoint(out / "last.pt")  # weights_only: everything saved is plain data
    spec = ckpt["spec"]
    assert spec.task.value == "generation-noise" and spec.latent_size == 16 and spec.output_range == (-1.0, 1.0)
    assert ckpt["ema"] is not None and set(ckpt["optimizer"]) == {"generator", "discriminator"}
    ema_model = model_from_checkpoint(ckpt)
    raw_model = model_from_checkpoint(ckpt, use_ema=False)
    w_ema, w_raw = (dict(m.named_parameters())["net.0.weight"] for m in (ema_model, raw_model))
    assert not torch.equal(w_ema, w_raw)  # export and evaluation take the EMA weights
    assert torch.equal(w_ema, ckpt["ema"]["net.0.weight"])


def test_resume_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    train_gan(tiny_dcgan(straight, ema=False))
    part = tmp_path / "part"
    train_gan(tiny_dcgan(part, ema=False, epochs=1))
    assert load_checkpoint(part / "last.pt")["epoch"] == 1
    result = train_gan(tiny_dcgan(part, ema=False, epochs=2), resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(part / "last.pt")
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    assert a["history"][1]["loss_d"] == pytest.approx(b["history"][1]["loss_d"], rel=1e-5)
    with pytest.raises(EdgepixError, match="already holds a run"):
        train_gan(tiny_dcgan(part))


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from edgepix.train import gan_losses

    out = tmp_path / "nan"
    train_gan(tiny_dcgan(out, epochs=1, ema=False))
    good = load_checkpoint(out / "last.pt")
    real_g_loss = gan_losses.GANLoss.g_loss
    calls = {"n": 0}

    def poisoned(self, logits):
        calls["n"] += 1
        value = real_g_loss(self, logits)
        return value * float("nan") if calls["n"] == 2 else value

    monkeypatch.setattr(gan_losses.GANLoss, "g_loss", poisoned)
    with pytest.raises(TrainingDiverged) as info:
        train_gan(tiny_dcgan(out, epochs=2, ema=False), resume=True)
    message = str(info.value)
    assert "generator's loss became nan" in message and "epoch 2, iteration 2" in message
    assert "last good checkpoint" in message and "(epoch 1)" in message
    kept = load_checkpoint(out / "last.pt")
    assert kept["epoch"] == 1
    for k, v in good["model"].items():
        assert torch.equal(v, kept["model"][k])


def test_pix2pix_run_and_val_gen(pix2pix_run, tmp_path):
    from edgepix.runtime.data.synthetic import CLASS_NAMES, PALETTE
    from edgepix.runtime.description.spec import ModelSpec
    from edgepix.train.checkpoint import save_checkpoint, wrap_state_dict
    from edgepix.train.gan_eval import evaluate_pix2pix
    from edgepix.train.registry import create_model

    # An untrained segmenter is enough to exercise the consistency score's plumbing (the numbers are in the README).
    torch.manual_seed(0)
    seg_checkpoint = tmp_path / "seg.pt"
    seg_spec = ModelSpec(task="segmentation", model_name="fastscnn", input_size=(64, 64), class_names=CLASS_NAMES,
                         palette=PALETTE)
    save_checkpoint(seg_checkpoint, wrap_state_dict(create_model("fastscnn", num_classes=6).state_dict(),
                                                    arch="fastscnn", arch_kwargs={"num_classes": 6}, spec=seg_spec))
    out, result = pix2pix_run
    assert (out / "best.pt").exists() and (out / "samples" / "epoch_001.png").exists()
    row = result.final_metrics
    assert 0 < row["val_l1"] < 2 and 0 < row["val_psnr"] < 60 and row["loss_l1"] > 0
    spec = load_checkpoint(out / "last.pt")["spec"]
    assert spec.task.value == "generation-image" and spec.size_divisor == 128 and len(spec.palette) == 6
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    report = evaluate_pix2pix(out / "last.pt", "synthetic", seg=seg_checkpoint, n=2, quiet=True)
    g, base, real = report.generator, report.baseline, report.real
    assert 0 <= g.l1 <= 1 and -1 <= g.ssim <= 1 and 0 < g.psnr < 60
    assert 0 <= g.seg_miou <= 1 and 0 <= real.seg_miou <= 1 and base.psnr > 5
    assert "baseline: class mean colour" in report.format()
    # pix2pix trains on lit scenes by default (a mask predicts them); evaluation follows the checkpoint's choice.
    assert load_checkpoint(out / "last.pt")["train_config"]["scenes"] == "lit"
    assert report.data == "synthetic (lit scenes)"
    varied = evaluate_pix2pix(out / "last.pt", "synthetic", n=2, quiet=True, scenes="varied")
    assert varied.data == "synthetic (varied scenes)" and varied.baseline.psnr != base.psnr


def test_cli_train_and_val(edgepix_cli, tmp_path):
    out = tmp_path / "cli"
    r = edgepix_cli("-q", "train", "gan", "--data", "synthetic", "--model", "dcgan", "--imgsz", "32", "--epochs", "1",
                    "--batch", "8", "--synthetic-n", "16", "--latent-size", "8", "--model-arg", "ngf=4",
                    "--disc-arg", "ndf=4", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert (out / "last.pt").exists() and (out / "samples" / "epoch_001.png").exists()
    r = edgepix_cli("val", "gen", str(out / "last.pt"), "--data", "synthetic", "--n", "16")
    assert r.returncode == 0, r.stderr
    assert "pixels16" in r.stdout and "randconv" in r.stdout and "diversity ratio band" in r.stdout
    r = edgepix_cli("train", "gan", "--data", "synthetic", "--out", str(out), "--device", "cpu")
    assert r.returncode == 1 and "already holds a run" in r.stderr


# ---- export, parity gate, runtime ----------------------------------------------------------------------


def test_dcgan_export_gate_and_runtime(dcgan_run, tmp_path):
    from edgepix.export.pipeline import ExportFormat, ExportRequest, run_export
    from edgepix.export.to_onnx import OnnxExportOptions
    from edgepix.runtime.tasks.generator import NoiseGenerator
    from edgepix.train.gan_trainer import to_uint8_bgr

    out, _ = dcgan_run
    onnx_path = tmp_path / "g.onnx"
    result = run_export(ExportRequest(out / "last.pt", out=onnx_path,
                                      onnx=OnnxExportOptions(dynamic_batch=True, uint8_output=True)))
    assert result.report.passed and result.report.checks[0].measured >= 40
    assert result.spec.output_kind.value == "image_uint8"
    fp16 = run_export(ExportRequest(out / "last.pt", out=tmp_path / "g16.onnx", format=ExportFormat.ONNX_FP16))
    assert fp16.report.checks[0].measured >= 30
    model = model_from_checkpoint(load_checkpoint(out / "last.pt"))
    with NoiseGenerator.load(onnx_path, "ort-cpu") as gen:
        z = gen.latents(5, seed=3)
        images = gen.generate_from(z)
    with torch.no_grad():
        expected = to_uint8_bgr(model(torch.from_numpy(z)))
    diff = np.abs(np.stack(images).astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


@pytest.mark.parametrize("mode", ["eval", "train", "train+dropout"])
def test_pix2pix_export_modes(pix2pix_run, tmp_path, mode):
    import onnxruntime as ort

    from edgepix.export.pipeline import ExportRequest, run_export
    from edgepix.export.to_onnx import OnnxExportOptions

    out, _ = pix2pix_run
    options = OnnxExportOptions(train_mode=mode != "eval", dropout=mode == "train+dropout", dynamic_batch=True)
    path = tmp_path / "p.onnx"
    result = run_export(ExportRequest(out / "last.pt", out=path, onnx=options, verify_n=2))
    assert result.report.passed, result.report.format()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    y1, y2 = (session.run(None, {"images": x})[0] for _ in range(2))
    ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    if mode == "eval":
        assert "BatchNormalization" not in ops and "InstanceNormalization" not in ops  # folded into the convs
    else:
        assert "InstanceNormalization" in ops  # each image normalised with its own statistics
    assert ("RandomUniformLike" in ops) == (mode == "train+dropout")
    assert np.array_equal(y1, y2) == (mode != "train+dropout")
    if mode == "train":
        # Per-image statistics: batching images does not change any image's output.
        x2 = np.concatenate([x, -x])
        assert np.allclose(session.run(None, {"images": x2})[0][0], y1[0], atol=1e-5)


def test_torchrun_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617", "-m",
           "edgepix", "-q", "train", "gan", "--data", "synthetic", "--imgsz", "32", "--epochs", "1", "--batch", "8",
           "--synthetic-n", "32", "--latent-size", "8", "--model-arg", "ngf=4", "--disc-arg", "ndf=4", "--out",
           str(out), "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 and int(rows[0]["iterations"]) == 32 // 8  # --batch is global: 4 per process
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 1 and len(ckpt["rng"]["torch"]) == 2


def test_pix2pix_int8_cpu_keeps_transposed_convolutions_float(pix2pix_run, tmp_path):
    """ONNX Runtime's CPU provider has no integer ConvTranspose: the cpu target quantizes the encoder's convolutions
    and leaves the decoder's transposed convolutions float (no Q/DQ pairs around them); tensorrt keeps them."""
    import onnx

    from edgepix.export.pipeline import ExportFormat, ExportRequest, run_export
    from edgepix.export.precision import Int8Options, Int8Target

    out, _ = pix2pix_run

    def weight_producers(path):
        graph = onnx.load(str(path)).graph
        producer = {o: n.op_type for n in graph.node for o in n.output}
        found: dict[str, set[str]] = {}
        for n in graph.node:
            if n.op_type in ("Conv", "ConvTranspose"):
                found.setdefault(n.op_type, set()).add(producer.get(n.input[1], "initializer"))
        return found

    cpu = run_export(ExportRequest(out / "last.pt", out=tmp_path / "cpu.onnx", format=ExportFormat.ONNX_INT8,
                                   calib_n=4, verify_n=2))
    assert cpu.report.passed, cpu.report.format()
    assert weight_producers(cpu.path) == {"Conv": {"DequantizeLinear"}, "ConvTranspose": {"initializer"}}
    trt = run_export(ExportRequest(out / "last.pt", out=tmp_path / "trt.onnx", format=ExportFormat.ONNX_INT8,
                                   calib_n=4, verify=False, int8=Int8Options(target=Int8Target.TENSORRT)))
    assert weight_producers(trt.path)["ConvTranspose"] == {"DequantizeLinear"}
