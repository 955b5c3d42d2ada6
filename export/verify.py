"""The parity gate: an exported artifact must still compute what the PyTorch model computed.

PyTorch and ONNX Runtime run the same random and real validation inputs. Thresholds (from the export issue):

| artifact | check | threshold |
|---|---|---|
| segmentation FP32 | max abs logit difference (random and real inputs) | <= 1e-4 |
| segmentation FP32 | argmax agreement on real inputs | >= 99.9% |
| segmentation FP16 | argmax agreement on real inputs | >= 99.5% |
| segmentation INT8 | mIoU drop vs PyTorch FP32 on labelled validation scenes | <= 1.0 point |
| generator FP32 / FP16 / INT8 | PSNR vs PyTorch (uint8 images) | >= 40 / 30 / 25 dB |

Artifacts whose graph ends in ArgMax are held to the argmax checks only (they have no logits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from edgepix.runtime.errors import DataError, ExportError, require
from edgepix.runtime.imageops import Geometry, map_to_frame
from edgepix.runtime.metrics import ConfusionMatrix, psnr
from edgepix.runtime.onnxinfo import open_session
from edgepix.runtime.spec import ModelSpec, OutputKind, Precision, Task
from edgepix.runtime.synthetic import SceneConfig, make_scene, scene_seed

from .gate import Check

# Seeds of verification scenes: far from the training (0) and validation (1) seeds of `train seg`.
VERIFY_SEED = 7_000_003
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Thresholds:
    fp32_max_abs: float = 1e-4
    fp32_agreement: float = 0.999
    fp16_agreement: float = 0.995
    int8_miou_drop: float = 0.01
    psnr_db: dict = field(default_factory=lambda: {Precision.FP32: 40.0, Precision.FP16: 30.0, Precision.INT8: 25.0})


@dataclass
class GateReport:
    artifact: str
    precision: str
    checks: list[Check]
    info: dict[str, float] = field(default_factory=dict)  # measured but not gated
    per_class: list[tuple[str, float, float]] = field(default_factory=list)  # (class, IoU torch, IoU artifact)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def format(self) -> str:
        lines = [f"parity gate for {self.artifact} ({self.precision}): {'PASS' if self.passed else 'FAIL'}",
                 f"  {'check':<34}{'measured':>12}{'threshold':>14}  result"]
        for c in self.checks:
            op = ">=" if c.higher_is_better else "<="
            lines.append(f"  {c.name:<34}{_num(c.measured):>12}{op + ' ' + _num(c.threshold):>14}  "
                         f"{'ok' if c.passed else 'FAIL'}")
        for k, v in self.info.items():
            lines.append(f"  {k:<34}{_num(v):>12}{'(info)':>14}")
        if self.per_class:
            lines.append(f"  {'class':<20}{'IoU torch':>10}{'IoU artifact':>14}{'delta':>9}")
            for name, a, b in self.per_class:
                lines.append(f"  {name:<20}{a:>10.4f}{b:>14.4f}{b - a:>+9.4f}")
        return "\n".join(lines)


def _num(v: float) -> str:
    if v == 0 or np.isnan(v) or np.isinf(v):
        return str(v)
    return f"{v:.3e}" if abs(v) < 1e-2 else f"{v:.4f}"


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
    from edgepix.runtime.imageops import Normalizer

    return Normalizer(spec, size or spec.input_size)([image])[0]


# ---- the gate ------------------------------------------------------------------------------------------


def _run_onnx(session, spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    try:
        return session.run([spec.output_name], {spec.input_name: x})[0]
    except Exception as e:  # ONNX Runtime raises its own exception types; one line names the input that failed
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"the exported graph fails on an input of shape {x.shape}: {reason}") from e


@torch.no_grad()
def _run_torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(x)).float().numpy()


def verify_segmentation(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec, samples: list[Sample],
                        *, thresholds: Thresholds = Thresholds(), n_random: int = 2) -> GateReport:
    session = open_session(artifact)
    model = model.eval().float()
    class_map = spec.output_kind is OutputKind.CLASS_MAP
    rng = np.random.default_rng(0)
    max_abs = 0.0
    sizes = [spec.input_size]
    if spec.dynamic_size:  # a dynamic graph must also hold at a size it was not traced at
        sizes.append((spec.input_size[0] + 2 * spec.size_divisor, spec.input_size[1] + spec.size_divisor))
    for size in sizes:
        for _ in range(n_random):
            x = rng.standard_normal((1, 3, *size), dtype=np.float32)
            ref, out = _run_torch(model, x), _run_onnx(session, spec, x)
            if not class_map:
                max_abs = max(max_abs, float(np.abs(ref - out).max()))
    agree = total = 0
    cm_ref = ConfusionMatrix(spec.num_classes, spec.ignore_index)
    cm_out = ConfusionMatrix(spec.num_classes, spec.ignore_index)
    labelled = False
    for s in samples:
        x = preprocess(s.image, spec)
        ref, out = _run_torch(model, x), _run_onnx(session, spec, x)
        if not class_map:
            max_abs = max(max_abs, float(np.abs(ref - out).max()))
            out = out.argmax(1)
        ref = ref.argmax(1)
        agree += int((ref == out).sum())
        total += ref.size
        if s.mask is not None:
            labelled = True
            h, w = spec.input_size
            mask = cv2.resize(s.mask, (w, h), interpolation=cv2.INTER_NEAREST)
            # Low-resolution outputs (SegFormer's 1/4) are scored as the runtime delivers them: the class map
            # resized to the input by the runtime's own nearest-neighbour mapping.
            frame = Geometry((h, w), (h, w), (h, w))
            cm_ref.update(map_to_frame(ref[0], frame).astype(np.int64), mask)
            cm_out.update(map_to_frame(out[0], frame).astype(np.int64), mask)
    agreement = agree / total if total else float("nan")
    checks: list[Check] = []
    info: dict[str, float] = {}
    per_class: list[tuple[str, float, float]] = []
    if spec.precision is Precision.FP32:
        if not class_map:
            checks.append(Check("max abs logit difference", max_abs, thresholds.fp32_max_abs, False))
        checks.append(Check("argmax agreement", agreement, thresholds.fp32_agreement, True))
    elif spec.precision is Precision.FP16:
        checks.append(Check("argmax agreement", agreement, thresholds.fp16_agreement, True))
        if not class_map:
            info["max abs logit difference"] = max_abs
    else:
        if not labelled:
            raise DataError(f"the INT8 gate needs labelled validation data with the model's {spec.num_classes} "
                            f"classes ({', '.join(spec.class_names[:6])}{', ...' if spec.num_classes > 6 else ''}); "
                            "pass --data with a dataset folder of those classes (images/, masks/, classes.json)")
        drop = cm_ref.miou() - cm_out.miou()
        checks.append(Check("mIoU drop vs PyTorch FP32", drop, thresholds.int8_miou_drop, False))
        info["argmax agreement"] = agreement
    if labelled:
        info["mIoU PyTorch FP32"] = cm_ref.miou()
        info["mIoU artifact"] = cm_out.miou()
        per_class = [(n, float(a), float(b)) for n, a, b in zip(spec.class_names, cm_ref.iou(), cm_out.iou())]
    return GateReport(str(artifact), spec.precision.value, checks, info, per_class)


def to_uint8_image(y: np.ndarray, spec: ModelSpec) -> np.ndarray:
    if y.dtype == np.uint8:
        return y
    low, high = spec.output_range
    return np.clip(np.round((y - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def verify_generator(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec, samples: list[Sample],
                     *, thresholds: Thresholds = Thresholds(), n_random: int = 8) -> GateReport:
    """PSNR between PyTorch's and the artifact's uint8 images, on noise (or random + real images)."""
    session = open_session(artifact)
    model = model.float()  # the caller chose eval or train mode, matching the export
    rng = np.random.default_rng(0)
    inputs: list[np.ndarray] = []
    if spec.task is Task.GENERATION_NOISE:
        inputs = [rng.standard_normal((1, spec.latent_size), dtype=np.float32) for _ in range(n_random)]
    else:
        from .generators import generator_input_image  # a mask -> image model is fed palette-coloured masks

        inputs = [preprocess(generator_input_image(s.image, s.mask, spec), spec) for s in samples]
        inputs += [np.clip(rng.standard_normal((1, 3, *spec.input_size), dtype=np.float32), -1, 1)
                   for _ in range(2)]
    refs, outs = [], []
    for x in inputs:
        refs.append(to_uint8_image(_run_torch(model, x), spec))
        outs.append(to_uint8_image(_run_onnx(session, spec, x), spec))
    value = psnr(np.concatenate(refs), np.concatenate(outs))
    threshold = thresholds.psnr_db[spec.precision]
    return GateReport(str(artifact), spec.precision.value, [Check("PSNR vs PyTorch (dB)", value, threshold, True)])


def verify_stochastic_generator(artifact: str | os.PathLike, model: nn.Module, spec: ModelSpec,
                                samples: list[Sample], *, n_inputs: int = 3, k: int = 12,
                                margin_db: float = 1.0) -> GateReport:
    """The gate for graphs with active dropout (`--train-mode --dropout`), whose outputs are random: per input, the
    mean of k artifact outputs must be as close to the mean of k PyTorch outputs as a second, independent PyTorch
    mean is (PSNR within `margin_db`), and the per-pixel spread of the outputs must match (std ratio 0.8-1.25)."""
    from .generators import generator_input_image

    session = open_session(artifact)
    model = model.float()
    rng = np.random.default_rng(0)
    if spec.task is Task.GENERATION_NOISE:
        inputs = [rng.standard_normal((1, spec.latent_size), dtype=np.float32) for _ in range(n_inputs)]
    else:
        inputs = [preprocess(generator_input_image(s.image, s.mask, spec), spec) for s in samples[:n_inputs]]
    torch_a, torch_b, onnx_m, std_t, std_o = [], [], [], [], []
    for x in inputs:
        ta = np.stack([_run_torch(model, x) for _ in range(k)]).astype(np.float64)
        tb = np.stack([_run_torch(model, x) for _ in range(k)]).astype(np.float64)
        oo = np.stack([_run_onnx(session, spec, x) for _ in range(k)]).astype(np.float64)
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
           *, thresholds: Thresholds = Thresholds(), stochastic: bool = False) -> GateReport:
    """`stochastic`: the artifact samples random dropout masks (a `--train-mode --dropout` export)."""
    require("onnxruntime", extra="cpu", purpose="Verifying exported models")
    if spec.task is Task.SEGMENTATION:
        return verify_segmentation(artifact, model, spec, samples, thresholds=thresholds)
    if stochastic:
        return verify_stochastic_generator(artifact, model, spec, samples)
    return verify_generator(artifact, model, spec, samples, thresholds=thresholds)
