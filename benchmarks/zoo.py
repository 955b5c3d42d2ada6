"""`python -m edgepix.benchmarks.zoo`: is edgepix the fastest way to run each model of a zoo, quiet and busy?

    python -m edgepix.benchmarks.zoo [--out DIR] [--models NAME,...] [--modes quiet,busy] [--threads N]
                                     [--rounds N] [--warmup N] [--quick] [--json FILE] [--markdown]

The zoo is built offline into `--out` (default: `edgepix-zoo` in the temporary folder), nothing downloaded: models
with freshly initialised weights (untrained: speed does not depend on what the weights learned), exported the way a
user exports them, through the `edgepix` command. What a run finds already built there is reused, so only the
first run spends the minutes the exports take; a failed build leaves nothing behind and its row says why.

- fastscnn-256, -512, lraspp-256, -512, unet-256, -512: registry models (6 classes) saved as checkpoints, then
  `edgepix export CKPT --imgsz S S` (FP32); the same names with -int8: `--format onnx-int8` (U8S8 QDQ, calibrated on
  synthetic scenes) from the same checkpoint;
- segformer-b0-512: SegFormer-b0 (transformers' default SegformerConfig, 150 labels as ADE20K) with random weights,
  `save_pretrained` into the zoo, exported from that folder; mobilevit-deeplabv3-512: MobileViT-small DeepLabV3 (the
  default MobileViTConfig, 21 labels as PASCAL VOC), the same way;
- nhwc-sigmoid-256: a Fast-SCNN wrapped to take NHWC images and give one sigmoid channel in NHWC, as models made
  elsewhere often are: `torch.onnx.export`, then `edgepix spec X --set classes=background,person mean=0,0,0
  std=1,1,1 --out Y`;
- dcgan-64: the DCGAN generator (latent 100, ngf 64, 64x64); pix2pix-256: the pix2pix U-Net generator (unet_256,
  ngf 64, 256x256).

Columns, each the model's call on the same input (one pre-processed synthetic scene, or seeded noise for DCGAN)
with the same threads (`--threads`, default the usable cores):
- edgepix default: `load_backend(path, "auto")` with the backend profile off (`EDGEPIX_PROFILE=off`): what `auto`
  picks on its own;
- edgepix tuned: `edgepix tune`'s measurement (`benchmarks.tune.tune`, quiet, before the timed modes) recorded in a
  profile of this run's own, then `load_backend(path, "auto")` reading it;
- ONNX Runtime defaults: a plain `InferenceSession` whose only setting is `intra_op_num_threads`;
- OpenVINO: `compile_model` with OpenVINO's defaults and the thread count (where `openvino` is installed; on CPUs
  with AVX-512-BF16 or AMX its defaults compute in bf16, which the cell marks);
- LiteRT: a plain `Interpreter(model_path, num_threads)` on NAME.tflite in the zoo folder, where there is one
  (`edgepix export CKPT --format tflite` makes it where that format exists);
- PyTorch eager: the checkpoint's model in FP32 (also for the INT8 rows: the cell says so) with
  `torch.set_num_threads`.

Each (model, mode) is one `benchmarks.peers.measure` run: every column loaded and warmed up, then interleaved
rounds of one call per column, each call on settled cores (the settle gap, benchmarks/peers.py). Modes
(`--modes`): quiet, and busy, where a second process keeps one core busy for the whole measurement
(benchmarks/load.py). Cells give p50 / p90 in ms; the ratios, at p50, are edgepix default / ONNX Runtime defaults,
edgepix tuned / the fastest of the other runtimes, and edgepix tuned / the fastest of them that kept the file's float
precision (OpenVINO's defaults compute in bf16 on some CPUs; `tune` never picks that); below 1.00x edgepix is
faster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgepix.runtime.core.errors import EdgepixError

DEFAULT_OUT = Path(tempfile.gettempdir()) / "edgepix-zoo"
NO_TFLITE_EXPORT = "no tflite export"  # the LiteRT column where `edgepix export` has no --format tflite
EXPORT_TIMEOUT_S = 1800  # one export (a 512x512 SegFormer's parity gate on a busy 2-core machine takes minutes)

# Column names, in table order; the first two are edgepix, the others are the runtimes a user would pick instead.
DEFAULT, TUNED = "edgepix default", "edgepix tuned"
ORT, OPENVINO, LITERT, TORCH = "ONNX Runtime defaults", "OpenVINO", "LiteRT", "PyTorch eager"
COLUMNS = (DEFAULT, TUNED, ORT, OPENVINO, LITERT, TORCH)
PEER_COLUMNS = (ORT, OPENVINO, LITERT, TORCH)
SHORT = {ORT: "ORT", OPENVINO: "OpenVINO", LITERT: "LiteRT", TORCH: "PyTorch"}  # in the ratio cells


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: where its source comes from and how its .onnx is made from it."""

    name: str
    kind: str  # "checkpoint" (an edgepix checkpoint), "hf" (a save_pretrained folder), "nhwc" (torch.onnx.export)
    arch: str  # the registry name, or the transformers model type
    size: int  # input height = width (the generators' image size)
    int8: bool = False  # --format onnx-int8 from the same source as the FP32 file

    @property
    def source_name(self) -> str:
        """The source's name under src/: FP32 and INT8 files share one."""
        return self.name.removesuffix("-int8") + {"checkpoint": ".pt", "hf": "", "nhwc": ".pt"}[self.kind]


