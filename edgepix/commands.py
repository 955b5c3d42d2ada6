"""Verbs that span the packages: `info`, `doctor`, `data`."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from edgepix.runtime.core.formats import CHECKPOINT_SUFFIXES, ENGINE_SUFFIXES, ONNX_SUFFIXES, TFLITE_SUFFIXES


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="show a model's spec, inputs, outputs and size")
    p.add_argument("model", type=Path, help="an .onnx file, a .tflite (LiteRT) model, an edgepix checkpoint (.pt), a "
                                            "TensorRT engine, or a Hugging Face save_pretrained folder")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("doctor", help="report what this machine can run and what is missing")
    p.add_argument("--engines", type=Path, metavar="DIR",
                   help="also say, for each TensorRT engine in DIR, whether it can load here (exit 1 if one cannot)")
    p.set_defaults(func=cmd_doctor)



# ---- info ----------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from edgepix.runtime.core.errors import ModelFormatError

    path: Path = args.model
    if not path.exists():
        raise ModelFormatError(f"model file not found: {path}")
    from edgepix.runtime.description.hfconfig import is_hf_folder

    suffix = path.suffix.lower()
    if is_hf_folder(path):
        info = _hf_folder_info(path)
    elif suffix in ONNX_SUFFIXES:
        info = _onnx_info(path)
    elif suffix in TFLITE_SUFFIXES:
        info = _tflite_info(path)
    elif suffix in CHECKPOINT_SUFFIXES:
        info = _checkpoint_info(path)
    elif suffix in ENGINE_SUFFIXES:
        info = _engine_info(path)
    else:
        valid = sorted(ONNX_SUFFIXES + TFLITE_SUFFIXES + CHECKPOINT_SUFFIXES + ENGINE_SUFFIXES)
        raise ModelFormatError(f"{path}: expected a model file ({', '.join(valid)}), got '{suffix or 'no suffix'}'")
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    info = {"path": str(path), "size_bytes": size, **info}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _onnx_info(path: Path) -> dict:
    from edgepix.runtime.description.onnxinfo import read_onnx_info

    info = read_onnx_info(path)
    return {
        "format": "onnx",
        "producer": info.producer,
        "inputs": [t.describe() for t in info.inputs],
        "outputs": [t.describe() for t in info.outputs],
        **_onnx_flops(path, info),
        "spec": info.spec.to_dict() if info.spec else None,
        "metadata": {k: v for k, v in info.metadata.items() if k != "edgepix.spec"},
    }


def _onnx_flops(path: Path, info) -> dict:
    """{"gflops_per_image", "flops_input"}: FLOPs of one input sample in the model's own layout (the spec's size
    and layout, or a foreign graph's fixed input shape); {} where that input is not known or the `onnx` package
    that counts them is not installed (a runtime-only install)."""
    from edgepix.benchmarks.flops import flops_per_image, input_sample_shape

    if info.spec is not None:
        shape = input_sample_shape(info.spec)
    elif len(info.inputs) == 1 and all(isinstance(d, int) and d > 0 for d in info.inputs[0].shape):
        shape = tuple(info.inputs[0].shape[1:])
    else:
        return {}
    try:
        flops = flops_per_image(path, shape)
    except ImportError:  # no `onnx` here: the rest of the report does not need it
        return {}
    return {"gflops_per_image": flops / 1e9, "flops_per_image": flops, "flops_input": list(shape)}


def _tflite_info(path: Path) -> dict:
    """A .tflite as the runtime reads it (no interpreter): its tensors (stored dtype, shape, layout, quantization),
    its FLOPs at the stored shapes, the spec it carries (NAME.spec.json beside it, else embedded), or, without one,
    the spec the runtime would infer for a segmenter from its TFLite metadata and shapes, and that metadata."""
    from edgepix.benchmarks.flops import FlopsUnavailable, flops_per_image
    from edgepix.runtime.core.errors import EdgepixError
    from edgepix.runtime.description.specfile import read_spec
    from edgepix.runtime.description.tflite import read_sidecar, read_tflite, sidecar_path

    model = read_tflite(path)
    spec, spec_source = read_sidecar(path), f"{sidecar_path(path).name} beside the model"
    if spec is None and model.spec is not None:
        spec, spec_source = model.spec, "embedded in the model (metadata entry edgepix.spec)"
    if spec is None:
        try:
            spec = read_spec(path).spec
            spec_source = ("none stored; inferred from the TFLite metadata and the tensors' shapes, as the runtime "
                           "would run it (a segmenter; `edgepix spec` writes one)")
        except EdgepixError as e:
            spec_source = f"none stored, and none inferred for a segmenter: {str(e).splitlines()[0][:200]}"

    def layout(t, role: str) -> str | None:
        if spec is None or len(t.shape) != 4:
            return None
        if role == "input" and t.name == spec.input_name:
            return spec.input_layout.value
        if role == "output" and t.name == spec.output_name:
            return spec.output_layout.value
        return None

    def tensor(t, role: str) -> dict:
        d = {"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape), "layout": layout(t, role)}
        if t.scale > 0:
            d.update(scale=t.scale, zero_point=t.zero_point)
        return d

    def describe(d: dict) -> str:
        dims = ", ".join("?" if x is None else str(x) for x in d["shape"])
        text = f"{d['name']}: {d['dtype']} [{dims}]" + (f" {d['layout']}" if d["layout"] else "")
        return text + (f", quantized: scale {d['scale']:.6g}, zero point {d['zero_point']}" if "scale" in d else "")

    inputs = [tensor(t, "input") for t in model.inputs]
    outputs = [tensor(t, "output") for t in model.outputs]
    flops: dict = {}
    first = model.inputs[0].shape if model.inputs else ()
    if first and all(isinstance(x, int) and x > 0 for x in first[1:]):
        try:
            n = flops_per_image(path, tuple(first[1:]))
            flops = {"gflops_per_image": n / 1e9, "flops_per_image": n, "flops_input": list(first[1:])}
        except FlopsUnavailable:
            flops = {}
    meta = model.metadata
    metadata = {k: v for k, v in {
        "name": meta.name,
        "labels": f"{len(meta.class_names)} classes: {', '.join(meta.class_names[:8])}"
                  f"{', ...' if len(meta.class_names) > 8 else ''}" if meta.class_names else None,
        "normalization mean": list(meta.mean) if meta.mean is not None else None,
        "normalization std": list(meta.std) if meta.std is not None else None}.items() if v is not None}
    return {
        "format": "tflite",
        "inputs": [describe(d) for d in inputs],
        "outputs": [describe(d) for d in outputs],
        "input_tensors": inputs,
        "output_tensors": outputs,
        **flops,
        "spec_source": spec_source,
        "spec": spec.to_dict() if spec is not None else None,
        "metadata": metadata,
    }


def _hf_folder_info(path: Path) -> dict:
    """What edgepix reads from a save_pretrained folder (no torch, no transformers): the spec fields it gives."""
    from edgepix.runtime.description.hfconfig import read_hf_folder, spec_fields

    folder = read_hf_folder(path)
    fields = spec_fields(folder)
    return {"format": "hugging-face-folder", "arch": folder.model_type,
            "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
            "metadata": {"files": ", ".join(sorted(p.name for p in path.iterdir()))}}


def _checkpoint_info(path: Path) -> dict:
    from edgepix.runtime.core.errors import require

    require("torch", extra="train", purpose="Reading checkpoints")
    from edgepix.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    n_params = sum(int(t.numel()) for t in ckpt["model"].values() if hasattr(t, "numel"))
    return {
        "format": "checkpoint",
        "arch": ckpt["arch"],
        "arch_kwargs": ckpt["arch_kwargs"],
        "parameters": n_params,
        "epoch": ckpt.get("epoch"),
        "metrics": ckpt.get("metrics", {}),
        "ema": "ema" in ckpt and ckpt["ema"] is not None,
        "spec": ckpt["spec"].to_dict(),
    }


def _engine_info(path: Path) -> dict:
    from edgepix.runtime.core import boundedjson
    from edgepix.runtime.core.errors import ModelFormatError

    manifest = path.with_name(path.name + ".json")
    if not manifest.exists():
        raise ModelFormatError(f"{path}: no manifest {manifest.name} beside the engine; rebuild it with edgepix export")
    try:
        text = manifest.read_bytes()
    except OSError as e:
        raise ModelFormatError(f"{manifest}: unreadable manifest ({e})") from e
    data = boundedjson.loads(text, what=str(manifest), error=ModelFormatError,
                             hint="rebuild the engine with edgepix export")
    if not isinstance(data, dict):
        raise ModelFormatError(f"{manifest}: expected a JSON object, got {type(data).__name__}; rebuild the engine "
                               "with edgepix export")
    return {"format": "tensorrt-engine", **data}


def _print_info(info: dict) -> None:
    size_mb = info["size_bytes"] / 1e6
    print(f"{'file':<12}{info['path']} ({size_mb:.2f} MB, {info['format']})")
    for key in ("producer", "arch", "arch_kwargs", "parameters", "epoch", "ema"):
        if key in info:
            print(f"{key:<12}{info[key]}")
    for key in ("inputs", "outputs"):
        for i, line in enumerate(info.get(key, [])):
            print(f"{key if i == 0 else '':<12}{line}")
    if "gflops_per_image" in info:
        shape = "x".join(map(str, info["flops_input"]))
        print(f"{'flops':<12}{info['gflops_per_image']:.3f} GFLOP per image ({info['flops_per_image']:,} FLOPs; input "
              f"sample {shape}; multiply-add = 2)")
    if info.get("metrics"):
        print(f"{'metrics':<12}" + ", ".join(f"{k}={_fmt(v)}" for k, v in info["metrics"].items()))
    spec = info.get("spec")
    if "spec_source" in info:
        print(f"{'spec from':<12}{info['spec_source']}")
    if spec is None:
        print(f"{'spec':<12}none (a foreign model: the runtime infers what it can from shapes)")
    else:
        first = True
        for k, v in spec.items():
            if k in ("palette",):
                continue
            print(f"{'spec' if first else '':<12}{k} = {v}")
            first = False
    for k, v in info.get("metadata", {}).items():
        print(f"{'metadata':<12}{k} = {v}")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# ---- doctor --------------------------------------------------------------------------------------------


def _version(module: str) -> tuple[object | None, str]:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return None, str(e)
    return mod, getattr(mod, "__version__", "installed")


def _opencv_video_backends(cv2) -> dict[str, bool]:
    """What OpenCV was built with for video I/O, read from its build information."""
    build = cv2.getBuildInformation()
    section = build[build.find("Video I/O:"):]
    found = {}
    for name, key in (("FFmpeg", "FFMPEG:"), ("GStreamer", "GStreamer:"), ("V4L2", "v4l/v4l2:")):
        i = section.find(key)
        found[name] = i >= 0 and section[i + len(key):].lstrip().upper().startswith("YES")
    return found


def _gpu_facts() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (subprocess.SubprocessError, OSError) as e:
            return [f"nvidia-smi failed: {e}"]
    model = Path("/proc/device-tree/model")
    if model.exists():  # Jetson boards have no nvidia-smi with GPU details
        text = model.read_text(errors="replace").strip("\x00\n ")
        if "jetson" in text.lower() or "nvidia" in text.lower():
            return [text]
    return []


# Where packages that a JetPack or Debian system installs for its own Python come from (apt's python3-opencv,
# JetPack's TensorRT bindings): a virtual environment sees them only when made with --system-site-packages.
OPENCV_MIN_VERSION = (4, 6)  # the oldest OpenCV the runtime is tested with (Debian 12's python3-opencv)
INSTALL_DOCS = "docs/install.md#keeping-the-systems-opencv"
JETSON_DOCS = "docs/jetson.md"
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _system_package_dirs() -> list[Path]:
    """The folders where apt (Debian, Ubuntu, JetPack) and system-wide builds put packages for /usr/bin/python3."""
    return [Path("/usr/lib/python3/dist-packages"), *sorted(Path("/usr/lib").glob("python3.*/dist-packages")),
            *sorted(Path("/usr/local/lib").glob("python3.*/dist-packages"))]


def _uses_system_python() -> bool:
    """This interpreter is the OS's own (directly or in a venv made from it), whose packages apt installs."""
    return Path(sys.base_prefix).resolve() == Path("/usr")


