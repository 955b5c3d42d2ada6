"""TFLite models as they come: the `litert` backend against numpy references (float, quantized, dynamic batch,
MediaPipe's custom op, threads), their specs (a NAME.spec.json sidecar written by `edgepix spec`, TFLite metadata,
or inferred), `edgepix segment` on a .tflite, and `edgepix export MODEL.tflite --format onnx` through the parity gate
against LiteRT. The models are written by tests/tflite_models.py with the flatbuffer schema inside ai-edge-litert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tflite_models as tm
from conftest import REPO, run_edgepix

from edgepix.runtime.backends import BackendOptionError, load_backend
from edgepix.runtime.backends.registry import candidates
from edgepix.runtime.core.errors import BackendError, InputError, ModelFormatError

pytest.importorskip("ai_edge_litert.interpreter", reason="the litert backend needs pip install 'edgepix[litert]'")


def _converter_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("tf2onnx", "tensorflow"))


needs_converter = pytest.mark.skipif(not _converter_installed(),
                                     reason="the conversion needs pip install 'edgepix[tflite-convert]'")


@pytest.fixture
def segmenter(tmp_path) -> tuple[Path, dict]:
    path = tmp_path / "model.tflite"
    return path, tm.segmenter_tflite(path)


def images(n: int, shape=(64, 64, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


# ---- the backend ---------------------------------------------------------------------------------------------


def test_runs_a_segmenter_as_numpy_computes_it(segmenter):
    path, weights = segmenter
    x = images(1)
    with load_backend(path, "litert") as b:
        assert [t.describe() for t in b.inputs] == ["input: float32 [1, 64, 64, 3]"]
        assert [t.describe() for t in b.outputs] == ["mask: float32 [1, 64, 64, 1]"]
        assert b.thread_safe is False and "XNNPACK on" in b.description
        y = b.infer(x)["mask"]
    assert y.dtype == np.float32 and y.shape == (1, 64, 64, 1)
    assert float(np.abs(y - tm.segmenter_reference(x, weights)).max()) < 1e-5
    with pytest.raises(BackendError, match="closed"):
        b.infer(x)


def test_xnnpack_off_runs_the_builtin_kernels_to_the_same_answer(segmenter):
    path, weights = segmenter
    x = images(1, seed=1)
    with load_backend(path, "litert", xnnpack=False) as b:
        assert "XNNPACK off" in b.description
        assert float(np.abs(b.infer(x)["mask"] - tm.segmenter_reference(x, weights)).max()) < 1e-5


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_threads_option_sizes_the_interpreters_thread_pool(segmenter):
    path, weights = segmenter
    x = images(2, seed=2)[:1]
    before = os_threads()
    with load_backend(path, "litert", threads=3) as b:
        y = b.infer(x)["mask"]
        assert os_threads() - before == 2  # the calling thread and 2 workers
        assert "3 threads" in b.description
    assert os_threads() == before  # closing frees the pool
    assert float(np.abs(y - tm.segmenter_reference(x, weights)).max()) < 1e-5
    with pytest.raises(BackendOptionError, match="threads: expected a positive integer or None, got 0"):
        load_backend(path, "litert", threads=0)
    with pytest.raises(BackendOptionError, match="unknown option for backend 'litert': 'device'"):
        load_backend(path, "litert", device="GPU")


def test_dynamic_batch_resizes_the_input(tmp_path):
    path = tmp_path / "dyn.tflite"
    weights = tm.segmenter_tflite(path, dynamic_batch=True)
    x = images(3, seed=3)
    with load_backend(path, "litert") as b:
        assert b.input().shape == (None, 64, 64, 3)
        batch = b.infer(x)["mask"]
        one = [b.infer(x[i:i + 1])["mask"] for i in range(3)]  # back to batch 1: resized again
    assert batch.shape == (3, 64, 64, 1)
    assert float(np.abs(batch - np.concatenate(one)).max()) < 1e-6
    assert float(np.abs(batch - tm.segmenter_reference(x, weights)).max()) < 1e-5


def test_a_static_batch_is_checked_where_data_enters(segmenter):
    path, _ = segmenter
    with load_backend(path, "litert") as b:
        with pytest.raises(InputError, match=r"input 'input': expected shape \(1, 64, 64, 3\), got \(2, 64, 64, 3\)"):
            b.infer(images(2))
        with pytest.raises(InputError, match="expected dtype float32, got uint8"):
            b.infer(np.zeros((1, 64, 64, 3), np.uint8))


def test_quantized_inputs_and_outputs_are_real_values(tmp_path):
    path = tmp_path / "quant.tflite"
    tm.quantized_tflite(path)
    x = np.random.default_rng(4).uniform(-1.2, 1.2, (1, 8, 8, 3)).astype(np.float32)  # beyond the uint8 range too
    with load_backend(path, "litert") as b:
        assert b.input().dtype == np.float32 and b.outputs[0].dtype == np.float32
        y = b.infer(x)["scores"]
    expected = tm.quantized_reference(x)
    assert y.dtype == np.float32
    assert float(np.abs(y - expected).max()) < 1e-6
    assert float(np.abs(y - 1 / (1 + np.exp(-x))).max()) > 1e-3  # the quantization steps are really there


def test_mediapipe_custom_op_runs_with_xnnpack_only(tmp_path):
    path = tmp_path / "custom.tflite"
    weights = tm.segmenter_tflite(path, custom=True)
    x = images(1, seed=5)
    with load_backend(path, "litert") as b:
        assert float(np.abs(b.infer(x)["mask"] - tm.segmenter_reference(x, weights)).max()) < 1e-5
    with pytest.raises(ModelFormatError, match="unresolved custom op: Convolution2DTransposeBias.*xnnpack=True"):
        load_backend(path, "litert", xnnpack=False)


def test_auto_picks_litert_for_tflite_only(segmenter, tmp_path):
    path, _ = segmenter
    assert candidates("auto", path) == ["litert"]
    assert "litert" not in candidates("auto", tmp_path / "model.onnx")
    with pytest.raises(BackendError, match="use backend 'litert' for .tflite files"):
        candidates("ort-cpu", path)
    with pytest.raises(BackendError, match="backend 'litert' loads .tflite files, got model.onnx"):
        candidates("litert", tmp_path / "model.onnx")
    with load_backend(path) as b:
        assert b.name == "litert"


def test_a_file_that_is_not_tflite_is_refused_in_one_line(tmp_path):
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"\x08\x00\x00\x00ONNX" + bytes(64))
    with pytest.raises(ModelFormatError, match=r"expected a TFLite flatbuffer \(identifier TFL3 at byte 4\), found "
                                               r"b'ONNX'"):
        load_backend(fake)
    with pytest.raises(ModelFormatError, match="model file not found"):
        load_backend(tmp_path / "missing.tflite")


def test_a_damaged_flatbuffer_is_a_model_format_error(segmenter):
    from edgepix.runtime.description.tflite import read_tflite

    path, _ = segmenter
    data = bytearray(path.read_bytes())
    data[8:] = bytes([0xFF]) * (len(data) - 8)  # every offset after the header points nowhere
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="the TFLite flatbuffer is damaged"):
        read_tflite(path)


def test_without_ai_edge_litert_one_line_says_what_to_install(segmenter):
    path, _ = segmenter
    args = ["segment", str(path), "--source", "synthetic://", "--sink", "null://", "--max-frames", "1"]
    code = f"import sys; sys.modules['ai_edge_litert'] = None; from edgepix.cli import main; sys.exit(main({args!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'edgepix[litert]'" in lines[0], r.stderr


# ---- specs -------------------------------------------------------------------------------------------------


def test_spec_sidecar_then_segment_a_stream(segmenter, tmp_path):
    path, weights = segmenter
    r = run_edgepix("spec", str(path), "--set", "classes=background,person", "--out", str(tmp_path / "model.spec.json"))
    assert r.returncode == 0, r.stderr
    assert "read by the runtime beside the model" in r.stderr
    written = json.loads((tmp_path / "model.spec.json").read_text())
    assert written["class_names"] == ["background", "person"]
    assert (written["output_kind"], written["output_layout"], written["input_layout"]) == (
        "binary_probability", "NHWC", "NHWC")  # read from the graph: one channel after a sigmoid, channels last
    assert oct((tmp_path / "model.spec.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    out = tmp_path / "out.mp4"
    r = run_edgepix("segment", str(path), "--source", "synthetic://?size=96x64", "--sink", str(out),
                    "--max-frames", "10")
    assert r.returncode == 0, r.stderr
    assert "backend litert" in r.stdout + r.stderr
    cap = cv2.VideoCapture(str(out))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 10

    from edgepix.runtime import Segmenter
    from edgepix.runtime.tasks.imageops import Normalizer

    frame = cv2.cvtColor((images(1, seed=6)[0] * 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    with Segmenter.load(path) as seg:
        assert seg.spec.class_names == ("background", "person")
        mask = seg.segment(frame).class_map
    expected = tm.segmenter_reference(Normalizer(seg.spec, (64, 64))([frame])[0], weights)[0, ..., 0] > 0.5
    assert mask.shape == (64, 64) and int((mask.astype(bool) != expected).sum()) == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_metadata_labels_and_normalisation_become_the_spec(tmp_path):
    from edgepix.runtime.description.tflite import read_tflite

    path = tmp_path / "meta.tflite"
    tm.segmenter_tflite(path, metadata={"TFLITE_METADATA": tm.metadata_blob(mean=[127.5], std=[127.5])})
    tm.append_files(path, {"labels.txt": "background\nperson\n"})
    meta = read_tflite(path).metadata
    assert meta.class_names == ("background", "person") and meta.mean == (127.5,) and meta.std == (127.5,)

    r = run_edgepix("spec", str(path), "--json")
    assert r.returncode == 0, r.stderr
    spec = json.loads(r.stdout)
    assert spec["class_names"] == ["background", "person"]
    assert spec["scale"] == pytest.approx(1 / 255) and spec["mean"] == pytest.approx([0.5] * 3)
    assert spec["std"] == pytest.approx([0.5] * 3)
    x = images(1, seed=7)
    with load_backend(path) as b:  # metadata and the appended zip do not disturb the interpreter
        assert b.infer(x)["mask"].shape == (1, 64, 64, 1)


def test_unreadable_label_files_are_ignored_with_a_warning(tmp_path, caplog):
    from edgepix.runtime.description import tflite

    path = tmp_path / "meta.tflite"
    tm.segmenter_tflite(path, metadata={"TFLITE_METADATA": tm.metadata_blob(mean=[0.0], std=[255.0])})
    tm.append_files(path, {"labels.txt": "x\n" * (tflite.MAX_LABEL_FILE_BYTES // 2 + 1)})  # over the limit
    meta = tflite.read_tflite(path).metadata
    assert meta.class_names is None and meta.std == (255.0,)
    assert "cannot be read from the model" in caplog.text

    missing = tmp_path / "nolabels.tflite"
    tm.segmenter_tflite(missing, metadata={"TFLITE_METADATA": tm.metadata_blob(mean=[0.0], std=[1.0])})
    assert tflite.read_tflite(missing).metadata.class_names is None  # named, never packed


def test_a_quantized_image_input_is_fed_its_pixels(tmp_path):
    """For a uint8 input the spec's normalisation is the input's quantization: the integers the model receives are
    the frame's pixels, as such models expect."""
    from edgepix.runtime.backends.litert import _to_stored
    from edgepix.runtime.description.specfile import read_spec
    from edgepix.runtime.description.tflite import read_tflite
    from edgepix.runtime.tasks.imageops import Normalizer

    path = tmp_path / "quant.tflite"
    tm.quantized_tflite(path)
    spec = read_spec(path).spec.replace(channel_order="BGR")  # the pixels as given, no channel swap
    scale, zero_point = tm.QUANT_IN
    assert spec.mean == pytest.approx([zero_point / 255] * 3) and spec.std == pytest.approx([1 / scale / 255] * 3)
    pixels = np.random.default_rng(8).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    stored = _to_stored(Normalizer(spec, (8, 8))([pixels])[0], read_tflite(path).inputs[0])
    assert stored.dtype == np.uint8 and np.array_equal(stored[0], pixels)


