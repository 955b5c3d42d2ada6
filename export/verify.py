"""The parity gate: an exported artifact must still compute what the PyTorch model computed.

PyTorch and the artifact's backend (ONNX Runtime for ONNX files, LiteRT for a .tflite) run the same random and real
validation inputs, pre-processed by the runtime's own Normalizer in the layout the spec states (NCHW, or NHWC for a
.tflite, whose PyTorch reference then takes NHWC too); the comparison, its thresholds and its report are the one
comparator's (export/compare.py), which the TensorRT engine check uses too. A dynamic-size graph is also run at a
size it was not traced at.
"""

from __future__ import annotations

import os

import numpy as np
from torch import nn

from edgepix.runtime.core.errors import require
from edgepix.runtime.data.metrics import psnr
from edgepix.runtime.description.spec import Layout, ModelSpec, Task

from .compare import (
    THRESHOLDS,
    BackendRunner,
    GateReport,
    Thresholds,
    TorchRunner,
    compare_images,
    compare_segmentation,
    resize_mask,
    to_uint8_image,
)
from .gate import Check
from .samples import VERIFY_SEED, Sample, folder_samples, preprocess, synthetic_samples

# The validation inputs live in export/samples.py (torch-free); these names are imported from here too.
__all__ = ["VERIFY_SEED", "Check", "GateReport", "Sample", "folder_samples", "preprocess", "synthetic_samples",
           "to_uint8_image", "verify", "verify_generator", "verify_segmentation", "verify_stochastic_generator"]


# ---- the gate ------------------------------------------------------------------------------------------


def _runners(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec,
             backend: str = "ort-cpu") -> tuple[TorchRunner, BackendRunner]:
    from edgepix.runtime.backends import load_backend

    loaded = load_backend(artifact, backend, fuse_argmax=None)
    return TorchRunner(model), BackendRunner(loaded, spec)


def image_shape(spec: ModelSpec, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A batch of one image at `size` in the spec's input layout."""
    return (1, 3, *size) if spec.input_layout is Layout.NCHW else (1, *size, 3)


def verify_segmentation(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec, samples: list[Sample],
                        *, thresholds: Thresholds = THRESHOLDS, n_random: int = 2,
                        backend: str = "ort-cpu") -> GateReport:
    rng = np.random.default_rng(0)
    sizes = [spec.input_size]
    if spec.dynamic_size:  # a dynamic graph must also hold at a size it was not traced at
        sizes.append((spec.input_size[0] + 2 * spec.size_divisor, spec.input_size[1] + spec.size_divisor))
    random_inputs = [rng.standard_normal(image_shape(spec, size), dtype=np.float32) for size in sizes
                     for _ in range(n_random)]
    real = [(preprocess(s.image, spec), resize_mask(s.mask, spec.input_size)) for s in samples]
    torch_runner, artifact_runner = _runners(artifact, model.eval(), spec, backend)
    with artifact_runner.backend:
        return compare_segmentation(torch_runner, artifact_runner, spec, random_inputs=random_inputs, samples=real,
                                    artifact_name=str(artifact), thresholds=thresholds)


def verify_generator(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec, samples: list[Sample],
                     *, thresholds: Thresholds = THRESHOLDS, n_random: int = 8,
                     backend: str = "ort-cpu") -> GateReport:
    """PSNR between PyTorch's and the artifact's uint8 images, on noise (or random + real images)."""
    rng = np.random.default_rng(0)
    if spec.task is Task.GENERATION_NOISE:
        inputs = [rng.standard_normal((1, spec.latent_size), dtype=np.float32) for _ in range(n_random)]
    else:
        from .generators import generator_input_image  # a mask -> image model is fed palette-coloured masks

        inputs = [preprocess(generator_input_image(s.image, s.mask, spec), spec) for s in samples]
        inputs += [np.clip(rng.standard_normal(image_shape(spec, spec.input_size), dtype=np.float32), -1, 1)
                   for _ in range(2)]
    torch_runner, artifact_runner = _runners(artifact, model, spec, backend)  # the caller chose eval or train mode
    with artifact_runner.backend:
        return compare_images(torch_runner, artifact_runner, spec, inputs=inputs, artifact_name=str(artifact),
                              thresholds=thresholds)


def verify_stochastic_generator(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec,
                                samples: list[Sample], *, n_inputs: int = 3, k: int = 12,
                                margin_db: float = 1.0) -> GateReport:
    """The gate for graphs with active dropout (`--train-mode --dropout`), whose outputs are random: per input, the
    mean of k artifact outputs must be as close to the mean of k PyTorch outputs as a second, independent PyTorch
    mean is (PSNR within `margin_db`), and the per-pixel spread of the outputs must match (std ratio 0.8-1.25)."""
    from .generators import generator_input_image

    rng = np.random.default_rng(0)
    if spec.task is Task.GENERATION_NOISE:
        inputs = [rng.standard_normal((1, spec.latent_size), dtype=np.float32) for _ in range(n_inputs)]
    else:
        inputs = [preprocess(generator_input_image(s.image, s.mask, spec), spec) for s in samples[:n_inputs]]
    torch_run, onnx_run = _runners(artifact, model, spec)
    torch_a, torch_b, onnx_m, std_t, std_o = [], [], [], [], []
    with onnx_run.backend:
        for x in inputs:
            ta = np.stack([torch_run(x) for _ in range(k)]).astype(np.float64)
            tb = np.stack([torch_run(x) for _ in range(k)]).astype(np.float64)
            oo = np.stack([onnx_run(x) for _ in range(k)]).astype(np.float64)
            torch_a.append(to_uint8_image(ta.mean(0), spec))
            torch_b.append(to_uint8_image(tb.mean(0), spec))
            onnx_m.append(to_uint8_image(oo.mean(0), spec))
            std_t.append(float(ta.std(0).mean()))
            std_o.append(float(oo.std(0).mean()))
    a, b, o = np.concatenate(torch_a), np.concatenate(torch_b), np.concatenate(onnx_m)
    torch_vs_torch = psnr(a, b)
    ratio = float(np.mean(std_o) / max(np.mean(std_t), 1e-12))
    checks = [Check(f"PSNR mean of {k} ONNX vs PyTorch (dB)", psnr(a, o), torch_vs_torch - margin_db, True),
              Check("output std ratio ONNX / PyTorch", ratio, 0.8, True),
              Check("output std ratio ONNX / PyTorch ", ratio, 1.25, False)]
    info = {f"PSNR mean of {k} PyTorch vs PyTorch (dB)": torch_vs_torch, "mean per-pixel std, PyTorch": float(
        np.mean(std_t))}
    return GateReport(str(artifact), spec.precision.value, checks, info)


def verify(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec, samples: list[Sample],
           *, thresholds: Thresholds = THRESHOLDS, stochastic: bool = False, backend: str = "ort-cpu") -> GateReport:
    """`stochastic`: the artifact samples random dropout masks (a `--train-mode --dropout` export). `backend` runs
    the artifact (`litert` for a .tflite); `model` takes the inputs it takes, in the spec's layout."""
    if backend.startswith("ort"):
        require("onnxruntime", extra="cpu", purpose="Verifying exported models")
    if spec.task is Task.SEGMENTATION:
        return verify_segmentation(artifact, model, spec, samples, thresholds=thresholds, backend=backend)
    if stochastic:  # train-mode ONNX exports only
        return verify_stochastic_generator(artifact, model, spec, samples)
    return verify_generator(artifact, model, spec, samples, thresholds=thresholds, backend=backend)