def _module_origin(module) -> str:
    """Where an imported module comes from: 'system package', 'pip: DIST VERSION' or 'not from pip'."""
    import importlib.metadata as metadata

    file = Path(getattr(module, "__file__", None) or "").resolve()
    if file.is_relative_to("/usr/lib"):
        return "system package"
    top = module.__name__.split(".")[0]
    for name in metadata.packages_distributions().get(top, []):
        dist = metadata.distribution(name)
        if any(Path(dist.locate_file(f)).resolve() == file for f in dist.files or ()):
            return f"pip: {dist.metadata['Name']} {dist.version}"
    return "not installed by pip"


def _system_copy(module: str, in_use=None) -> Path | None:
    """A copy of `module` in the system's package folders other than the one in use, or None."""
    used = Path(in_use.__file__).resolve() if in_use is not None and getattr(in_use, "__file__", None) else None
    for folder in _system_package_dirs():
        for candidate in [folder / module, *folder.glob(f"{module}.*.so")]:
            if candidate.exists() and not (used and used.is_relative_to(candidate.resolve())):
                return folder
    return None


_PROBE_OPENCV = """import json, sys
sys.path.insert(0, sys.argv[1])
import cv2, numpy
print(json.dumps({"version": cv2.__version__, "file": cv2.__file__, "numpy": numpy.__version__,
                  "gstreamer": "GStreamer:" in cv2.getBuildInformation()
                               and cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER)}))"""


