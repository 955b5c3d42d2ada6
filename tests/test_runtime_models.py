"""Tiny ONNX models for the runtime tests, built with torch in the test process (the runtime itself never imports
torch), plus checks that the builders make what the other runtime tests assume.

`export(module, path, ...)` is torch.onnx.export (TorchScript exporter, opset 17) followed by embedding a ModelSpec
under metadata_props["edgepix.spec"] with the onnx package, as edgepix's exporter does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgepix.runtime.description.spec import ONNX_METADATA_KEY, ModelSpec, default_palette

RGB_CLASSES = ("red", "green", "blue")


def export(module: nn.Module, path: Path, example: torch.Tensor, *, spec: ModelSpec | None = None,
           input_name: str = "images", output_name: str = "output", dynamic_batch: bool = False,
           dynamic_size: bool = False) -> Path:
    module = module.eval()
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch or dynamic_size:
        in_axes = {0: "batch"} if dynamic_batch else {}
        out_axes = dict(in_axes)
        if dynamic_size:
            in_axes.update({2: "height", 3: "width"})
        axes = {input_name: in_axes, output_name: out_axes}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17, input_names=[input_name],
                          output_names=[output_name], dynamic_axes=axes or None)
    if spec is not None:
        embed_spec(path, spec)
    return path


def embed_spec(path: Path, spec: ModelSpec) -> None:
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, spec.to_json()
    onnx.save(proto, str(path))


def seg_spec(input_size=(32, 48), classes=RGB_CLASSES, **overrides) -> ModelSpec:
    fields = dict(task="segmentation", model_name="tiny", input_size=input_size, class_names=classes,
                  palette=default_palette(len(classes)), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    fields.update(overrides)
    return ModelSpec(**fields)


class ChannelLogits(nn.Module):
    """logits = the normalised input channels themselves: with mean 0, std 1 and RGB order the class of a pixel is
    its strongest colour (0 red, 1 green, 2 blue). A model whose right answer is known for every pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ArgmaxOf(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1).to(torch.uint8)


def small_seg_net(num_classes: int = 4, seed: int = 0) -> nn.Module:
    """A few convolutions with decisive (large-margin) random logits, down- and up-sampling inside."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, num_classes, 1),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    )
    with torch.no_grad():
        net[4].weight.mul_(8.0)  # wide margins between classes: no near-ties for float noise to flip
    return net.eval()


def channel_model(tmp: Path, *, name: str = "channel.onnx", batch: int | None = 1, argmax: bool = False,
                  **spec_overrides) -> Path:
    spec = seg_spec(**spec_overrides)
    if argmax:
        spec = spec.replace(output_kind="class_map")
    h, w = spec.input_size
    module = ArgmaxOf(ChannelLogits()) if argmax else ChannelLogits()
    example = torch.zeros(batch or 2, 3, h, w)
    return export(module, tmp / name, example, spec=spec, dynamic_batch=batch is None)


# ---- checks on the builders -----------------------------------------------------------------------------------


def test_channel_model_embeds_its_spec_and_computes_the_strongest_channel(tmp_path):
    import onnxruntime as ort

    path = channel_model(tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert ModelSpec.from_json(meta[ONNX_METADATA_KEY]).class_names == RGB_CLASSES
    x = np.zeros((1, 3, 32, 48), np.float32)
    x[0, 2, :, 24:] = 1.0  # blue on the right
    x[0, 0, :, :24] = 1.0  # red on the left
    out = session.run(None, {"images": x})[0]
    assert out.shape == (1, 3, 32, 48)
    classes = out[0].argmax(0)
    assert (classes[:, :24] == 0).all() and (classes[:, 24:] == 2).all()