def test_an_image_generator_runs_from_its_sidecar(tmp_path):
    from edgepix.runtime import ImageGenerator
    from edgepix.runtime.tasks.imageops import Normalizer

    path = tmp_path / "gen.tflite"
    W, b = tm.generator_tflite(path)
    r = run_edgepix("spec", str(path), "--task", "generation-image", "--out", str(tmp_path / "gen.spec.json"))
    assert r.returncode == 0, r.stderr
    frame = (np.random.default_rng(9).random((16, 16, 3)) * 255).astype(np.uint8)
    with ImageGenerator.load(path) as gen:
        assert (gen.spec.input_layout.value, gen.spec.output_range) == ("NHWC", (-1.0, 1.0))
        image = gen.generate(frame)
    y = tm.generator_reference(Normalizer(gen.spec, (16, 16))([frame])[0], W, b)[0]  # RGB in [-1, 1]
    expected = np.clip(np.round((y[..., ::-1] + 1) * 127.5), 0, 255)  # BGR 0..255, as the generator maps it
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert int(np.abs(image.astype(int) - expected).max()) <= 1


# ---- conversion to ONNX --------------------------------------------------------------------------------------


def _class_maps(model: Path, backend: str, frames: list[np.ndarray]) -> np.ndarray:
    from edgepix.runtime import Segmenter

    with Segmenter.load(model, backend) as seg:
        return np.stack([seg.segment(f).class_map for f in frames])


