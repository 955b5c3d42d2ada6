
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgepix.export.audit import Severity, audit_model
from edgepix.export.pipeline import ExportFormat, ExportRequest, VerificationFailed, run_export
from edgepix.export.precision import Int8Options, Int8Target
from edgepix.export.to_onnx import OnnxExportOptions
from edgepix.export.verify import Check, GateReport
from edgepix.runtime.core.errors import ExportError, ModelFormatError
from edgepix.runtime.description.spec import ModelSpec, OutputKind, Precision

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fmt", ["onnx", "onnx-fp16", "onnx-int8"])
@pytest.mark.parametrize("argmax", [False, True])
def test_every_format_passes_the_gate_and_loads(edgepix_cli, seg_checkpoint, tmp_path, fmt, argmax):
    out = tmp_path / f"m.{fmt}{'.argmax' if argmax else ''}.onnx"
    args = ["export", str(seg_checkpoint), "--format", fmt, "--out", str(out), "--verify-n", "8", "--calib-n", "16"]
    r = edgepix_cli(*args, *(["--argmax"] if argmax else []))
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and out.exists()
    spec = ModelSpec.from_onnx(out)
    assert spec.precision is Precision(fmt.replace("onnx-", "") if "-" in fmt else "fp32")
    assert spec.output_kind is (OutputKind.CLASS_MAP if argmax else OutputKind.LOGITS)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = session.run(None, {"images": np.zeros((1, 3, 64, 64), np.float32)})[0]
    assert y.shape == ((1, 64, 64) if argmax else (1, 6, 64, 64))
    assert y.dtype == (np.uint8 if argmax else np.float32)
    if fmt == "onnx-int8":
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert "U8S8" in spec.quantization
    info = edgepix_cli("info", str(out))
    assert info.returncode == 0 and f"precision = {spec.precision.value}" in info.stdout


def test_fp32_gate_numbers(seg_checkpoint, tmp_path):
    result = run_export(ExportRequest(seg_checkpoint, out=tmp_path / "m.onnx", verify_n=8))
    checks = {c.name: c.measured for c in result.report.checks}
    assert checks["max abs logit difference"] <= 1e-4
    assert checks["argmax agreement"] >= 0.999
    # The checkpoint learned something, so mIoU is meaningful, and ONNX Runtime reproduces it.
    assert result.report.info["mIoU PyTorch FP32"] > 0.25
    assert abs(result.report.info["mIoU artifact"] - result.report.info["mIoU PyTorch FP32"]) < 1e-3


def test_dynamic_size_export_holds_at_other_sizes(seg_checkpoint, tmp_path):
    out = tmp_path / "dyn.onnx"
    result = run_export(ExportRequest(seg_checkpoint, out=out, verify_n=4,
                                      onnx=OnnxExportOptions(dynamic_batch=True, dynamic_size=True)))
    assert result.spec.dynamic_size and result.report.passed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": np.zeros((2, 3, 96, 128), np.float32)})[0].shape == (2, 6, 96, 128)


