"""The parity gate: an exported artifact must still compute what the PyTorch model computed.

PyTorch and ONNX Runtime run the same random and real validation inputs, pre-processed by the runtime's own
Normalizer; the comparison, its thresholds and its report are the one comparator's (export/compare.py), which the
TensorRT engine check uses too. A dynamic-size graph is also run at a size it was not traced at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from torch import nn

from edgepix.runtime.core.errors import DataError, require
from edgepix.runtime.core.formats import IMAGE_SUFFIXES
from edgepix.runtime.data.metrics import psnr
from edgepix.runtime.data.synthetic import SceneConfig, make_scene, scene_seed
from edgepix.runtime.description.spec import ModelSpec, Task

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

# Seeds of verification scenes: far from the training (0) and validation (1) seeds of `train seg`.
VERIFY_SEED = 7_000_003


# ---- validation inputs ---------------------------------------------------------------------------------


@dataclass
class Sample:
    image: np.ndarray  # BGR uint8
    mask: np.ndarray | None  # class indices, same H x W as image, or None when unlabelled


def synthetic_samples(n: int, size: tuple[int, int], *, seed: int = VERIFY_SEED) -> list[Sample]:
    config = SceneConfig(size=size)
    return [Sample(*make_scene(scene_seed(seed, i), config)) for i in range(n)]


def folder_samples(folder: str | os.PathLike, n: int) -> list[Sample]:
    """Up to `n` images from a folder (or the images/ of a dataset folder), with masks/ when present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    masks_dir = folder / "masks" if (folder / "masks").is_dir() else None
    stems_file = folder / "val.txt"
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if stems_file.exists():
        wanted = set(stems_file.read_text().split())
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {images_dir}")
    samples = []
    for p in paths[:n]:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"cannot read image {p}")
        mask = None
        if masks_dir is not None:
            mask_path = masks_dir / f"{p.stem}.png"
            mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED) if mask_path.exists() else None
            if mask is not None and mask.ndim != 2:
                mask = None  # colour masks are the trainer's business; the gate uses index masks only
        samples.append(Sample(image, mask))
    return samples


def preprocess(image: np.ndarray, spec: ModelSpec, size: tuple[int, int] | None = None) -> np.ndarray:
    """BGR uint8 image -> (1, C, H, W) float32 input, exactly as the runtime's Segmenter feeds it."""
    from edgepix.runtime.tasks.imageops import Normalizer

    return Normalizer(spec, size or spec.input_size)([image])[0]


# ---- the gate ------------------------------------------------------------------------------------------


def _runners(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec) -> tuple[TorchRunner, BackendRunner]:
    from edgepix.runtime.backends import load_backend

    backend = load_backend(artifact, "ort-cpu", fuse_argmax=None)
    return TorchRunner(model), BackendRunner(backend, spec)


def verify_segmentation(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec, samples: list[Sample],
                        *, thresholds: Thresholds = THRESHOLDS, n_random: int = 2) -> GateReport:
    rng = np.random.default_rng(0)
    sizes = [spec.input_size]
    if spec.dynamic_size:  # a dynamic graph must also hold at a size it was not traced at
        sizes.append((spec.input_size[0] + 2 * spec.size_divisor, spec.input_size[1] + spec.size_divisor))
    random_inputs = [rng.standard_normal((1, 3, *size), dtype=np.float32) for size in sizes for _ in range(n_random)]
    real = [(preprocess(s.image, spec), resize_mask(s.mask, spec.input_size)) for s in samples]
    torch_runner, onnx_runner = _runners(artifact, model.eval(), spec)
    with onnx_runner.backend:
        return compare_segmentation(torch_runner, onnx_runner, spec, random_inputs=random_inputs, samples=real,
                                    artifact_name=str(artifact), thresholds=thresholds)


def verify_generator(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec, samples: list[Sample],
                     *, thresholds: Thresholds = THRESHOLDS, n_random: int = 8) -> GateReport:
    """PSNR between PyTorch's and the artifact's uint8 images, on noise (or random + real images)."""
    rng = np.random.default_rng(0)
    if spec.task is Task.GENERATION_NOISE:
        inputs = [rng.standard_normal((1, spec.latent_size), dtype=np.float32) for _ in range(n_random)]
    else:
        from .generators import generator_input_image  # a mask -> image model is fed palette-coloured masks

        inputs = [preprocess(generator_input_image(s.image, s.mask, spec), spec) for s in samples]
        inputs += [np.clip(rng.standard_normal((1, 3, *spec.input_size), dtype=np.float32), -1, 1)
                   for _ in range(2)]
    torch_runner, onnx_runner = _runners(artifact, model, spec)  # the caller chose eval or train mode
    with onnx_runner.backend:
        return compare_images(torch_runner, onnx_runner, spec, inputs=inputs, artifact_name=str(artifact),
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
           *, thresholds: Thresholds = THRESHOLDS, stochastic: bool = False) -> GateReport:
    """`stochastic`: the artifact samples random dropout masks (a `--train-mode --dropout` export)."""
    require("onnxruntime", extra="cpu", purpose="Verifying exported models")
    if spec.task is Task.SEGMENTATION:
        return verify_segmentation(artifact, model, spec, samples, thresholds=thresholds)
    if stochastic:
        return verify_stochastic_generator(artifact, model, spec, samples)
    return verify_generator(artifact, model, spec, samples, thresholds=thresholds)
