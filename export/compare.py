"""One comparator for every parity check: PyTorch vs an exported ONNX, ONNX Runtime vs a TensorRT engine (or any
other backend), FP32 vs FP16 vs INT8.

In the manner of Polygraphy's Comparator: *runners* turn the same inputs into outputs (`TorchRunner` for a PyTorch
model, `BackendRunner` for anything `load_backend` opens), one compare function per task metric turns a reference
runner's and an artifact runner's outputs into `Check`s, one thresholds table says what passes, and one report
prints the result. The parity gate of `edgepix export` (export/verify.py) and the engine check of
`edgepix export --format engine` (export/tensorrt.py) are both calls of `compare_segmentation` / `compare_images`.

| artifact | check | threshold |
|---|---|---|
| segmentation FP32 | max abs logit difference (random and real inputs) | <= 1e-4 |
| segmentation FP32 | argmax agreement on real inputs | >= 99.9% |
| segmentation FP16 | argmax agreement on real inputs | >= 99.5% |
| segmentation INT8 | mIoU drop vs the FP32 reference on labelled validation scenes | <= 1.0 point |
| generator FP32 / FP16 / INT8 | PSNR vs the reference (uint8 images) | >= 40 / 30 / 25 dB |

Artifacts whose graph ends in ArgMax are held to the argmax checks only (they have no logits). Outputs that come out
at a fraction of the input (SegFormer's logits at 1/4) are scored as the runtime delivers them: the class map mapped
to the input size by the runtime's nearest-neighbour mapping.

Nothing here imports torch unless a `TorchRunner` is made, so engine checks run on devices without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from edgepix.runtime.core.errors import DataError, ExportError
from edgepix.runtime.data.metrics import ConfusionMatrix, psnr
from edgepix.runtime.description.spec import ModelSpec, OutputKind, Precision
from edgepix.runtime.tasks.decode import OutputDecoder
from edgepix.runtime.tasks.imageops import Geometry, map_to_frame

from .gate import Check

Runner = Callable[[np.ndarray], np.ndarray]  # one input batch -> the model's output


@dataclass(frozen=True)
class Thresholds:
    fp32_max_abs: float = 1e-4
    agreement: dict = field(default_factory=lambda: {Precision.FP32: 0.999, Precision.FP16: 0.995})
    int8_miou_drop: float = 0.01
    psnr_db: dict = field(default_factory=lambda: {Precision.FP32: 40.0, Precision.FP16: 30.0, Precision.INT8: 25.0})


THRESHOLDS = Thresholds()


@dataclass
class GateReport:
    artifact: str
    precision: str
    checks: list[Check]
    info: dict[str, float] = field(default_factory=dict)  # measured but not gated
    per_class: list[tuple[str, float, float]] = field(default_factory=list)  # (class, IoU reference, IoU artifact)
    title: str = "parity gate"
    reference: str = "PyTorch FP32"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def format(self) -> str:
        lines = [f"{self.title} for {self.artifact} ({self.precision}): {'PASS' if self.passed else 'FAIL'}",
                 f"  {'check':<34}{'measured':>12}{'threshold':>14}  result"]
        for c in self.checks:
            op = ">=" if c.higher_is_better else "<="
            lines.append(f"  {c.name:<34}{_num(c.measured):>12}{op + ' ' + _num(c.threshold):>14}  "
                         f"{'ok' if c.passed else 'FAIL'}")
        for k, v in self.info.items():
            lines.append(f"  {k:<34}{_num(v):>12}{'(info)':>14}")
        if self.per_class:
            ref = "IoU torch" if self.reference.startswith("PyTorch") else "IoU ref"
            lines.append(f"  {'class':<20}{ref:>10}{'IoU artifact':>14}{'delta':>9}")
            for name, a, b in self.per_class:
                lines.append(f"  {name:<20}{a:>10.4f}{b:>14.4f}{b - a:>+9.4f}")
        return "\n".join(lines)


def _num(v: float) -> str:
    if v == 0 or np.isnan(v) or np.isinf(v):
        return str(v)
    return f"{v:.3e}" if abs(v) < 1e-2 else f"{v:.4f}"


# ---- runners ---------------------------------------------------------------------------------------------


class TorchRunner:
    """A PyTorch model in whatever mode the caller left it (eval, or train-mode generator graphs)."""

    def __init__(self, model) -> None:
        import torch

        self.torch, self.model = torch, model.float()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.from_numpy(x)).float().numpy()


class BackendRunner:
    """A loaded backend (ONNX Runtime, TensorRT, OpenCV, ...) fed through the spec's input and output names; inputs
    are cast to the dtype the model takes (FP16 graphs with float16 inputs)."""

    def __init__(self, backend, spec: ModelSpec) -> None:
        self.backend, self.spec = backend, spec
        self.dtype = backend.input(spec.input_name).dtype

    def __call__(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.backend.infer({self.spec.input_name: x.astype(self.dtype, copy=False)})[self.spec.output_name]
        except ExportError:
            raise
        except Exception as e:  # backends raise their own types; one line names the input that failed
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{self.backend.path.name} fails on an input of shape {x.shape}: {reason}") from e


# ---- compare functions -------------------------------------------------------------------------------------


def compare_segmentation(reference: Runner, artifact: Runner, spec: ModelSpec, *,
                         random_inputs: Sequence[np.ndarray], samples: Sequence[tuple[np.ndarray, np.ndarray | None]],
                         artifact_name: str, reference_name: str = "PyTorch FP32",
                         thresholds: Thresholds = THRESHOLDS, gate_logits: bool = True) -> GateReport:
    """Logits on random inputs (where the artifact outputs logits), argmax agreement on real inputs, and, with
    labelled samples, the mIoU of both against the labels.

    `samples` are (preprocessed input, label mask at the input size or None). `gate_logits=False` reports the max
    abs logit difference without gating it (an engine against ONNX Runtime, where TF32 may differ in the 4th
    digit while every class decision holds)."""
    max_abs, logits_seen = 0.0, False
    agree = total = 0
    cm_ref = ConfusionMatrix(spec.num_classes, spec.ignore_index)
    cm_out = ConfusionMatrix(spec.num_classes, spec.ignore_index)
    labelled = False
    h, w = spec.input_size
    at_input = Geometry((h, w), (h, w), (h, w))

    def outputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nonlocal max_abs, logits_seen
        ref, out = reference(x), artifact(x)
        if ref.dtype.kind == "f" and out.dtype.kind == "f":  # both logits (a class map has none to compare)
            max_abs, logits_seen = max(max_abs, float(np.abs(ref - out).max())), True
        return ref, out

    for x in random_inputs:  # random inputs test the logits only: their class decisions mean nothing
        outputs(x)
    for x, mask in samples:
        ref, out = outputs(x)
        ref, out = _class_map(ref, spec), _class_map(out, spec)
        agree += int((ref == out).sum())
        total += ref.size
        if mask is not None:
            labelled = True
            cm_ref.update(map_to_frame(ref[0], at_input).astype(np.int64), mask)
            cm_out.update(map_to_frame(out[0], at_input).astype(np.int64), mask)
    agreement = agree / total if total else float("nan")
    checks: list[Check] = []
    info: dict[str, float] = {}
    if spec.precision is Precision.INT8:
        if not labelled:
            raise DataError(f"the INT8 gate needs labelled validation data with the model's {spec.num_classes} "
                            f"classes ({', '.join(spec.class_names[:6])}{', ...' if spec.num_classes > 6 else ''}); "
                            "pass --data with a dataset folder of those classes (images/, masks/, classes.json)")
        checks.append(Check(f"mIoU drop vs {reference_name}", cm_ref.miou() - cm_out.miou(),
                            thresholds.int8_miou_drop, False))
        info["argmax agreement"] = agreement
    else:
        if logits_seen:
            logits = Check("max abs logit difference", max_abs, thresholds.fp32_max_abs, False)
            if spec.precision is Precision.FP32 and gate_logits:
                checks.append(logits)
            else:
                info[logits.name] = max_abs
        checks.append(Check("argmax agreement", agreement, thresholds.agreement[spec.precision], True))
    per_class: list[tuple[str, float, float]] = []
    if labelled:
        info[f"mIoU {reference_name}"] = cm_ref.miou()
        info["mIoU artifact"] = cm_out.miou()
        per_class = [(n, float(a), float(b)) for n, a, b in zip(spec.class_names, cm_ref.iou(), cm_out.iou())]
    return GateReport(artifact_name, spec.precision.value, checks, info, per_class, reference=reference_name)


def _class_map(y: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """(N, H, W) class indices at the output's size, from scores read as the spec describes them (layout, kind,
    threshold; runtime.tasks.decode, what the Segmenter decides on) or from a class map of the graph's own."""
    if y.dtype.kind == "f" and spec.output_kind is OutputKind.CLASS_MAP:
        spec = spec.replace(output_kind=OutputKind.LOGITS)  # the reference's logits, before the graph's ArgMax
    decoder = OutputDecoder(spec, graph_class_map=y.dtype.kind != "f")
    return np.stack([decoder.model_map(sample) for sample in y])


