"""Tiny .tflite models for the LiteRT tests, written without TensorFlow: the flatbuffers object API of the TFLite
schema that ships inside ai-edge-litert (`ai_edge_litert.schema_py_generated`), and numpy references for them.

    segmenter_tflite(path)                 x[N,64,64,3] -> CONV_2D 3x3/2 SAME RELU -> TRANSPOSE_CONV 2x2/2 VALID
                                           -> ADD bias RELU -> CONV_2D 1x1 -> LOGISTIC -> mask[N,64,64,1]
    segmenter_tflite(path, custom=True)    the transposed convolution as MediaPipe's custom op
                                           Convolution2DTransposeBias (bias inside), as MediaPipe's models have it
    quantized_tflite(path)                 uint8 input -> DEQUANTIZE -> LOGISTIC -> QUANTIZE -> int8 output
    generator_tflite(path)                 x[1,16,16,3] -> CONV_2D 3x3 SAME -> TANH -> image[1,16,16,3]
    metadata_blob(...) / append_files(...) TFLite metadata (normalisation, a label file) and the packed files
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np

fb = None  # ai_edge_litert.schema_py_generated, imported when a model is made (the tests skip without it)


def _schema():
    global fb
    if fb is None:
        from ai_edge_litert import schema_py_generated

        fb = schema_py_generated
    return fb


class TfliteWriter:
    """Tensors, buffers, operator codes and operators of one subgraph, packed into a .tflite flatbuffer."""

    def __init__(self) -> None:
        _schema()
        self.buffers = [fb.BufferT()]  # buffer 0 is the empty sentinel every tensor without data points at
        self.tensors: list = []
        self.opcodes: list = []
        self.operators: list = []

    def tensor(self, name: str, shape, dtype: int | None = None, data: np.ndarray | None = None, *,
               signature=None, quant: tuple[float, int] | None = None) -> int:
        t = fb.TensorT()
        t.name, t.shape = name, list(shape)
        t.type = fb.TensorType.FLOAT32 if dtype is None else dtype
        t.buffer = 0
        if signature is not None:
            t.shapeSignature = list(signature)
        if data is not None:
            b = fb.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        if quant is not None:
            q = fb.QuantizationParametersT()
            q.scale, q.zeroPoint = [quant[0]], [quant[1]]
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, code: int, inputs, outputs, options_type: int = 0, options=None, *, version: int = 1,
           custom_code: str | None = None, custom_options: bytes | None = None) -> None:
        index = next((i for i, oc in enumerate(self.opcodes)
                      if oc.builtinCode == code and oc.customCode == custom_code), None)
        if index is None:
            oc = fb.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode = code, min(code, 127)
            oc.customCode, oc.version = custom_code, version
            self.opcodes.append(oc)
            index = len(self.opcodes) - 1
        o = fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = index, list(inputs), list(outputs)
        o.builtinOptionsType, o.builtinOptions = options_type, options
        if custom_options is not None:
            o.customOptions = list(custom_options)
        self.operators.append(o)

    def finish(self, inputs, outputs, *, metadata: dict[str, bytes] | None = None) -> bytes:
        import flatbuffers

        sg = fb.SubGraphT()
        sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = self.tensors, list(inputs), list(outputs), \
            self.operators, "main"
        m = fb.ModelT()
        m.version, m.operatorCodes, m.subgraphs, m.buffers = 3, self.opcodes, [sg], self.buffers
        m.description = "edgepix test model"
        if metadata:
            m.metadata = []
            for name, blob in metadata.items():
                b = fb.BufferT()
                b.data = np.frombuffer(blob, np.uint8)
                self.buffers.append(b)
                entry = fb.MetadataT()
                entry.name, entry.buffer = name, len(self.buffers) - 1
                m.metadata.append(entry)
        builder = flatbuffers.Builder(1024)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _conv_options(padding: int, stride: int, activation: int):
    c = fb.Conv2DOptionsT()
    c.padding, c.strideW, c.strideH, c.fusedActivationFunction = padding, stride, stride, activation
    c.dilationWFactor = c.dilationHFactor = 1
    return c


def segmenter_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W1": rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32),  # OHWI
            "b1": rng.normal(0, 0.1, (8,)).astype(np.float32),
            "W2": rng.normal(0, 0.5, (4, 2, 2, 8)).astype(np.float32),  # OHWI, transposed convolution
            "b2": rng.normal(0, 0.1, (4,)).astype(np.float32),
            "W3": rng.normal(0, 0.5, (1, 1, 1, 4)).astype(np.float32),
            "b3": rng.normal(0, 0.1, (1,)).astype(np.float32)}


def segmenter_tflite(path: str | Path, *, custom: bool = False, seed: int = 0, dynamic_batch: bool = False,
                     metadata: dict[str, bytes] | None = None) -> dict[str, np.ndarray]:
    """A one-channel segmenter (NHWC [1,64,64,3] in, sigmoid [1,64,64,1] out); returns its weights."""
    w = segmenter_weights(seed)
    m = TfliteWriter()
    BO, relu = fb.BuiltinOperator, fb.ActivationFunctionType.RELU

    def activation(name, shape):  # a batch of -1 in the signature where the batch is dynamic
        return m.tensor(name, shape, signature=[-1, *shape[1:]] if dynamic_batch else None)

    x = activation("input", [1, 64, 64, 3])
    h1 = activation("h1", [1, 32, 32, 8])
    m.op(BO.CONV_2D, [x, m.tensor("w1", w["W1"].shape, data=w["W1"]), m.tensor("b1", [8], data=w["b1"])], [h1],
         fb.BuiltinOptions.Conv2DOptions, _conv_options(fb.Padding.SAME, 2, relu))
    w2 = m.tensor("w2", w["W2"].shape, data=w["W2"])
    h2, h3 = activation("h2", [1, 64, 64, 4]), activation("h3", [1, 64, 64, 4])
    add = fb.AddOptionsT()
    add.fusedActivationFunction = relu
    if custom:  # inputs (input, weights OHWI, bias); options: int32 padding (2 = VALID), stride_w, stride_h
        m.op(BO.CUSTOM, [h1, w2, m.tensor("b2", [4], data=w["b2"])], [h2],
             custom_code="Convolution2DTransposeBias", custom_options=struct.pack("<iii", 2, 2, 2))
        m.op(BO.ADD, [h2, m.tensor("zero", [4], data=np.zeros(4, np.float32))], [h3],
             fb.BuiltinOptions.AddOptions, add)
    else:  # inputs (output_shape, weights OHWI, input); the bias is a separate ADD
        tc = fb.TransposeConvOptionsT()
        tc.padding, tc.strideW, tc.strideH = fb.Padding.VALID, 2, 2
        out_shape = m.tensor("out_shape", [4], fb.TensorType.INT32, np.array([1, 64, 64, 4], np.int32))
        m.op(BO.TRANSPOSE_CONV, [out_shape, w2, h1], [h2], fb.BuiltinOptions.TransposeConvOptions, tc)
        m.op(BO.ADD, [h2, m.tensor("b2", [4], data=w["b2"])], [h3], fb.BuiltinOptions.AddOptions, add)
    h4 = activation("h4", [1, 64, 64, 1])
    m.op(BO.CONV_2D, [h3, m.tensor("w3", [1, 1, 1, 4], data=w["W3"]), m.tensor("b3", [1], data=w["b3"])], [h4],
         fb.BuiltinOptions.Conv2DOptions, _conv_options(fb.Padding.VALID, 1, fb.ActivationFunctionType.NONE))
    y = activation("mask", [1, 64, 64, 1])
    m.op(BO.LOGISTIC, [h4], [y])
    Path(path).write_bytes(m.finish([x], [y], metadata=metadata))
    return w


def conv2d_nhwc(x: np.ndarray, W: np.ndarray, b: np.ndarray, stride: int, pad: tuple[int, int, int, int]):
    """Convolution, NHWC input, OHWI weights, pad = (top, left, bottom, right)."""
    x = np.pad(x, ((0, 0), (pad[0], pad[2]), (pad[1], pad[3]), (0, 0)))
    _, kh, kw, _ = W.shape
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, W.shape[0]))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :] @ W[:, i, j, :].T
    return out + b


def segmenter_reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """What segmenter_tflite computes, in float64."""
    x = x.astype(np.float64)
    # TF's SAME for 64 in, kernel 3, stride 2: one pixel of padding, at the bottom and the right
    h = np.maximum(conv2d_nhwc(x, w["W1"], w["b1"], 2, (0, 0, 1, 1)), 0)
    up = np.zeros((h.shape[0], 64, 64, 4))
    for i in range(2):  # kernel == stride: the transposed convolution's taps never overlap
        for j in range(2):
            up[:, i::2, j::2, :] = h @ w["W2"][:, i, j, :].T
    h = np.maximum(up + w["b2"], 0)
    return 1 / (1 + np.exp(-conv2d_nhwc(h, w["W3"], w["b3"], 1, (0, 0, 0, 0))))


# A quantized model's tensors: uint8 input (scale, zero point) and int8 output (sigmoid in [0, 1) on 256 steps).
QUANT_IN = (2 / 255, 128)
QUANT_OUT = (1 / 256, -128)


def quantized_tflite(path: str | Path) -> None:
    """uint8 [1,8,8,3] -> DEQUANTIZE -> LOGISTIC -> QUANTIZE -> int8 [1,8,8,3]."""
    m = TfliteWriter()
    BO, T = fb.BuiltinOperator, fb.TensorType
    x = m.tensor("pixels", [1, 8, 8, 3], T.UINT8, quant=QUANT_IN)
    xf, yf = m.tensor("xf", [1, 8, 8, 3]), m.tensor("yf", [1, 8, 8, 3])
    y = m.tensor("scores", [1, 8, 8, 3], T.INT8, quant=QUANT_OUT)
    m.op(BO.DEQUANTIZE, [x], [xf])
    m.op(BO.LOGISTIC, [xf], [yf])
    m.op(BO.QUANTIZE, [yf], [y])
    Path(path).write_bytes(m.finish([x], [y]))


def quantized_reference(x: np.ndarray) -> np.ndarray:
    """The real-valued output of quantized_tflite for the real-valued input x, quantized as TFLite does."""
    (si, zi), (so, zo) = QUANT_IN, QUANT_OUT
    q = np.clip(np.round(x / si) + zi, 0, 255)
    y = 1 / (1 + np.exp(-(q - zi) * si))
    return (np.clip(np.round(y / so) + zo, -128, 127) - zo) * so


def generator_weights(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.3, (3, 3, 3, 3)).astype(np.float32), rng.normal(0, 0.1, (3,)).astype(np.float32)


def generator_tflite(path: str | Path, *, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """An image-to-image generator: [1,16,16,3] in [-1, 1] -> CONV_2D 3x3 SAME -> TANH -> [1,16,16,3]."""
    W, b = generator_weights(seed)
    m = TfliteWriter()
    x, h, y = m.tensor("image", [1, 16, 16, 3]), m.tensor("h", [1, 16, 16, 3]), m.tensor("generated", [1, 16, 16, 3])
    m.op(fb.BuiltinOperator.CONV_2D, [x, m.tensor("w", W.shape, data=W), m.tensor("b", [3], data=b)], [h],
         fb.BuiltinOptions.Conv2DOptions, _conv_options(fb.Padding.SAME, 1, fb.ActivationFunctionType.NONE))
    m.op(fb.BuiltinOperator.TANH, [h], [y])
    Path(path).write_bytes(m.finish([x], [y]))
    return W, b


def generator_reference(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.tanh(conv2d_nhwc(x.astype(np.float64), W, b, 1, (1, 1, 1, 1)))


# ---- TFLite metadata ---------------------------------------------------------------------------------------


def metadata_blob(*, mean: list[float], std: list[float], label_file: str | None = "labels.txt",
                  input_name: str = "image", output_name: str = "mask") -> bytes:
    """A TFLITE_METADATA flatbuffer (the metadata schema vendored in edgepix.runtime.description): the input's
    NormalizationOptions and the output's label file, as the TFLite Support metadata writers make them."""
    import flatbuffers

    from edgepix.runtime.description import tflite_metadata_schema as md

    norm = md.NormalizationOptionsT()
    norm.mean, norm.std = list(mean), list(std)
    unit = md.ProcessUnitT()
    unit.optionsType, unit.options = md.ProcessUnitOptions.NormalizationOptions, norm
    tin = md.TensorMetadataT()
    tin.name, tin.processUnits = input_name, [unit]
    tout = md.TensorMetadataT()
    tout.name = output_name
    if label_file is not None:
        labels = md.AssociatedFileT()
        labels.name, labels.type, labels.description = label_file, md.AssociatedFileType.TENSOR_AXIS_LABELS, \
            "class names"
        tout.associatedFiles = [labels]
    sg = md.SubGraphMetadataT()
    sg.inputTensorMetadata, sg.outputTensorMetadata = [tin], [tout]
    mm = md.ModelMetadataT()
    mm.name, mm.version, mm.subgraphMetadata, mm.minParserVersion = "test segmenter", "v1", [sg], "1.0.0"
    b = flatbuffers.Builder(0)
    b.Finish(mm.Pack(b), file_identifier=b"M001")
    return bytes(b.Output())