@needs_converter
def test_export_to_onnx_passes_the_gate_and_segments_as_litert_does(segmenter, tmp_path):
    from edgepix.runtime.data.synthetic import SceneConfig, make_scene
    from edgepix.runtime.description.spec import ModelSpec

    path, _ = segmenter
    assert run_edgepix("spec", str(path), "--set", "classes=background,person", "--out",
                       str(tmp_path / "model.spec.json")).returncode == 0
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(3):
        cv2.imwrite(str(data / f"p{i}.png"), make_scene(9_100 + i, SceneConfig(size=(80, 120)))[0])
    out = tmp_path / "model.onnx"
    r = run_edgepix("export", str(path), "--format", "onnx", "--out", str(out), "--data", str(data), "--verify-n", "4")
    assert r.returncode == 0, r.stderr
    assert "parity gate" in r.stdout and "PASS" in r.stdout and "LiteRT" in r.stdout
    spec = ModelSpec.from_onnx(out)
    sidecar = ModelSpec.load_json(tmp_path / "model.spec.json")
    assert spec == sidecar  # tf2onnx kept the names and the NHWC layout
    frames = [make_scene(9_200 + i, SceneConfig(size=(120, 160)))[0] for i in range(4)]
    onnx_maps, litert_maps = _class_maps(out, "ort-cpu", frames), _class_maps(path, "litert", frames)
    assert onnx_maps.shape == (4, 120, 160) and np.array_equal(onnx_maps, litert_maps)
    assert 0 < int(litert_maps.sum()) < litert_maps.size  # both classes present: the comparison means something


