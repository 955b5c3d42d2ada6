"""U-Net (Ronneberger et al., 2015) with configurable width and depth and bilinear upsampling.

Encoder: `depth` stages of 2x2 max-pool + two 3x3 conv/BN/ReLU, doubling the width each stage (capped by
`max_channels`). Decoder: bilinear 2x upsampling (align_corners=False) to the skip's size, concatenation, two 3x3
conv/BN/ReLU. The upsampling takes the skip's exact size, so odd feature maps are fine; sizes divisible by
2**depth keep every stage aligned with the input.
"""

from __future__ import annotations

import torch
from torch import nn

from .catalog import register_model
from .layers import ConvBNAct, init_classifier, init_weights, resize_to


class DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(ConvBNAct(in_ch, out_ch, 3), ConvBNAct(out_ch, out_ch, 3))


@register_model("unet", task="segmentation", description="U-Net with bilinear upsampling, configurable width/depth")
class UNet(nn.Module):
    """U-Net: symmetric encoder-decoder with skip connections and bilinear upsampling."""

    def __init__(
        self,
        num_classes: int,
        *,
        base_channels: int = 16,
        depth: int = 4,
        max_channels: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1 or base_channels < 1 or not 1 <= depth <= 6:
            raise ValueError(
                f"unet needs num_classes >= 1, base_channels >= 1 and 1 <= depth <= 6, got "
                f"{num_classes}, {base_channels}, {depth}"
            )
        self.num_classes = num_classes
        widths = [min(base_channels * 2**i, max_channels) for i in range(depth + 1)]
        self.stem = DoubleConv(3, widths[0])
        self.pool = nn.MaxPool2d(2)
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(DoubleConv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth)))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        init_weights(self)
        init_classifier(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(self.pool(skips[-1])))
        y = skips.pop()
        for block in self.up:
            skip = skips.pop()
            y = block(torch.cat([resize_to(y, skip), skip], dim=1))
        return self.head(self.dropout(y))
