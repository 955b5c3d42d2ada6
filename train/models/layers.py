"""Building blocks shared by the segmentation models.

Everything here exports to ONNX (opset 17) at any input size: no adaptive pooling except global pooling
(`mean` over H and W), and every resize is bilinear with align_corners=False (ONNX Resize, half_pixel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm + activation; `groups=in_ch` makes it depthwise."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        groups: int = 1,
        dilation: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.Hardswish) else act())
        super().__init__(*layers)


class DSConv(nn.Sequential):
    """Depthwise-separable convolution: depthwise 3x3 (+BN+ReLU) then pointwise 1x1 (+BN+ReLU)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(
            ConvBNAct(in_ch, in_ch, 3, stride, groups=in_ch),
            ConvBNAct(in_ch, out_ch, 1),
        )


class SqueezeExcite(nn.Module):
    """Channel attention from the global average (MobileNetV3 flavour: ReLU then hard-sigmoid)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = make_divisible(channels // reduction, 8)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s), inplace=True)))
        return x * s


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 bottleneck: 1x1 expand, depthwise kxk (stride), optional SE, 1x1 linear projection."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int = 1,
        expand: float = 6,
        kernel_size: int = 3,
        se: bool = False,
        act: type[nn.Module] = nn.ReLU,
        dilation: int = 1,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if hidden is None:  # MobileNetV2 gives an expansion ratio; MobileNetV3's tables give the width itself
            hidden = make_divisible(in_ch * expand, 8) if expand != 1 else in_ch
        layers: list[nn.Module] = []
        if hidden != in_ch:
            layers.append(ConvBNAct(in_ch, hidden, 1, act=act))
        layers.append(ConvBNAct(hidden, hidden, kernel_size, stride, groups=hidden, dilation=dilation, act=act))
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(ConvBNAct(hidden, out_ch, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor` without dropping more than 10% (MobileNet rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of `x` to the spatial size of `like` (align_corners=False: ONNX Resize half_pixel)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def init_classifier(conv: nn.Conv2d) -> None:
    """Small logits at the start (std 0.01, zero bias): the first loss is ~ln(num_classes), not a large number."""
    nn.init.normal_(conv.weight, 0.0, 0.01)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit BatchNorm, zero biases: the usual start for ReLU networks."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