def _zoo_models() -> dict[str, ZooModel]:
    models = []
    for arch in ("fastscnn", "lraspp", "unet"):
        for size in (256, 512):
            models.append(ZooModel(f"{arch}-{size}", "checkpoint", arch, size))
            models.append(ZooModel(f"{arch}-{size}-int8", "checkpoint", arch, size, int8=True))
    models += [ZooModel("segformer-b0-512", "hf", "segformer", 512),
               ZooModel("mobilevit-deeplabv3-512", "hf", "mobilevit", 512),
               ZooModel("nhwc-sigmoid-256", "nhwc", "fastscnn", 256),
               ZooModel("dcgan-64", "checkpoint", "dcgan", 64),
               ZooModel("pix2pix-256", "checkpoint", "pix2pix", 256)]
    return {m.name: m for m in models}


ZOO = _zoo_models()


# ---- building the zoo ----------------------------------------------------------------------------------------


def _checkpoint(model: ZooModel, path: Path) -> None:
    """An untrained registry model saved as a checkpoint, with the spec training would give it."""
    import torch

    from edgepix.runtime.data.synthetic import CLASS_NAMES, PALETTE
    from edgepix.runtime.description.spec import ModelSpec
    from edgepix.train.checkpoint import save_checkpoint, wrap_state_dict
    from edgepix.train.registry import create_model

    torch.manual_seed(0)
    gan = dict(model_name=model.arch, input_size=(model.size, model.size), channel_order="RGB", mean=(0.5,) * 3,
               std=(0.5,) * 3, output_range=(-1.0, 1.0), output_kind="image")
    if model.arch == "dcgan":
        kwargs = {"image_size": model.size}
        spec = ModelSpec(task="generation-noise", input_name="noise", output_name="images", latent_size=100, **gan)
    elif model.arch == "pix2pix":
        kwargs = {"variant": "unet_256"}
        spec = ModelSpec(task="generation-image", input_name="images", output_name="images_out", size_divisor=256,
                         **gan)
    else:
        kwargs = {"num_classes": len(CLASS_NAMES)}
        spec = ModelSpec(task="segmentation", model_name=model.arch, input_size=(model.size, model.size),
                         class_names=CLASS_NAMES, palette=PALETTE)
    network = create_model(model.arch, **kwargs)
    save_checkpoint(path, wrap_state_dict(network.state_dict(), arch=model.arch, arch_kwargs=kwargs, spec=spec))