def _probe_opencv(folder: Path) -> dict | None:
    """The OpenCV in `folder`, loaded in a subprocess by the interpreter it is built for (this one when it is the
    system's): version, file, GStreamer; None if it does not load."""
    python = sys.executable if _uses_system_python() or not SYSTEM_PYTHON.exists() else str(SYSTEM_PYTHON)
    try:
        done = subprocess.run([python, "-c", _PROBE_OPENCV, str(folder)], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (ValueError, IndexError):
        return None


def _opencv_fix(cv2, origin: str, system: dict) -> str:
    """The command that lets this environment use the system's OpenCV (`system`: what _probe_opencv found)."""
    if not _uses_system_python():
        return (f"make an environment of the system's Python ({SYSTEM_PYTHON} -m venv --system-site-packages ENV) "
                "and install edgepix there without the cpu/gpu extras")
    if not _sees_system_packages():
        return (f"recreate this environment with {SYSTEM_PYTHON} -m venv --system-site-packages (it does not see "
                "the system's packages) and install edgepix there without the cpu/gpu extras")
    if origin.startswith("pip:"):
        import numpy

        # The wheel may have brought numpy 2, under which an OpenCV built for numpy 1.x does not import.
        major = {name: int(v.split(".")[0]) for name, v in (("here", numpy.__version__), ("system", system["numpy"]))}
        numpy_fix = f" && {sys.executable} -m pip install 'numpy<2'" if major["here"] >= 2 > major["system"] else ""
        return (f"{sys.executable} -m pip uninstall -y {origin.split()[1]}{numpy_fix} (the cpu/gpu extras of "
                "edgepix bring the wheel back: install edgepix without them)")
    return f"remove the OpenCV at {Path(cv2.__file__).parent}"


def _sees_system_packages() -> bool:
    return any(str(d) in sys.path for d in _system_package_dirs())


def _on_jetson() -> bool:
    model = Path("/proc/device-tree/model")
    text = model.read_text(errors="replace").lower() if model.exists() else ""
    return Path("/etc/nv_tegra_release").exists() or "jetson" in text


def _doctor_opencv(rows: list[tuple[str, str, str]]) -> None:
    """Which OpenCV, from where, with which video back-ends; a pip OpenCV without GStreamer that hides the
    system's (with GStreamer) is named with the command that fixes it."""
    cv2, v = _version("cv2")
    if not cv2:
        rows.append(("opencv", "missing", "disables everything (images, video, every verb that reads them); "
                     "install: pip install 'edgepix[cpu]', or, to keep the system's OpenCV with GStreamer, "
                     f"apt-get install python3-opencv in a venv made with --system-site-packages (see {INSTALL_DOCS})"))
        return
    video = _opencv_video_backends(cv2)
    origin = _module_origin(cv2)
    rows.append(("opencv", "ok", f"{v} at {Path(cv2.__file__).parent} ({origin}); video I/O: "
                 + ", ".join(f"{k} {'yes' if on else 'no'}" for k, on in video.items())))
    if tuple(int(p) for p in re.findall(r"\d+", v)[:2]) < OPENCV_MIN_VERSION:
        rows.append(("opencv-version", "old", f"OpenCV {v} is older than {'.'.join(map(str, OPENCV_MIN_VERSION))}, "
                     "the oldest the runtime is tested with"))
    if not video["GStreamer"]:
        system = _system_copy("cv2", cv2)
        probe = _probe_opencv(system) if system else None
        if probe and probe["gstreamer"] and _uses_system_python() and _sees_system_packages():
            rows.append(("gstreamer", "shadowed", f"this OpenCV {v} has no GStreamer and hides the system's OpenCV "
                         f"{probe['version']} at {system}, which has it: csi://, gst:// and rtp:// need it; fix: "
                         f"{_opencv_fix(cv2, origin, probe)}; see {INSTALL_DOCS}"))
        elif probe and probe["gstreamer"]:
            rows.append(("gstreamer", "missing", f"this OpenCV {v} has no GStreamer: disables csi:// and gst:// "
                         f"sources and rtp:// sinks; the system's OpenCV {probe['version']} at {system} has it, "
                         f"but this environment does not use it; install: {_opencv_fix(cv2, origin, probe)}; see "
                         f"{INSTALL_DOCS}"))
        else:
            rows.append(("gstreamer", "missing", "OpenCV lacks GStreamer: disables csi:// and gst:// sources and "
                         "rtp:// sinks; install: the system's OpenCV (JetPack's, or apt-get install python3-opencv) "
                         f"without the opencv-python wheel (see {INSTALL_DOCS}), or build OpenCV with "
                         "-DWITH_GSTREAMER=ON"))
    try:
        n_cuda = cv2.cuda.getCudaEnabledDeviceCount()
    except (AttributeError, cv2.error):
        n_cuda = 0
    rows.append(("opencv-cuda", "ok" if n_cuda else "missing",
                 f"{n_cuda} CUDA device(s)" if n_cuda else
                 "disables the opencv backend's CUDA target (CPU target still works); needs an OpenCV built "
                 "with CUDA"))


def _doctor_onnxruntime(rows: list[tuple[str, str, str]]) -> None:
    ort, v = _version("onnxruntime")
    jetson = _on_jetson()
    if ort:
        providers = ort.get_available_providers()
        rows.append(("onnxruntime", "ok", f"{v} ({_module_origin(ort)}); providers: {', '.join(providers)}"))
        if jetson and "CUDAExecutionProvider" not in providers:
            rows.append(("onnxruntime-gpu", "missing", "disables ort-cuda and ort-trt on this Jetson; install: the "
                         f"onnxruntime-gpu wheel built for its JetPack, from Jetson AI Lab's index ({JETSON_DOCS})"))
    else:
        how = (f"the onnxruntime-gpu wheel for this JetPack ({JETSON_DOCS})" if jetson
               else "pip install 'edgepix[cpu]' (or [gpu] on NVIDIA)")
        rows.append(("onnxruntime", "missing", f"disables ONNX inference (backends ort-*); install: {how}"))


def _doctor_training_side(rows: list[tuple[str, str, str]]) -> None:
    torch, v = _version("torch")
    if torch:
        cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
                else "CUDA not available (CPU build or no GPU)")
        rows.append(("torch", "ok", f"{v}; {cuda}"))
    else:
        rows.append(("torch", "missing", "disables training, export and verification; install: "
                     "pip install 'edgepix[train]'"))
    for module, disables, extra in (
        ("onnx", "export", "train"),
        ("onnxscript", "the dynamo ONNX exporter", "train"),
        ("onnxslim", "graph simplification at export", "train"),
        ("tqdm", "progress bars (a plain counter is used)", "train"),
        ("matplotlib", "PNG plots of curves and benchmarks", "plot"),
        ("openvino", "the openvino backend", "openvino"),
        ("ai_edge_litert", "the litert backend (.tflite models)", "litert"),
    ):
        mod, v = _version(module)
        rows.append((module, "ok", v) if mod else
                    (module, "missing", f"disables {disables}; install: pip install 'edgepix[{extra}]'"))
    # Versions from the installed metadata: importing TensorFlow takes seconds.
    for dist, module in (("tf2onnx", "tf2onnx"), ("tensorflow", "tensorflow")):
        v = _dist_version(dist, module)
        rows.append((dist, "ok", v) if v else (dist, "missing", "disables export of .tflite models to ONNX; "
                                                               "install: pip install 'edgepix[tflite-convert]'"))
    v = _dist_version("litert-torch", "litert_torch")  # its import brings JAX: seconds
    rows.append(("litert-torch", "ok", v) if v else ("litert-torch", "missing", "disables export of checkpoints to "
                                                     ".tflite; install: pip install 'edgepix[tflite-export]'"))


