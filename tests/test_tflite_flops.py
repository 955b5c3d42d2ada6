"""FLOPs of a .tflite (benchmarks.flops, the counter ONNX graphs use) and `edgepix info` / `edgepix bench` on one.

One small network (a strided convolution, a depthwise one, a grouped 1x1, a transposed convolution, a linear layer
and a batched matrix product) is exported to ONNX by torch.onnx.export and to .tflite by litert-torch, float and
int8, in one child process (the converter's imports stay out of the test process); the three give the same count,
op by op. The rest runs on the tiny models tests/tflite_models.py writes with the schema inside ai-edge-litert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tflite_models as tm
from conftest import REPO, run_edgepix

from edgepix.runtime.core.errors import ModelFormatError

pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT models need pip install 'edgepix[litert]'")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_converter = pytest.mark.skipif(not (_installed("litert_torch") and _installed("onnx")),
                                     reason="the exports need litert-torch and onnx: pip install "
                                            "'edgepix[tflite-export,train]'")

NET = '''
import sys, torch, torch.nn as nn
import litert_torch
from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
from litert_torch.quantize.quant_config import QuantConfig
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.up(self.grouped(torch.relu(self.depthwise(h))))
        f = self.fc(h.permute(0, 2, 3, 1))  # [1, 16, 16, 6]
        return f, f.transpose(-1, -2) @ f  # [1, 16, 6, 6]: 16 multiply-adds per element

out = sys.argv[1]
torch.manual_seed(0)
net, x = Net().eval(), torch.randn(1, 3, 16, 16)
torch.onnx.export(net, (x,), f"{out}/net.onnx", dynamo=False)
litert_torch.convert(net, (x,)).export(f"{out}/net.tflite")
quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
q = prepare_pt2e(torch.export.export(net, (x,)).module(), quantizer)
q(x)
q = convert_pt2e(q, fold_quantize=False)
litert_torch.convert(q, (x,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(f"{out}/net_int8.tflite")
'''

# Counted by hand, NCHW 1x3x16x16 in (multiply-add = 2):
CONV = 2 * (8 * 8 * 8) * (3 * 3 * 3) + 2 * (8 * 8 * 8) * (3 * 3) + 2 * (8 * 8 * 8) * 4  # strided, depthwise, grouped
CONV_TRANSPOSE = 2 * (8 * 8 * 8) * (4 * 2 * 2)  # every input element scatters into Cout x 2 x 2 outputs
MATMUL = 2 * (16 * 16 * 6) * 4 + 2 * (16 * 6 * 6) * 16  # the linear layer, the batched product
NET_FLOPS = {"Conv": CONV, "ConvTranspose": CONV_TRANSPOSE, "MatMul": MATMUL}
# tm.segmenter_tflite: CONV_2D 3x3/2 to [1,32,32,8], TRANSPOSE_CONV 2x2/2 of it to [1,64,64,4], CONV_2D 1x1 to 1
SEGMENTER_FLOPS = {"Conv": 2 * (32 * 32 * 8) * 27 + 2 * (64 * 64) * 4, "ConvTranspose": 2 * (32 * 32 * 8) * 4 * 2 * 2}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flops")
    r = subprocess.run([sys.executable, "-c", NET, str(out)], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _op_types(path: Path) -> dict[str, set[str]]:
    """{builtin op name: the types of its inputs} of the main subgraph."""
    from ai_edge_litert import schema_py_generated as fb

    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    model = fb.Model.GetRootAs(path.read_bytes(), 0)
    graph, found = model.Subgraphs(0), {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        found.setdefault(names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())], set()).update(
            types[graph.Tensors(op.Inputs(j)).Type()] for j in range(op.InputsLength()) if op.Inputs(j) >= 0)
    return found


# ---- one counter, two formats ----------------------------------------------------------------------------------


@needs_converter
def test_the_onnx_and_tflite_exports_of_one_net_count_the_same_flops(exports):
    from edgepix.benchmarks.flops import count_flops, flops_per_image, model_flops
    from edgepix.runtime.description.specfile import read_spec

    ops = _op_types(exports / "net.tflite")
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL"} <= set(ops)
    onnx_count = count_flops(exports / "net.onnx", (1, 3, 16, 16))
    tflite_count = count_flops(exports / "net.tflite", (1, 3, 16, 16))
    assert onnx_count.by_op == tflite_count.by_op == NET_FLOPS
    assert onnx_count.total == tflite_count.total == sum(NET_FLOPS.values()) == 88_064
    # the callers' entry points take either file
    assert flops_per_image(exports / "net.tflite", (3, 16, 16)) == 88_064
    assert model_flops(exports / "net.tflite", read_spec(exports / "net.tflite").spec) == 88_064


@needs_converter
def test_an_int8_tflite_counts_the_same_ops(exports):
    from edgepix.benchmarks.flops import count_flops

    ops = _op_types(exports / "net_int8.tflite")
    assert ops["CONV_2D"] >= {"INT8"} and ops["DEPTHWISE_CONV_2D"] >= {"INT8"} and "FLOAT32" not in ops["CONV_2D"]
    assert count_flops(exports / "net_int8.tflite", (1, 3, 16, 16)).by_op == NET_FLOPS


def test_op_codes_options_and_mediapipes_transposed_convolution(tmp_path):
    """The op is the larger of builtin_code and deprecated_builtin_code (models older than the 127-op schema hold
    it in the deprecated field; newer ops have 127 there); BATCH_MATMUL's adj_x picks the contracted dimension;
    MediaPipe's custom Convolution2DTransposeBias counts as TRANSPOSE_CONV does."""
    from edgepix.benchmarks.flops import count_flops, count_tflite_flops

    builtin, custom = tmp_path / "builtin.tflite", tmp_path / "custom.tflite"
    tm.segmenter_tflite(builtin)
    tm.segmenter_tflite(custom, custom=True)
    assert count_tflite_flops(builtin).by_op == count_tflite_flops(custom).by_op == SEGMENTER_FLOPS
    assert count_flops(builtin, (1, 64, 64, 3)).total == sum(SEGMENTER_FLOPS.values())
    assert count_flops(builtin, (4, 64, 64, 3)).total == 4 * sum(SEGMENTER_FLOPS.values())  # batch scales
    dynamic_batch = tmp_path / "dynamic_batch.tflite"  # -1 in the batch's signature, 1 in the stored shapes
    tm.segmenter_tflite(dynamic_batch, dynamic_batch=True)
    assert count_flops(dynamic_batch, (3, 64, 64, 3)).total == 3 * sum(SEGMENTER_FLOPS.values())

    fb = tm._schema()
    m = tm.TfliteWriter()
    x = m.tensor("x", [2, 5, 3])  # adj_x: x is [batch, K=5, M=3]
    y = m.tensor("y", [2, 5, 4])
    xy = m.tensor("xy", [2, 3, 4])
    options = fb.BatchMatMulOptionsT()
    options.adjX = True
    m.op(fb.BuiltinOperator.BATCH_MATMUL, [x, y], [xy], fb.BuiltinOptions.BatchMatMulOptions, options)
    v = m.tensor("v", [1, 4, 6, 6, 2])
    w3 = m.tensor("w3", [3, 3, 3, 2, 5], data=np.zeros((3, 3, 3, 2, 5), np.float32))  # [KD, KH, KW, Cin, Cout]
    v3 = m.tensor("v3", [1, 2, 4, 4, 5])
    m.op(fb.BuiltinOperator.CONV_3D, [v, w3], [v3])  # code 132: deprecated_builtin_code holds 127
    img = m.tensor("img", [1, 8, 8, 3])
    w = m.tensor("w", [4, 3, 3, 3], data=np.zeros((4, 3, 3, 3), np.float32))
    out = m.tensor("out", [1, 6, 6, 4])
    m.op(fb.BuiltinOperator.CONV_2D, [img, w], [out])
    m.opcodes[-1].builtinCode = 0  # as an old converter wrote it: 0 (ADD) there, the op in the deprecated field
    assert [(oc.builtinCode, oc.deprecatedBuiltinCode) for oc in m.opcodes] == [(126, 126), (132, 127), (0, 3)]
    path = tmp_path / "ops.tflite"
    path.write_bytes(m.finish([x, y, v, img], [xy, v3, out]))
    assert count_tflite_flops(path).by_op == {"MatMul": 2 * (2 * 3 * 4) * 5,
                                              "Conv": 2 * (2 * 4 * 4 * 5) * 27 * 2 + 2 * (6 * 6 * 4) * 27}