def to_uint8_image(y: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """A generator's output as the uint8 image a user sees."""
    if y.dtype == np.uint8:
        return y
    low, high = spec.output_range
    return np.clip(np.round((y - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def compare_images(reference: Runner, artifact: Runner, spec: ModelSpec, *, inputs: Sequence[np.ndarray],
                   artifact_name: str, reference_name: str = "PyTorch", thresholds: Thresholds = THRESHOLDS
                   ) -> GateReport:
    """PSNR between the reference's and the artifact's uint8 images over all inputs."""
    refs = [to_uint8_image(reference(x), spec) for x in inputs]
    outs = [to_uint8_image(artifact(x), spec) for x in inputs]
    value = psnr(np.concatenate(refs), np.concatenate(outs))
    check = Check(f"PSNR vs {reference_name} (dB)", value, thresholds.psnr_db[spec.precision], True)
    return GateReport(artifact_name, spec.precision.value, [check], reference=reference_name)


def resize_mask(mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    """A label mask at the model's input size (nearest: labels are indices)."""
    if mask is None:
        return None
    h, w = size
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)


# ---- an artifact against a reference artifact ----------------------------------------------------------------

CHECK_SEED = 7_100_003  # scenes unlike training, validation and the ONNX gate's


def compare_backends(artifact: str | os.PathLike, backend: str, reference_onnx: str | os.PathLike, *, n: int = 20,
                     seed: int = CHECK_SEED, thresholds: Thresholds = THRESHOLDS) -> GateReport:
    """An artifact run by `backend` (a TensorRT engine on `tensorrt`, an ONNX file on `opencv`, ...) against the
    FP32 ONNX it came from on `ort-cpu`, on the same synthetic scenes: the check every non-PyTorch artifact gets."""
    from edgepix.runtime.backends import load_backend
    from edgepix.runtime.data.synthetic import SceneConfig, make_scene, scene_seed
    from edgepix.runtime.description.spec import Task
    from edgepix.runtime.tasks.imageops import Normalizer

    with load_backend(artifact, backend) as art_b, load_backend(reference_onnx, "ort-cpu") as ref_b:
        spec = art_b.spec
        ref_spec = ref_b.spec or spec
        if spec is None:
            raise ExportError(f"{artifact}: no spec (a TensorRT engine needs its manifest)")
        reference, runner = BackendRunner(ref_b, ref_spec), BackendRunner(art_b, spec)
        name = f"{artifact} on {backend} vs {os.path.basename(reference_onnx)} on ort-cpu"
        rng = np.random.default_rng(seed)
        if spec.task is not Task.SEGMENTATION:
            shape = (1, spec.latent_size) if spec.task is Task.GENERATION_NOISE else (1, 3, *spec.input_size)
            inputs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(n)]
            report = compare_images(reference, runner, spec, inputs=inputs, artifact_name=name,
                                    reference_name="ONNX Runtime", thresholds=thresholds)
        else:
            normalizer = Normalizer(spec, spec.input_size)
            samples = []
            for i in range(n):
                image, mask = make_scene(scene_seed(seed, i), SceneConfig(size=spec.input_size))
                samples.append((normalizer([image])[0], mask))
            report = compare_segmentation(reference, runner, spec, random_inputs=[], samples=samples,
                                          artifact_name=name, reference_name="ONNX Runtime FP32",
                                          thresholds=thresholds, gate_logits=False)
    report.title = "engine check" if backend == "tensorrt" else "backend check"
    return report