def test_tensorrt_target_is_symmetric_s8s8(seg_checkpoint, tmp_path):
    out = tmp_path / "trt.int8.onnx"
    result = run_export(ExportRequest(seg_checkpoint, format=ExportFormat.ONNX_INT8, out=out, verify_n=8,
                                      calib_n=8, int8=Int8Options(target=Int8Target.TENSORRT)))
    assert "S8S8" in result.spec.quantization
    graph = onnx.load(str(out)).graph
    zero_points = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    q_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes
    for n in q_nodes:
        zp = zero_points[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name


def test_verify_rejects_a_perturbed_model(edgepix_cli, seg_checkpoint, tmp_path):
    good = tmp_path / "good.onnx"
    run_export(ExportRequest(seg_checkpoint, out=good, verify_n=4))
    r = edgepix_cli("verify", str(good), str(seg_checkpoint), "--verify-n", "4")
    assert r.returncode == 0 and "PASS" in r.stdout
    model = onnx.load(str(good))
    # Scale the classifier's weights by 0.1%: a drift far below what any eye would notice in the output.
    last_conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    init = next(i for i in model.graph.initializer if i.name == last_conv.input[1])
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * np.float32(1.001), init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    r = edgepix_cli("verify", str(bad), str(seg_checkpoint), "--verify-n", "4")
    assert r.returncode == 1
    assert "FAIL" in r.stdout and "max abs logit difference" in r.stdout


def test_a_failing_artifact_never_reaches_the_output_path(seg_checkpoint, tmp_path, monkeypatch):
    import edgepix.export.pipeline as pipeline

    failing = GateReport("x", "fp32", [Check("argmax agreement", 0.5, 0.999, True)])
    monkeypatch.setattr(pipeline, "verify", lambda *a, **k: failing)
    out = tmp_path / "never.onnx"
    with pytest.raises(VerificationFailed, match="argmax agreement"):
        run_export(ExportRequest(seg_checkpoint, out=out, verify_n=2))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_interrupted_export_leaves_nothing(seg_checkpoint, tmp_path, monkeypatch):
    import edgepix.export.pipeline as pipeline

    def interrupted(src, dst):
        with open(dst, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.shutil, "copyfile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_export(ExportRequest(seg_checkpoint, out=tmp_path / "m.onnx", verify=False))
    assert list(tmp_path.iterdir()) == []


# ---- bad input -----------------------------------------------------------------------------------------


def test_missing_checkpoint(edgepix_cli, tmp_path):
    r = edgepix_cli("export", str(tmp_path / "none.pt"))
    assert r.returncode == 1 and "checkpoint not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_plain_state_dict_says_how_to_wrap(edgepix_cli, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), path)
    r = edgepix_cli("export", str(path))
    assert r.returncode == 1 and "plain state_dict" in r.stderr and "wrap_state_dict" in r.stderr


class Arbitrary:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_pickle_refused_by_weights_only_is_never_loaded_unsafely(tmp_path):
    from edgepix.train.checkpoint import load_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"arch": "fastscnn", "payload": Arbitrary()}, path)
    with pytest.raises(ModelFormatError, match="weights_only=True"):
        load_checkpoint(path)