def test_shapes_the_flatbuffer_does_not_hold_are_refused(tmp_path):
    from edgepix.benchmarks.flops import FlopsUnavailable, count_flops, count_tflite_flops

    path = tmp_path / "seg.tflite"
    tm.segmenter_tflite(path)
    with pytest.raises(FlopsUnavailable, match=r"its input is fixed at 1x64x64x3, not 1x32x32x3"):
        count_flops(path, (1, 32, 32, 3))
    fb = tm._schema()
    m = tm.TfliteWriter()
    x, y = m.tensor("x", [1, 1, 1, 3], signature=[1, -1, -1, 3]), m.tensor("y", [1, 1, 1, 3])
    m.op(fb.BuiltinOperator.LOGISTIC, [x], [y])
    dynamic = tmp_path / "dynamic.tflite"
    dynamic.write_bytes(m.finish([x], [y]))
    with pytest.raises(FlopsUnavailable, match=r"its input's size is dynamic \(1x\?x\?x3\)"):
        count_tflite_flops(dynamic)


def test_a_damaged_flatbuffer_is_one_line(tmp_path):
    from edgepix.benchmarks.flops import count_tflite_flops

    path = tmp_path / "model.tflite"
    tm.segmenter_tflite(path)
    whole = path.read_bytes()
    data = bytearray(whole)
    data[8:] = bytes([0xFF]) * (len(data) - 8)  # every offset after the header points nowhere
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="the TFLite flatbuffer is damaged"):
        count_tflite_flops(path)
    r = run_edgepix("info", str(path))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert len(lines) == 1 and "the TFLite flatbuffer is damaged" in lines[0], r.stderr
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(whole[:40])  # a copy cut short
    r = run_edgepix("info", str(truncated), "--json")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "damaged" in lines[0], r.stderr