def _dist_version(dist: str, module: str) -> str | None:
    """The installed version of the distribution that provides `module` (tensorflow comes as tensorflow-cpu too),
    without importing it; None when the module is not installed."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return None
    for name in (dist, f"{dist}-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed"


def _doctor_tensorrt(rows: list[tuple[str, str, str]]) -> None:
    """TensorRT and cuda-python, and where they come from (JetPack's system packages, or pip)."""
    jetson = _on_jetson()
    trt, v = _version("tensorrt")
    if trt:
        rows.append(("tensorrt", "ok", f"{v} ({_module_origin(trt)})"))
    else:
        hidden = _system_copy("tensorrt")
        how = ("pip install 'edgepix[gpu]'" if not jetson else
               "it comes with JetPack (apt-get install python3-libnvinfer)")
        if hidden and not _sees_system_packages():
            how = (f"the system's TensorRT at {hidden} is not visible here: make the virtual environment with "
                   f"python3 -m venv --system-site-packages ({JETSON_DOCS})")
        rows.append(("tensorrt", "missing", f"disables TensorRT engines (export --format engine, backend tensorrt); "
                     f"install: {how}"))
    cuda_rt = next((mod for mod in (_version(m)[0] for m in ("cuda.bindings.runtime", "cuda.cudart")) if mod), None)
    if cuda_rt:
        cuda, version = _version("cuda")
        rows.append(("cuda-python", "ok", f"{version if cuda else 'installed'} ({_module_origin(cuda_rt)})"))
    else:
        how = ("pip install cuda-python with the major version of JetPack's CUDA, e.g. 'cuda-python>=12,<13' on "
               f"JetPack 6 ({JETSON_DOCS})" if jetson else "pip install 'edgepix[gpu]'")
        rows.append(("cuda-python", "missing", f"disables the native tensorrt backend's device buffers; install: "
                     f"{how}"))


def _doctor_gpu(rows: list[tuple[str, str, str]]):
    """The GPUs, and which TensorRT and GPU engines built here target (the facts `--engines` compares with)."""
    from edgepix.runtime.backends.tensorrt.manifest import running_device_facts

    gpus = _gpu_facts()
    rows.extend(("gpu", "ok", g) for g in gpus)
    if not gpus:
        rows.append(("gpu", "none", "no NVIDIA GPU found: CPU backends only (ort-cpu, opencv)"))
    here = running_device_facts()
    if here.tensorrt and here.gpu:
        rows.append(("engines", "ok", f"engines built here target TensorRT {here.tensorrt}, {here.gpu} (compute "
                     f"capability {here.compute_capability}){f', CUDA {here.cuda}' if here.cuda else ''}"))
    else:
        rows.append(("engines", "none", f"TensorRT engines cannot run here ({here.describe()})"))
    return here


def cmd_doctor(args: argparse.Namespace) -> int:
    from edgepix import __version__
    from edgepix.runtime.core.cpuinfo import usable_cores

    rows: list[tuple[str, str, str]] = [  # (component, status, detail)
        ("edgepix", "ok", __version__),
        ("python", "ok", f"{platform.python_version()} ({sys.executable})"),
        ("platform", "ok", f"{platform.platform()}, {platform.machine()}, {usable_cores()} CPUs"),
    ]
    _doctor_cpu(rows)
    numpy, v = _version("numpy")
    rows.append(("numpy", "ok", f"{v} ({_module_origin(numpy)})") if numpy else
                ("numpy", "missing", "disables everything; install: pip install numpy"))
    _doctor_opencv(rows)
    _doctor_onnxruntime(rows)
    _doctor_training_side(rows)
    _doctor_tensorrt(rows)
    here = _doctor_gpu(rows)

    width = max(len(r[0]) for r in rows)
    for name, status, detail in rows:
        print(f"{name:<{width}}  {status:<8} {detail}")
    n_missing = sum(status == "missing" for _, status, _ in rows)
    n_fix = sum(status in ("shadowed", "old") for _, status, _ in rows)
    print(f"{len(rows)} checks, {n_missing} missing" + (f", {n_fix} to fix" if n_fix else "")
          + " (missing pieces disable features; edgepix still runs)")
    if getattr(args, "engines", None) is not None:
        return _doctor_engines(args.engines, here)
    return 0


def _doctor_cpu(rows: list[tuple[str, str, str]]) -> None:
    """The instruction sets that decide INT8 and FP16 speed on this CPU (see edgepix.runtime.core.cpuinfo)."""
    from edgepix.runtime.core.cpuinfo import cpu_features

    cpu = cpu_features()
    rows.append(("cpu", "ok", f"{cpu.model}: {cpu.describe()}"))
    int8_status = {True: "ok", False: "slow", None: "unknown"}[cpu.fast_int8]
    rows.append(("cpu-int8", int8_status, cpu.int8_advice()))
    fp16 = cpu.fp16_arithmetic
    rows.append(("cpu-fp16", {True: "ok", False: "none", None: "unknown"}[fp16],
                 "FP16 arithmetic on the CPU" if fp16 else
                 "no FP16 arithmetic on the CPU: FP16 files gain no speed here (they are meant for GPUs)"
                 if fp16 is False else "FP16 arithmetic support is unknown"))


def _doctor_engines(folder: Path, here) -> int:
    """One line per engine in `folder`: can it load here (manifest vs running TensorRT and GPU)? No TensorRT needed."""
    from edgepix.runtime.backends.tensorrt.manifest import scan_engines

    statuses = scan_engines(folder, here)
    print(f"engines in {folder} (this machine: {here.describe()}):")
    for st in statuses:
        print(f"  {'loads' if st.loads else 'NO':<6}{st.path.name}: {st.detail}")
    n_bad = sum(not st.loads for st in statuses)
    print(f"{len(statuses)} engine(s), {n_bad} cannot load here" + ("" if statuses else " (none found: *.engine, "
                                                                      "*.plan, *.trt)"))
    return 1 if n_bad else 0