def _hf_folder(model: ZooModel, folder: Path) -> None:
    """A transformers model with random weights, `save_pretrained` into `folder` with a preprocessor config."""
    import torch
    from transformers import AutoModelForSemanticSegmentation, MobileViTConfig, SegformerConfig

    classes = 150 if model.arch == "segformer" else 21  # ADE20K for SegFormer-b0, PASCAL VOC for MobileViT
    labels = {"id2label": {i: f"class{i}" for i in range(classes)},
              "label2id": {f"class{i}": i for i in range(classes)}}
    config = SegformerConfig(**labels) if model.arch == "segformer" else MobileViTConfig(**labels)
    torch.manual_seed(0)
    network = AutoModelForSemanticSegmentation.from_config(config)
    with torch.no_grad():  # jittered, so that logits are far from ties and the parity gate compares something
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar among the zoo's progress lines
    try:
        network.save_pretrained(folder)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if model.arch == "segformer" else ((0, 0, 0), (1, 1, 1))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SegformerImageProcessor", "do_resize": True,
        "size": {"height": model.size, "width": model.size}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(mean), "image_std": list(std)}))


def _nhwc_module():
    """Fast-SCNN behind an NHWC input and a one-channel sigmoid NHWC output, as models exported elsewhere are."""
    import torch
    from torch import nn

    from edgepix.train.registry import create_model

    class NHWCSigmoid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = create_model("fastscnn", num_classes=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.net(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)

    return NHWCSigmoid()


def _nhwc_state(model: ZooModel, path: Path) -> None:
    import torch

    torch.manual_seed(0)
    torch.save(_nhwc_module().state_dict(), path)


def _run_edgepix(args: list[str], what: str, say: Callable[[str], None]) -> None:
    """`edgepix ARGS` in a fresh interpreter, as a user runs it; a failure raises with its last line."""
    say("[zoo] edgepix " + " ".join(args))
    try:
        done = subprocess.run([sys.executable, "-m", "edgepix", "--quiet", *args], capture_output=True, text=True,
                              timeout=EXPORT_TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        raise EdgepixError(f"{what} took more than {EXPORT_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        last = lines[-1].split(": error: ", 1)[-1] if lines else f"exit status {done.returncode}"
        raise EdgepixError(f"{what} failed: {last}")


@contextlib.contextmanager
def _fresh(path: Path) -> Iterator[Path]:
    """A partial name for `path` to write to; renamed to `path` only when the block succeeds, removed otherwise."""
    import shutil

    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.exists():
            partial.unlink()


def source_path(zoo: Path, model: ZooModel) -> Path:
    return zoo / "src" / model.source_name


def build(zoo: Path, model: ZooModel, *, say: Callable[[str], None]) -> Path:
    """The model's .onnx in `zoo`, made now unless it is already there (with its source under src/)."""
    onnx = zoo / f"{model.name}.onnx"
    if onnx.is_file():
        return onnx
    source = source_path(zoo, model)
    source.parent.mkdir(parents=True, exist_ok=True)
    if not source.exists():
        say(f"[zoo] making {source}")
        if model.kind == "hf":
            with _fresh(source) as partial:
                partial.mkdir()
                _hf_folder(model, partial)
        else:
            with _fresh(source) as partial:
                (_nhwc_state if model.kind == "nhwc" else _checkpoint)(model, partial)
    if model.kind == "nhwc":
        _nhwc_onnx(model, source, onnx, say)
        return onnx
    args = ["export", str(source), "--out", str(onnx)]
    if model.arch != "dcgan":
        args += ["--imgsz", str(model.size), str(model.size)]
    if model.int8:
        args += ["--format", "onnx-int8"]
    _run_edgepix(args, f"edgepix export of {model.name}", say)
    return onnx


def _nhwc_onnx(model: ZooModel, state: Path, onnx: Path, say: Callable[[str], None]) -> None:
    """torch.onnx.export of the wrapped module (no spec), then `edgepix spec` to describe it."""
    import torch

    module = _nhwc_module().eval()
    module.load_state_dict(torch.load(state, weights_only=True))
    raw = state.with_suffix(".raw.onnx")
    if not raw.exists():
        say(f"[zoo] torch.onnx.export of {model.name}")
        with _fresh(raw) as partial:
            torch.onnx.export(module, (torch.zeros(1, model.size, model.size, 3),), str(partial),
                              input_names=["image"], output_names=["mask"], opset_version=17, dynamo=False)
    _run_edgepix(["spec", str(raw), "--set", "classes=background,person", "mean=0,0,0", "std=1,1,1",
                  f"model_name={model.name}", "--out", str(onnx)], f"edgepix spec of {model.name}", say)


def tflite_file(zoo: Path, model: ZooModel, *, say: Callable[[str], None],
                blocked: str | None = None) -> tuple[Path | None, str | None]:
    """(NAME.tflite in the zoo, None), made with `edgepix export --format tflite` where that format exists, or
    (None, why there is none: "no tflite export" where `edgepix export` has no such format). `blocked`: why an
    earlier export in this run could not run at all (no such format, a missing converter), so that it is not tried
    again for every model."""
    path = zoo / f"{model.name}.tflite"
    if path.is_file():
        return path, None
    if blocked is not None:
        return None, blocked
    if model.int8:
        return None, "no INT8 .tflite in the zoo"
    if model.kind == "nhwc":
        return None, "no edgepix checkpoint to export a .tflite from"
    args = ["export", str(source_path(zoo, model)), "--format", "tflite", "--out", str(path)]
    if model.arch != "dcgan":
        args += ["--imgsz", str(model.size), str(model.size)]
    try:
        _run_edgepix(args, "edgepix export --format tflite", say)
    except EdgepixError as e:
        return None, NO_TFLITE_EXPORT if "invalid choice: 'tflite'" in str(e) else str(e)
    return path, None


# ---- the columns ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _profile_env(value: str) -> Iterator[None]:
    """EDGEPIX_PROFILE=value while a backend loads (auto reads the profile then), restored afterwards."""
    from edgepix.runtime.backends.profile import PROFILE_ENV

    old = os.environ.get(PROFILE_ENV)
    os.environ[PROFILE_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PROFILE_ENV, None)
        else:
            os.environ[PROFILE_ENV] = old


def edgepix_auto(path: Path, threads: int, profile: str):
    """What `auto` runs for `path` with EDGEPIX_PROFILE=profile: the .tflite beside it on LiteRT where `edgepix tune`
    recorded that as fastest (as a Segmenter or generator opening `path` with `auto` does), else
    `load_backend(path, "auto")`."""
    from edgepix.runtime.backends.profile import preferred_sibling

    from .peers import edgepix_backend
    from .tune import litert_sibling

    with _profile_env(profile):
        sibling = preferred_sibling(path, threads=threads)
        if sibling is not None:
            return litert_sibling(path, sibling[0], threads)
        return edgepix_backend(path, "auto", threads)


def litert_defaults(path: Path, threads: int, onnx: Path | None = None):
    """A plain LiteRT interpreter as its users write it: `Interpreter(model_path, num_threads)`. An NCHW input is
    handed over in the .tflite's NHWC once, outside the timed call; where `onnx` (the same model) gives its output
    channels first, the NHWC output comes back as a transposed view (no copy), so that its agreement with ONNX
    Runtime's output can be read."""
    import numpy as np

    from edgepix.runtime.description.onnxproto import read_onnx_header
    from edgepix.runtime.description.tflite import import_litert

    interpreter = import_litert("ai_edge_litert.interpreter").Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    given, taken = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    shape = tuple(int(d) for d in given["shape"])
    if given["dtype"] != np.float32:
        raise EdgepixError(f"{path.name} takes {np.dtype(given['dtype']).name} input; this column runs float models")
    feeds: dict[int, np.ndarray] = {}
    out_shape = tuple(int(d) for d in taken["shape"])
    onnx_shape = read_onnx_header(onnx).outputs[0].shape if onnx is not None else None
    channels_first = (len(out_shape) == 4 and out_shape != onnx_shape
                      and (out_shape[0], out_shape[3], out_shape[1], out_shape[2]) == onnx_shape)

    def call(x: np.ndarray) -> np.ndarray:
        if id(x) not in feeds:
            nhwc = x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
            feeds.clear()
            feeds[id(x)] = x if x.shape == shape else np.ascontiguousarray(nhwc)
            if feeds[id(x)].shape != shape:
                raise EdgepixError(f"{path.name} takes {shape}, the benchmark input is {x.shape}")
        interpreter.set_tensor(given["index"], feeds[id(x)])
        interpreter.invoke()
        y = interpreter.get_tensor(taken["index"])
        return y.transpose(0, 3, 1, 2) if channels_first else y

    version = getattr(import_litert(), "__version__", "?")
    return f"LiteRT {version} Interpreter defaults (XNNPACK), {threads} threads", call, None


def nhwc_eager(state: Path, threads: int):
    import torch

    torch.set_num_threads(threads)
    module = _nhwc_module().eval()
    module.load_state_dict(torch.load(state, weights_only=True))

    def call(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return f"the wrapped module in FP32, torch {torch.__version__} eager, {threads} threads", call, None


def _failing(reason: str) -> Callable:
    def build():
        raise EdgepixError(reason)

    return build


def builders(zoo: Path, model: ZooModel, onnx: Path, *, threads: int, profile: Path | None,
             tune_error: str | None, tflite: Path | None, tflite_reason: str | None) -> list[tuple[str, Callable]]:
    """(column, build) for `peers.measure`, in COLUMNS order."""
    from .peers import openvino_defaults, ort_defaults, torch_eager

    source = source_path(zoo, model)
    if model.kind == "nhwc":
        eager = lambda: nhwc_eager(source, threads)  # noqa: E731
    else:
        eager = lambda: torch_eager(source, threads, (model.size, model.size))  # noqa: E731
    return [
        (DEFAULT, lambda: edgepix_auto(onnx, threads, "off")),
        (TUNED, lambda: edgepix_auto(onnx, threads, str(profile)) if profile else _failing(tune_error)()),
        (ORT, lambda: ort_defaults(onnx, threads)),
        (OPENVINO, lambda: openvino_defaults(onnx, threads)),
        (LITERT, lambda: litert_defaults(tflite, threads, onnx) if tflite else _failing(tflite_reason)()),
        (TORCH, eager),
    ]


def tune_profile(onnx: Path, profile: Path, *, threads: int, rounds: int, warmup: int,
                 say: Callable[[str], None]) -> str:
    """`edgepix tune` on `onnx` (quiet), its choice recorded in `profile`; returns the backend it chose."""
    from edgepix.runtime.backends.profile import record

    from .tune import tflite_sibling, tune

    say(f"[zoo] edgepix tune {onnx.name} ({rounds} rounds)")
    report, fastest = tune(onnx, threads=threads, rounds=rounds, warmup=warmup)
    record(onnx, fastest, {"threads": threads, "rounds": rounds,
                           "p50_ms": {n.removeprefix("edgepix "): round(s.p50, 3) for n, s in report.stats.items()}},
           threads=threads, path=profile, runs=tflite_sibling(onnx) if fastest == "litert" else None)
    return fastest


# ---- one run -------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One model in one mode: each column's statistics or why it has none, and the two ratios."""

    model: str
    mode: str
    input_shape: tuple[int, ...] | None = None
    load: str = ""
    settle: str = ""
    load_mode: dict = field(default_factory=dict)  # benchmarks.load.Load.as_dict()
    columns: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def p50(self, column: str) -> float | None:
        return self.columns.get(column, {}).get("p50_ms")

    def ratios(self) -> dict[str, dict]:
        """At p50: edgepix default / ONNX Runtime defaults; edgepix tuned / the fastest peer; and edgepix tuned / the
        fastest peer that kept the file's float precision (tune never picks one that does not: OpenVINO's bf16
        defaults are faster, but not the arithmetic the parity gate checked)."""
        out: dict[str, dict] = {}
        default, ort = self.p50(DEFAULT), self.p50(ORT)
        out["default_vs_ort"] = ({"ratio": default / ort} if default and ort else
                                 {"reason": "edgepix default or ONNX Runtime did not run"})
        tuned = self.p50(TUNED)
        for key, exact in (("tuned_vs_fastest_peer", False), ("tuned_vs_fastest_exact_peer", True)):
            peers = {c: self.p50(c) for c in PEER_COLUMNS
                     if self.p50(c) and not (exact and self.columns[c].get("reduced_precision"))}
            if tuned and peers:
                fastest = min(peers, key=peers.get)
                out[key] = {"ratio": tuned / peers[fastest], "peer": fastest}
            else:
                out[key] = {"reason": "edgepix tuned or every peer did not run"}
        return out

    def as_dict(self) -> dict:
        return {"model": self.model, "mode": self.mode,
                "input_shape": list(self.input_shape) if self.input_shape else None, "load": self.load,
                "load_mode": self.load_mode,
                "settle": self.settle, "columns": self.columns, "ratios": self.ratios(), "notes": self.notes}


def _row(model: ZooModel, mode: str, report, load_text: str, load: dict) -> Row:
    row = Row(model.name, mode, tuple(report.input_shape), load_text, report.settle_text(), load_mode=load,
              notes=list(report.notes))
    for peer in report.peers:
        cell: dict = {"runs": peer.runs, "agreement": peer.agreement}
        if peer.name in report.stats:
            s = report.stats[peer.name]
            cell.update(p50_ms=s.p50, p90_ms=s.p90, p99_ms=s.p99, calls=s.n)
            if peer.name in (DEFAULT, TUNED):
                cell["backend"] = peer.runs.split(" ", 1)[0]  # a backend's description starts with its name
            if peer.reduced_precision:
                cell["reduced_precision"] = True
                cell["note"] = "computed float layers in reduced precision (bf16/f16), not the file's FP32"
            if peer.name == TORCH and model.int8:
                cell["note"] = "PyTorch ran the FP32 checkpoint: there is no INT8 model to run in eager mode"
        else:
            cell["skipped"] = peer.skipped or "did not run"
        row.columns[peer.name] = cell
    return row


def _failed_row(model: ZooModel, mode: str, reason: str) -> Row:
    return Row(model.name, mode, columns={c: {"skipped": reason} for c in COLUMNS})


def run_zoo(zoo: Path, models: list[ZooModel], *, modes: list[str], threads: int, rounds: int, warmup: int,
            tune_rounds: int, say: Callable[[str], None]) -> list[Row]:
    """Build what is missing, tune each model (quiet), then measure every model in every mode."""
    from .load import load_mode
    from .peers import load_average, measure

    zoo.mkdir(parents=True, exist_ok=True)
    built: dict[str, tuple[Path | None, str | None]] = {}
    for model in models:
        try:
            built[model.name] = (build(zoo, model, say=say), None)
        except EdgepixError as e:
            built[model.name] = (None, str(e))
            say(f"[zoo] {model.name}: {e}")
    rows: list[Row] = []
    tflite_blocked: str | None = None
    with tempfile.TemporaryDirectory(prefix="edgepix-zoo-profile-") as tmp:
        for model in models:
            onnx, error = built[model.name]
            if onnx is None:
                rows += [_failed_row(model, mode, error) for mode in modes]
                continue
            tflite, tflite_reason = tflite_file(zoo, model, say=say, blocked=tflite_blocked)
            if tflite_reason == NO_TFLITE_EXPORT or "install it with" in (tflite_reason or ""):
                tflite_blocked = tflite_reason  # no such format, or its converter is missing: so for every model
            profile: Path | None = Path(tmp) / f"{model.name}.json"
            tune_error = None
            try:
                tune_profile(onnx, profile, threads=threads, rounds=tune_rounds, warmup=warmup, say=say)
            except EdgepixError as e:
                profile, tune_error = None, f"edgepix tune failed: {e}"
            columns = builders(zoo, model, onnx, threads=threads, profile=profile, tune_error=tune_error,
                               tflite=tflite, tflite_reason=tflite_reason)
            for mode in modes:
                say(f"[zoo] {model.name}, {mode}: {rounds} interleaved rounds")
                before = load_average()
                with load_mode(mode) as load:
                    report = measure(onnx, columns, threads=threads, rounds=rounds, warmup=warmup)
                    load.update()
                after = load_average().replace(" before", " after")
                rows.append(_row(model, mode, report, f"{load.describe()}; {before}, {after}", load.as_dict()))
    return rows


# ---- the report ----------------------------------------------------------------------------------------------


def _cell_text(cell: dict, notes: dict[str, int]) -> str:
    """p50 / p90 (and the backend edgepix picked), or a footnote to why the column has no number."""
    if "p50_ms" not in cell:
        return f"- [{notes.setdefault(cell['skipped'], len(notes) + 1)}]"
    text = f"{cell['p50_ms']:.1f} / {cell['p90_ms']:.1f}"
    if "backend" in cell:
        text += f" {cell['backend']}"
    if "note" in cell:
        text += f" [{notes.setdefault(cell['note'], len(notes) + 1)}]"
    return text


def _ratio_text(ratio: dict, notes: dict[str, int]) -> str:
    if "ratio" not in ratio:
        return f"- [{notes.setdefault(ratio['reason'], len(notes) + 1)}]"
    return f"{ratio['ratio']:.2f}x" + (f" ({SHORT[ratio['peer']]})" if "peer" in ratio else "")


RATIOS = ("default_vs_ort", "tuned_vs_fastest_peer", "tuned_vs_fastest_exact_peer")
HEADER = ("model", "input", "mode", *COLUMNS, "default / ORT", "tuned / fastest peer",
          "tuned / fastest peer at the file's precision")


def table_rows(rows: list[Row]) -> tuple[list[tuple[str, ...]], dict[str, int]]:
    """The table's cells row by row (HEADER order) and the footnotes they refer to (text -> number)."""
    notes: dict[str, int] = {}
    cells = []
    for row in rows:
        ratios = row.ratios()
        shape = "x".join(map(str, row.input_shape)) if row.input_shape else "-"
        cells.append((row.model, shape, row.mode, *(_cell_text(row.columns[c], notes) for c in COLUMNS),
                      *(_ratio_text(ratios[r], notes) for r in RATIOS)))
    return cells, notes


def load_lines(rows: list[Row], modes: list[str]) -> list[str]:
    """Per mode: what it was, the burner's CPU use over all rows (busy) and the load averages seen."""
    from .load import Load

    lines = []
    for mode in modes:
        measured = [r for r in rows if r.mode == mode and r.load_mode]
        if not measured:
            continue
        load = Load(mode)
        used = [(r.load_mode["burner_cpu_s"], r.load_mode["burner_wall_s"]) for r in measured
                if r.load_mode.get("burner_cpu_s") is not None and r.load_mode.get("burner_wall_s")]
        if used:
            load.cpu_s, load.wall_s = sum(c for c, _ in used), sum(w for _, w in used)
        averages = [r.load.split("; ", 1)[1] for r in measured if "; " in r.load]
        lines.append(f"{load.describe()}; {averages[0].split(', ')[0]} (first row), "
                     f"{averages[-1].split(', ')[-1]} (last row)")
    return lines


def markdown(rows: list[Row], header_lines: list[str]) -> str:
    cells, notes = table_rows(rows)
    out = [*header_lines, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    out += ["", *(f"[{n}] {text}" for text, n in notes.items())]
    return "\n".join(out) + "\n"


def text_table(rows: list[Row], header_lines: list[str]) -> str:
    cells, notes = table_rows(rows)
    widths = [max(len(r[i]) for r in [HEADER, *cells]) for i in range(len(HEADER))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [*header_lines, "", line(HEADER), line(tuple("-" * w for w in widths)), *(line(r) for r in cells)]
    out += ["", *(f"[{n}] {text}" for text, n in notes.items())]
    return "\n".join(out) + "\n"


# ---- the command ---------------------------------------------------------------------------------------------


def _names(text: str, valid: list[str], what: str) -> list[str]:
    from edgepix.runtime.core.errors import unknown_name

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise EdgepixError(f"--{what}: expected comma-separated names from {', '.join(valid)}")
    for n in names:
        if n not in valid:
            raise EdgepixError(f"--{what}: " + unknown_name(what.rstrip("s"), n, valid))
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgepix.benchmarks.zoo", description=__doc__.splitlines()[0].split(": ", 1)[1],
        epilog=f"Models: {', '.join(ZOO)}.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"the zoo folder; models already built there are reused (default {DEFAULT_OUT})")
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated subset (default: all)")
    parser.add_argument("--modes", default="quiet,busy", help="quiet, busy or both (default quiet,busy)")
    parser.add_argument("--threads", type=int, help="threads for every runtime (default: the usable cores)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per model and mode (default 30; --quick 3)")
    parser.add_argument("--warmup", type=int, help="warm-up calls per column (default 5; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke test, not a measurement")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for docs)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        return _main(args, say)
    except EdgepixError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    from edgepix.runtime.core.cpuinfo import usable_cores
    from edgepix.runtime.core.fileio import atomic_write_text

    from .environment import describe, environment
    from .load import MODES

    models = [ZOO[n] for n in _names(args.models, list(ZOO), "models")]
    modes = _names(args.modes, list(MODES), "modes")
    threads = args.threads or usable_cores()
    rounds = args.rounds or (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    if threads < 1 or rounds < 1 or warmup < 0:
        raise EdgepixError(f"--threads and --rounds must be at least 1 and --warmup at least 0, got {threads}, "
                           f"{rounds} and {warmup}")
    start = time.perf_counter()
    rows = run_zoo(args.out, models, modes=modes, threads=threads, rounds=rounds, warmup=warmup,
                   tune_rounds=max(rounds, 3), say=say)
    env_line = describe(environment(threads=threads))
    header = [f"Environment: {env_line}",
              f"Zoo: {args.out}; {threads} threads for every runtime; {warmup} warm-up call(s) per column, then "
              f"{rounds} interleaved rounds per model and mode, each call on settled cores; edgepix tuned: "
              f"`edgepix tune` ({max(rounds, 3)} rounds, quiet) recorded in a profile of this run's own. Cells: "
              "p50 / p90 ms (the backend edgepix ran); ratios at p50, below 1.00x edgepix is faster."]
    header += load_lines(rows, modes)
    text = (markdown if args.markdown else text_table)(rows, header)
    print(text, end="")
    say(f"[zoo] {len(rows)} rows in {time.perf_counter() - start:.0f} s")
    if args.json:
        atomic_write_text(args.json, json.dumps({
            "environment": env_line, "zoo": str(args.out), "threads": threads, "rounds": rounds, "warmup": warmup,
            "modes": modes, "columns": list(COLUMNS), "rows": [r.as_dict() for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