# ---- edgepix info and bench --------------------------------------------------------------------------------


@needs_converter
def test_info_prints_the_flops_tensors_and_inferred_spec(exports):
    r = run_edgepix("info", str(exports / "net.tflite"))
    assert r.returncode == 0, r.stderr
    assert "tflite)" in r.stdout.splitlines()[0]
    assert "(88,064 FLOPs; input sample 3x16x16; multiply-add = 2)" in r.stdout, r.stdout
    assert "float32 [1, 3, 16, 16] NCHW" in r.stdout and "spec from   none stored; inferred" in r.stdout
    info = json.loads(run_edgepix("info", str(exports / "net.tflite"), "--json").stdout)
    assert info["format"] == "tflite" and info["flops_per_image"] == 88_064 and info["flops_input"] == [3, 16, 16]
    assert info["input_tensors"][0]["shape"] == [1, 3, 16, 16] and info["input_tensors"][0]["layout"] == "NCHW"
    assert info["spec"]["input_layout"] == "NCHW" and info["spec"]["task"] == "segmentation"


def test_info_reads_quantization_metadata_and_the_stored_spec(tmp_path):
    quant = tmp_path / "quant.tflite"
    tm.quantized_tflite(quant)
    info = json.loads(run_edgepix("info", str(quant), "--json").stdout)
    scale, zero_point = tm.QUANT_IN
    assert info["input_tensors"] == [{"name": "pixels", "dtype": "uint8", "shape": [1, 8, 8, 3], "layout": "NHWC",
                                      "scale": pytest.approx(scale), "zero_point": zero_point}]
    assert info["output_tensors"][0]["dtype"] == "int8" and info["output_tensors"][0]["zero_point"] == -128

    meta = tmp_path / "meta.tflite"
    tm.segmenter_tflite(meta, metadata={"TFLITE_METADATA": tm.metadata_blob(mean=[127.5], std=[127.5])})
    tm.append_files(meta, {"labels.txt": "background\nperson\n"})
    r = run_edgepix("info", str(meta))
    assert r.returncode == 0, r.stderr
    assert "metadata    labels = 2 classes: background, person" in r.stdout, r.stdout
    assert "metadata    normalization mean = [127.5]" in r.stdout
    assert "class_names = ['background', 'person']" in r.stdout  # the inferred spec takes them
    assert "(737,280 FLOPs; input sample 64x64x3" in r.stdout

    assert run_edgepix("spec", str(meta), "--set", "classes=bg,fg", "--out", str(tmp_path / "meta.spec.json")
                       ).returncode == 0
    info = json.loads(run_edgepix("info", str(meta), "--json").stdout)
    assert info["spec_source"] == "meta.spec.json beside the model" and info["spec"]["class_names"] == ["bg", "fg"]


def test_bench_fills_the_gflop_column_of_a_tflite(tmp_path):
    from edgepix.benchmarks.harness import BenchConfig, bench_model

    path = tmp_path / "seg.tflite"
    tm.segmenter_tflite(path)  # no spec: measured as the runtime would run it
    run = bench_model(path, "litert", BenchConfig(warmup=1, runs=2, accuracy_n=0), [])
    assert [row.gflops_per_image for row in run.rows] == [pytest.approx(sum(SEGMENTER_FLOPS.values()) / 1e9)]
    assert run.rows[0].achieved_gflops == pytest.approx(run.rows[0].gflops_per_image * run.rows[0].throughput)
    assert any("no edgepix spec; measured as the runtime would run it" in note for note in run.skipped)