@needs_converter
def test_custom_op_model_is_rewritten_converted_and_gated(tmp_path):
    path = tmp_path / "custom.tflite"
    tm.segmenter_tflite(path, custom=True)
    out = tmp_path / "custom.onnx"
    r = run_edgepix("export", str(path), "--format", "onnx", "--out", str(out), "--verify-n", "4")
    assert r.returncode == 0, r.stderr
    assert "1 custom op(s) rewritten" in r.stdout and "PASS" in r.stdout
    frames = [cv2.cvtColor((images(1, seed=10 + i)[0] * 255).astype(np.uint8), cv2.COLOR_RGB2BGR) for i in range(3)]
    assert np.array_equal(_class_maps(out, "ort-cpu", frames), _class_maps(path, "litert", frames))


@needs_converter
def test_a_generator_converts_and_passes_the_image_gate(tmp_path):
    from edgepix.runtime.description.spec import ModelSpec

    path = tmp_path / "gen.tflite"
    tm.generator_tflite(path)
    assert run_edgepix("spec", str(path), "--task", "generation-image", "--out",
                       str(tmp_path / "gen.spec.json")).returncode == 0
    r = run_edgepix("export", str(path), "--format", "onnx", "--out", str(tmp_path / "gen.onnx"), "--verify-n", "3")
    assert r.returncode == 0, r.stderr
    psnr = next(line for line in r.stdout.splitlines() if "PSNR vs LiteRT" in line)
    assert float(psnr.split()[4]) >= 40.0, r.stdout
    assert ModelSpec.from_onnx(tmp_path / "gen.onnx").task.value == "generation-image"


@pytest.mark.parametrize("size, channels, kernel, stride, same", [
    ((32, 42), (16, 8), 4, 2, True), ((5, 6), (3, 2), 4, 2, True), ((7, 7), (4, 4), 3, 2, True),
    ((8, 8), (4, 2), 2, 2, False), ((5, 5), (3, 2), 3, 2, False)])
