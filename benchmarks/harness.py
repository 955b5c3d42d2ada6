"""The latency harness behind `edgepix bench`: one row per model x backend x batch.

Every row is measured the same way: load (timed), first inference (timed: it includes lazy allocation, kernel
selection, engine builds), warm-up calls, then timed calls for a count or a duration. Latency is per call (one batch);
throughput is images per second over the timed calls. Peak RSS is reset before each model (Linux clear_refs) so each
row reports its own peak. Accuracy sits next to speed: mIoU on labelled synthetic scenes (or a dataset folder) for
segmentation, only for a model whose classes are the data's (a person segmenter scored against the synthetic
shapes would be a number about nothing: its column shows "-" and a note says why), PSNR against a reference model
for generators. FLOPs come from the ONNX graph, fed in the model's own input layout, or from the shapes stored in a
.tflite (benchmarks.flops). A model without an edgepix spec (an ONNX file or a .tflite from elsewhere) is measured
with the spec the runtime would infer for it (description.specfile.read_spec).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepix.runtime.backends import Backend, load_backend
from edgepix.runtime.core.errors import EdgepixError, InputError
from edgepix.runtime.core.formats import ONNX_SUFFIXES, TFLITE_SUFFIXES
from edgepix.runtime.data.metrics import ConfusionMatrix, psnr
from edgepix.runtime.description.spec import ModelSpec, Task

from .stats import LatencyStats

log = logging.getLogger(__name__)

BENCH_SEED = 9_000_001  # scenes for accuracy columns: distinct from training, validation and export scenes


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1,)
    warmup: int = 10
    runs: int | None = 50  # timed calls; None when `duration` bounds the run
    duration: float | None = None  # seconds of timed calls
    threads: int | None = None  # intra-op threads for CPU backends; None: the backend's default
    data: str = "synthetic"  # accuracy data: "synthetic" or a dataset folder with images/ and masks/
    accuracy_n: int = 20  # images for the accuracy column; 0 disables it
    frame_size: tuple[int, int] = (480, 640)  # synthetic frames for accuracy (H, W), resized by the runtime
    imgsz: tuple[int, int] | None = None  # model input size for dynamic-size models and the PyTorch baseline

    def __post_init__(self) -> None:
        _check_types(self)
        if not self.batches or any(b < 1 for b in self.batches):
            raise InputError(f"--batch: expected positive integers, got {self.batches}")
        if self.warmup < 0:
            raise InputError(f"--warmup: expected >= 0, got {self.warmup}")
        if (self.runs is None) == (self.duration is None):
            raise InputError("give either --runs or --duration")
        if self.runs is not None and self.runs < 1:
            raise InputError(f"--runs: expected >= 1, got {self.runs}")
        if self.duration is not None and self.duration <= 0:
            raise InputError(f"--duration: expected > 0 seconds, got {self.duration}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pair(v: object) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(x) for x in v)


# What each BenchConfig field holds, checked before its values are compared (a string batch size would otherwise
# end in Python's own TypeError): (test, what the message says was expected).
_BENCH_TYPES = {
    "batches": (lambda v: isinstance(v, (tuple, list)) and all(_is_int(b) for b in v), "a tuple of integers"),
    "warmup": (_is_int, "an integer"),
    "runs": (lambda v: v is None or _is_int(v), "an integer or None"),
    "duration": (lambda v: v is None or _is_number(v), "a number of seconds or None"),
    "threads": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or None"),
    "data": (lambda v: isinstance(v, str), "'synthetic' or a dataset folder (a string)"),
    "accuracy_n": (_is_int, "an integer"),
    "frame_size": (_pair, "(H, W) integers"),
    "imgsz": (lambda v: v is None or _pair(v), "(H, W) integers or None"),
}


def _check_types(config: BenchConfig) -> None:
    for name, (ok, expected) in _BENCH_TYPES.items():
        value = getattr(config, name)
        if not ok(value):
            raise InputError(f"BenchConfig.{name}: expected {expected}, got {value!r:.80} ({type(value).__name__})")


@dataclass
class BenchRow:
    model: str  # file name (or checkpoint name for the PyTorch baseline)
    model_name: str  # architecture, from the spec
    precision: str
    backend: str  # what actually ran, e.g. "ort-cpu (CPUExecutionProvider, 2 threads)"
    batch: int
    input_shape: tuple[int, ...]
    load_ms: float
    first_ms: float
    latency: LatencyStats
    throughput: float  # images per second
    peak_rss_mb: float
    file_mb: float
    gflops_per_image: float | None
    achieved_gflops: float | None
    accuracy_name: str | None = None
    accuracy: float | None = None
    efficiency: float | None = None  # achieved / measured GEMM ceiling
    gpu_mem_mb: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "latency"}
        d["input_shape"] = list(self.input_shape)
        d.update({f"latency_{k}_ms" if k != "n" else "calls": v for k, v in self.latency.as_dict().items()})
        return d


@dataclass
class ModelRun:
    """What one model x backend produced: rows per batch, and outputs for cross-model accuracy (generators)."""

    rows: list[BenchRow]
    reference_outputs: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)


# ---- memory --------------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS counter (Linux >= 4.0); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- inputs --------------------------------------------------------------------------------------------


def accuracy_samples(config: BenchConfig) -> list[tuple[np.ndarray, np.ndarray | None]]:
    if config.accuracy_n <= 0:
        return []
    if config.data == "synthetic":
        from edgepix.runtime.data.synthetic import SceneConfig, make_scene, scene_seed

        scene = SceneConfig(size=config.frame_size)
        return [make_scene(scene_seed(BENCH_SEED, i), scene) for i in range(config.accuracy_n)]
    import cv2

    folder = Path(config.data)
    images = folder / "images"
    masks = folder / "masks"
    if not images.is_dir():
        raise EdgepixError(f"--data {folder}: expected a dataset folder with images/ (and masks/), or 'synthetic'")
    samples = []
    for p in sorted(images.iterdir())[: config.accuracy_n]:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise EdgepixError(f"cannot read image {p}")
        mask_path = masks / f"{p.stem}.png"
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED) if mask_path.exists() else None
        samples.append((image, mask if mask is not None and mask.ndim == 2 else None))
    return samples


def data_class_names(config: BenchConfig) -> tuple[str, ...] | None:
    """The class names of the accuracy data: the synthetic scenes' own, or a dataset folder's classes.json; None
    when a folder does not say (its masks' numbers then mean nothing to compare with)."""
    if config.data == "synthetic":
        from edgepix.runtime.data.synthetic import CLASS_NAMES

        return CLASS_NAMES
    path = Path(config.data) / "classes.json"
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("names")
    except (OSError, ValueError, AttributeError):
        return None
    return tuple(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def model_input(spec: ModelSpec, batch: int, size: tuple[int, int], frames: list[np.ndarray]) -> np.ndarray:
    """A realistic input batch: pre-processed frames for image models, seeded noise for noise generators."""
    if spec.task is Task.GENERATION_NOISE:
        return np.random.default_rng(BENCH_SEED).standard_normal((batch, spec.latent_size), dtype=np.float32)
    from edgepix.runtime.tasks.imageops import Normalizer

    picked = [frames[i % len(frames)] for i in range(batch)]
    return Normalizer(spec, size)(picked)[0]


# ---- one model -----------------------------------------------------------------------------------------


def _time_calls(call: Callable[[], object], config: BenchConfig) -> list[float]:
    for _ in range(config.warmup):
        call()
    samples: list[float] = []
    end = time.perf_counter() + config.duration if config.duration else None
    while (end is None and len(samples) < config.runs) or (end is not None and time.perf_counter() < end):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _static_batch(backend: Backend) -> int | None:
    return backend.inputs[0].dim(0) if backend.inputs and backend.inputs[0].shape else None


def _segmentation_miou(backend: Backend, spec: ModelSpec, samples) -> float | None:
    from edgepix.runtime.tasks.segmenter import Segmenter

    labelled = [(im, m) for im, m in samples if m is not None]
    if not labelled:
        return None
    segmenter = Segmenter(backend, spec)
    cm = ConfusionMatrix(spec.num_classes, spec.ignore_index)
    for image, mask in labelled:
        cm.update(segmenter.segment(image).class_map, mask)
    return cm.miou()


def _generator_outputs(backend: Backend, spec: ModelSpec, size, samples) -> np.ndarray:
    """uint8 images for fixed inputs, to compare variants of one generator (PSNR)."""
    from edgepix.runtime.tasks.generator import ImageGenerator, NoiseGenerator

    if spec.task is Task.GENERATION_NOISE:
        images = NoiseGenerator(backend, spec).generate(8, batch_size=1, seed=BENCH_SEED)
    else:
        generator = ImageGenerator(backend, spec)
        images = [generator.generate(im) for im, _ in samples[:8]]
    return np.stack(list(images))


def bench_backend(backend: Backend, *, label: str, file_mb: float, load_ms: float, config: BenchConfig,
                  spec: ModelSpec, onnx_path: Path | None, samples) -> ModelRun:
    """Measure an already-loaded backend at each batch size of `config`."""
    from .flops import FlopsUnavailable, model_flops

    size = spec.input_size
    frames = [im for im, _ in samples] or [np.zeros((*config.frame_size, 3), np.uint8)]
    static = _static_batch(backend)
    gflops = None
    run = ModelRun(rows=[])
    if onnx_path is not None and onnx_path.suffix.lower() in (*ONNX_SUFFIXES, *TFLITE_SUFFIXES):
        try:
            gflops = model_flops(onnx_path, spec) / 1e9
        except ImportError:
            log.info("FLOPs need the onnx package (pip install onnx): column left empty")
        except FlopsUnavailable as e:
            run.skipped.append(f"{label}: no GFLOP/img: {e}")
    first_done = False
    for batch in config.batches:
        if static is not None and batch != static:
            run.skipped.append(f"{label} {backend.name}: batch {batch} skipped (the graph's batch is fixed at "
                               f"{static}; export with --dynamic-batch)")
            continue
        x = model_input(spec, batch, size, frames)
        feed = {backend.inputs[0].name: x}
        backend.infer(feed)  # validates once; the timed calls skip the checks
        start = time.perf_counter()
        backend.infer(feed, check=False)
        first_ms = (time.perf_counter() - start) * 1e3 if not first_done else float("nan")
        first_done = True
        samples_ms = _time_calls(lambda feed=feed: backend.infer(feed, check=False), config)
        stats = LatencyStats.from_samples(samples_ms)
        throughput = batch * len(samples_ms) / (sum(samples_ms) / 1e3)
        run.rows.append(BenchRow(
            model=label, model_name=spec.model_name, precision=spec.precision.value, backend=backend.description,
            batch=batch, input_shape=tuple(x.shape), load_ms=load_ms, first_ms=first_ms, latency=stats,
            throughput=throughput, peak_rss_mb=0.0, file_mb=file_mb, gflops_per_image=gflops,
            achieved_gflops=gflops * throughput if gflops is not None else None))
    if run.rows:
        if spec.task is Task.SEGMENTATION:
            data_classes = data_class_names(config)
            miou = None
            if tuple(spec.class_names) == data_classes:
                miou = _segmentation_miou(backend, spec, samples)
            elif samples:
                run.skipped.append(_no_accuracy_note(label, spec, config, data_classes))
            for row in run.rows:
                row.accuracy_name, row.accuracy = ("mIoU", miou) if miou is not None else (None, None)
        else:
            run.reference_outputs = _generator_outputs(backend, spec, size, samples)
    return run


def _no_accuracy_note(label: str, spec: ModelSpec, config: BenchConfig, data_classes: tuple[str, ...] | None) -> str:
    def names(classes) -> str:
        return ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")

    data = "the synthetic scenes" if config.data == "synthetic" else config.data
    if data_classes is None:
        return (f"{label}: no accuracy: {data} has no classes.json naming its classes, so its masks cannot be "
                f"matched to the model's ({names(spec.class_names)})")
    return (f"{label}: no accuracy: its classes ({names(spec.class_names)}) are not those of {data} "
            f"({names(data_classes)}); give --data with a dataset folder of the model's classes (images/, masks/, "
            "classes.json)")


def bench_model(path: str | os.PathLike, backend_name: str, config: BenchConfig, samples) -> ModelRun:
    """Load one exported model with one backend and measure it."""
    path = Path(path)
    reset_peak_rss()
    options = {"threads": config.threads} if config.threads is not None else {}
    if backend_name == "tensorrt" or path.suffix != ".onnx":
        options = {}
    start = time.perf_counter()
    backend = load_backend(path, backend_name, **options)
    load_ms = (time.perf_counter() - start) * 1e3
    with backend:
        spec = backend.spec
        inferred = spec is None and path.suffix.lower() in (*ONNX_SUFFIXES, *TFLITE_SUFFIXES)
        if inferred:  # a model exported elsewhere: what the runtime would run it as
            from edgepix.runtime.description.specfile import read_spec

            spec = read_spec(path).spec
        if spec is None:
            raise EdgepixError(f"{path.name} carries no edgepix spec; benchmark exported models (edgepix export)")
        if config.imgsz is not None and tuple(config.imgsz) != spec.input_size:
            if not spec.dynamic_size:
                return ModelRun(rows=[], skipped=[
                    f"{path.name}: skipped, its input is fixed at {spec.input_size[0]}x{spec.input_size[1]}, not "
                    f"{config.imgsz[0]}x{config.imgsz[1]} (export with --imgsz or --dynamic-size)"])
            spec = spec.replace(input_size=tuple(config.imgsz))
        run = bench_backend(backend, label=path.name, file_mb=path.stat().st_size / 1e6, load_ms=load_ms,
                            config=config, spec=spec, onnx_path=path, samples=samples)
        if inferred:
            run.skipped.append(f"{path.name}: no edgepix spec; measured as the runtime would run it, with the spec "
                               "inferred from its graph (see `edgepix spec`)")
        peak = peak_rss_mb()
    for row in run.rows:
        row.peak_rss_mb = peak
    return run


def bench_torch(checkpoint: str | os.PathLike, config: BenchConfig, samples) -> ModelRun:
    """The PyTorch eager baseline, measured by the same code in the same process."""
    from .torch_baseline import TorchBackend

    reset_peak_rss()
    start = time.perf_counter()
    backend = TorchBackend(checkpoint, threads=config.threads, imgsz=config.imgsz)
    load_ms = (time.perf_counter() - start) * 1e3
    with backend:
        run = bench_backend(backend, label=Path(checkpoint).name, file_mb=_size_bytes(Path(checkpoint)) / 1e6,
                            load_ms=load_ms, config=config, spec=backend.spec, onnx_path=None, samples=samples)
        peak = peak_rss_mb()
    for row in run.rows:
        row.peak_rss_mb = peak
    return run


def _size_bytes(path: Path) -> int:
    """A checkpoint file's size, or the total of a Hugging Face folder's files."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def fill_generator_accuracy(runs: Sequence[ModelRun]) -> None:
    """PSNR of each generator's images against the reference: the PyTorch baseline, else the first FP32 model of
    the same architecture."""
    by_model: dict[str, list[ModelRun]] = {}
    for run in runs:
        if run.reference_outputs is not None and run.rows:
            by_model.setdefault(run.rows[0].model_name, []).append(run)
    for group in by_model.values():
        reference = next((r for r in group if r.rows[0].backend.startswith("torch")), None) or next(
            (r for r in group if r.rows[0].precision == "fp32"), None)
        if reference is None:
            continue
        for run in group:
            value = psnr(reference.reference_outputs, run.reference_outputs) if run is not reference else float("inf")
            for row in run.rows:
                row.accuracy_name, row.accuracy = "PSNR dB", value