def append_files(path: str | Path, files: dict[str, str]) -> None:
    """Pack associated files as the TFLite metadata populator does: a zip archive appended to the model."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    with open(path, "ab") as f:
        f.write(buf.getvalue())


def transpose_conv_bias_tflite(path: str | Path, *, size: tuple[int, int], channels: tuple[int, int], kernel: int,
                               stride: int, same: bool, seed: int = 0) -> None:
    """One MediaPipe Convolution2DTransposeBias op: x[1,H,W,Cin] -> y (output side s*(n-1)+k-cut, as MediaPipe's
    kernel computes it: cut = max(0, k - (n-1) % s - 1) for SAME, 0 for VALID)."""
    rng = np.random.default_rng(seed)
    (h, w), (cin, cout) = size, channels
    W = rng.normal(size=(cout, kernel, kernel, cin)).astype(np.float32)
    b = rng.normal(size=(cout,)).astype(np.float32)

    def side(n: int) -> int:
        return stride * (n - 1) + kernel - (max(0, kernel - (n - 1) % stride - 1) if same else 0)

    m = TfliteWriter()
    x, y = m.tensor("x", [1, h, w, cin]), m.tensor("y", [1, side(h), side(w), cout])
    m.op(fb.BuiltinOperator.CUSTOM, [x, m.tensor("w", W.shape, data=W), m.tensor("b", [cout], data=b)], [y],
         custom_code="Convolution2DTransposeBias", custom_options=struct.pack("<iii", 1 if same else 2, stride,
                                                                               stride))
    Path(path).write_bytes(m.finish([x], [y]))