def test_unsupported_opset(edgepix_cli, seg_checkpoint, tmp_path):
    r = edgepix_cli("export", str(seg_checkpoint), "--opset", "7", "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 1 and "--opset 7 is not supported" in r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_empty_calibration_folder(edgepix_cli, seg_checkpoint, tmp_path):
    (tmp_path / "calib").mkdir()
    r = edgepix_cli("export", str(seg_checkpoint), "--format", "onnx-int8", "--calib", str(tmp_path / "calib"),
                    "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 1 and "no images" in r.stderr and not (tmp_path / "m.onnx").exists()


def test_unwritable_output_path(edgepix_cli, seg_checkpoint, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    r = edgepix_cli("export", str(seg_checkpoint), "--out", str(blocker / "m.onnx"))
    assert r.returncode == 1 and "is a file, not a folder" in r.stderr


def test_bad_imgsz(seg_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="multiple of 32"):
        run_export(ExportRequest(seg_checkpoint, out=tmp_path / "m.onnx", onnx=OnnxExportOptions(imgsz=(100, 64))))


# ---- audit ---------------------------------------------------------------------------------------------


class Hazards(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(3))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x):
        y = self.up(self.head(x))
        if y.mean() > 0:  # data-dependent branch
            y = y * 2
        return y


def test_audit_names_module_and_reason():
    findings = audit_model(Hazards().eval(), torch.randn(1, 3, 32, 32))
    by_construct = {f.construct.split("(")[0]: f for f in findings}
    pool = by_construct["adaptive_avg_pool2d"]
    assert pool.module == "head.1" and pool.severity is Severity.ERROR and "32x32 -> 3x3" in pool.construct
    assert by_construct["interpolate"].module == "up" and by_construct["interpolate"].severity is Severity.WARNING
    assert by_construct["tensor used as a Python bool"].module == ""


def test_registered_models_pass_the_audit_at_dynamic_size():
    from edgepix.train.registry import create_model, list_models

    for name in list_models(task="segmentation"):
        model = create_model(name, num_classes=4).eval()
        errors = [f for f in audit_model(model, torch.randn(1, 3, 64, 96), dynamic_size=True)
                  if f.severity is Severity.ERROR]
        assert errors == [], (name, errors)


def test_final_resize_is_made_planar_and_computes_the_same():
    """Only the graph's last bilinear upsampling switches to pytorch_half_pixel (ONNX Runtime then keeps it out of
    its blocked layout); outputs are unchanged, inner Resizes and length-1 outputs keep half_pixel."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgepix.export.to_onnx import keep_final_resize_planar

    def graph(out_hw):
        rng = np.random.default_rng(0)
        w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
        w2 = numpy_helper.from_array(rng.standard_normal((6, 8, 1, 1)).astype(np.float32), "w2")
        inner = numpy_helper.from_array(np.array([1, 8, 16, 16], np.int64), "inner_size")
        final = numpy_helper.from_array(np.array([1, 6, *out_hw], np.int64), "final_size")
        nodes = [
            helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
            helper.make_node("Resize", ["c1", "", "", "inner_size"], ["r1"], mode="linear",
                             coordinate_transformation_mode="half_pixel", name="inner"),
            helper.make_node("Conv", ["r1", "w2"], ["logits"], name="conv2"),
            helper.make_node("Resize", ["logits", "", "", "final_size"], ["y"], mode="linear",
                             coordinate_transformation_mode="half_pixel", name="final"),
        ]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, *out_hw])],
                              initializer=[w1, w2, inner, final])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return onnx.shape_inference.infer_shapes(m)

    def modes(m):
        return {n.name: helper.get_attribute_value(next(a for a in n.attribute
                                                         if a.name == "coordinate_transformation_mode"))
                for n in m.graph.node if n.op_type == "Resize"}

    def run(m, x):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    original = graph((64, 48))
    changed = graph((64, 48))
    assert keep_final_resize_planar(changed) == ["final"]
    assert modes(changed) == {"inner": b"half_pixel", "final": b"pytorch_half_pixel"}
    np.testing.assert_allclose(run(changed, x), run(original, x), rtol=1e-6, atol=1e-6)
    one_row = graph((1, 48))  # the two modes differ for an output length of 1: left alone
    assert keep_final_resize_planar(one_row) == [] and modes(one_row)["final"] == b"half_pixel"


def test_one_comparator_checks_any_backend_against_the_reference_onnx(seg_checkpoint, seg_onnx, tmp_path):
    """The engine check's code path, run on CPU backends: an FP16 export on ort-cpu and the FP32 export on OpenCV
    pass against the FP32 ONNX on ort-cpu; an untrained model with the same spec fails."""
    from edgepix.export.compare import compare_backends
    from edgepix.export.pipeline import ExportFormat
    from edgepix.train.checkpoint import load_checkpoint, save_checkpoint, wrap_state_dict
    from edgepix.train.registry import create_model

    fp16 = run_export(ExportRequest(seg_checkpoint, format=ExportFormat.ONNX_FP16, out=tmp_path / "fp16.onnx",
                                    verify=False)).path
    report = compare_backends(fp16, "ort-cpu", seg_onnx, n=6)
    assert report.passed, report.format()
    assert [c.name for c in report.checks] == ["argmax agreement"] and report.checks[0].threshold == 0.995
    assert report.format().startswith("backend check for ")
    assert compare_backends(seg_onnx, "opencv", seg_onnx, n=4).passed

    spec = load_checkpoint(seg_checkpoint)["spec"]
    torch.manual_seed(1)
    untrained = tmp_path / "untrained.pt"
    save_checkpoint(untrained, wrap_state_dict(create_model("fastscnn", num_classes=spec.num_classes).state_dict(),
                                               arch="fastscnn", arch_kwargs={"num_classes": spec.num_classes},
                                               spec=spec))
    wrong = run_export(ExportRequest(untrained, out=tmp_path / "wrong.onnx", verify=False)).path
    failing = compare_backends(wrong, "ort-cpu", seg_onnx, n=4)
    assert not failing.passed and failing.checks[0].measured < 0.9