def test_rewrite_pass_keeps_what_the_custom_op_computes(tmp_path, size, channels, kernel, stride, same):
    from edgepix.export.tflite_ops import rewrite_custom_ops

    src, dst = tmp_path / "custom.tflite", tmp_path / "builtin.tflite"
    tm.transpose_conv_bias_tflite(src, size=size, channels=channels, kernel=kernel, stride=stride, same=same)
    assert rewrite_custom_ops(src, dst) == 1
    x = images(1, shape=(*size, channels[0]), seed=11)
    with load_backend(src, "litert") as custom, load_backend(dst, "litert", xnnpack=False) as builtin:
        expected, got = custom.infer(x)["y"], builtin.infer(x)["y"]  # MediaPipe's kernel vs TFLite's reference
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) <= 1e-5 * max(1.0, float(np.abs(expected).max()))


@needs_converter
def test_a_conversion_the_gate_fails_leaves_nothing_at_out(segmenter, tmp_path, monkeypatch):
    from edgepix.export import tflite as export_tflite_module
    from edgepix.export.gate import VerificationFailed

    path, _ = segmenter
    other = tmp_path / "other.tflite"
    tm.segmenter_tflite(other, seed=1)  # same graph, other weights: a conversion that went wrong
    real_convert = export_tflite_module.convert_tflite_to_onnx
    monkeypatch.setattr(export_tflite_module, "convert_tflite_to_onnx",
                        lambda src, dst, *, opset: real_convert(other, dst, opset=opset))
    out = tmp_path / "out" / "model.onnx"
    request = export_tflite_module.TfliteExportRequest(model=path, out=out, verify_n=4)
    with pytest.raises(VerificationFailed, match="max abs logit difference"):
        export_tflite_module.export_tflite(request)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_without_the_converter_export_says_what_to_install(segmenter):
    path, _ = segmenter
    out = path.with_suffix(".onnx")
    code = ("import sys; sys.modules['tf2onnx'] = None; from edgepix.cli import main; "
            f"sys.exit(main(['export', {str(path)!r}, '--format', 'onnx', '--out', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'edgepix[tflite-convert]'" in lines[0], r.stderr
    assert not out.exists()


@needs_converter
def test_tune_times_the_tflite_beside_the_onnx_and_auto_follows_a_litert_win(segmenter, tmp_path, monkeypatch):
    from edgepix.benchmarks.tune import tune
    from edgepix.runtime import Segmenter
    from edgepix.runtime.backends.profile import PROFILE_ENV, record

    path, _ = segmenter
    assert run_edgepix("spec", str(path), "--set", "classes=background,person", "--out",
                       str(tmp_path / "model.spec.json")).returncode == 0
    onnx_path = tmp_path / "model.onnx"  # beside model.tflite: exported from it, through the gate
    r = run_edgepix("export", str(path), "--format", "onnx", "--out", str(onnx_path), "--verify-n", "2")
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "profile.json"))
    report, _ = tune(onnx_path, threads=1, rounds=5, warmup=1)
    litert = next(p for p in report.peers if p.name == "edgepix litert")
    assert "model.tflite" in litert.runs and report.stats["edgepix litert"].p50 > 0
    assert litert.agreement.endswith("%") and float(litert.agreement[:-1]) >= 99.0, litert.agreement
    with Segmenter.load(onnx_path) as seg:  # nothing recorded: ONNX Runtime
        assert seg.backend.name == "ort-cpu"
    record(onnx_path, "litert", {}, runs=path)  # as if LiteRT had measured fastest
    with Segmenter.load(onnx_path) as seg:
        assert seg.backend.name == "litert" and seg.backend.path == path
    with Segmenter.load(onnx_path, backend="ort-cpu") as seg:  # a named backend is never replaced
        assert seg.backend.name == "ort-cpu"
    with open(path, "ab") as f:  # the measured file changed: its measurement no longer applies
        f.write(b"\0")
    with Segmenter.load(onnx_path) as seg:
        assert seg.backend.name == "ort-cpu"


def test_the_commands_help_names_the_litert_backend_and_tflite_files():
    """`segment --help` lists every registered backend, litert among them, and segment, generate and bench say they
    take a .tflite: a user holding a LiteRT model learns from the help that it runs as is."""
    from edgepix.cli import build_parser
    from edgepix.runtime.backends import backend_names

    verbs = build_parser()._subparsers._group_actions[0].choices

    def help_of(verb: str, dest: str) -> str:
        return next(a.help for a in verbs[verb]._actions if a.dest == dest)

    segment_backends = help_of("segment", "backend")
    assert all(name in segment_backends for name in backend_names()), segment_backends
    assert "litert" in help_of("generate", "backend")
    assert ".tflite" in help_of("segment", "model") and ".tflite" in help_of("bench", "models")
