"""LR-ASPP on a MobileNetV3-Small encoder (Howard et al., 2019, "Searching for MobileNetV3").

The encoder is MobileNetV3-Small with the segmentation changes of the paper: the last stage keeps stride 16
(dilation 2 instead of a final stride) and has half the channels ("reduced tail"). The Lite R-ASPP head multiplies a
1x1-conv branch of the 1/16 features by a sigmoid gate computed from their global average (global pooling exports
at any size; the paper's 49x49 pooling window assumed 1024x2048 inputs), upsamples to 1/8 and adds a linear
classifier of the 1/8 features. Logits are bilinearly upsampled to the input size.
"""

from __future__ import annotations

import torch
from torch import nn

from .catalog import register_model
from .layers import ConvBNAct, InvertedResidual, init_classifier, init_weights, make_divisible, resize_to

# (kernel, expanded channels, out channels, squeeze-excite, activation, stride) of MobileNetV3-Small.
_SMALL = (
    (3, 16, 16, True, "RE", 2),  # 1/4
    (3, 72, 24, False, "RE", 2),  # 1/8  <- low-level features for the head
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),  # 1/16
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),  # the last stage: dilated, stride 1, in the segmentation variant
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)
_ACTS = {"RE": nn.ReLU, "HS": nn.Hardswish}


class MobileNetV3SmallEncoder(nn.Module):
    """Returns (1/8 features, 1/16 features)."""

    def __init__(self, width_mult: float = 1.0, *, reduced_tail: bool = True) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        stem = ch(16)
        self.stem = ConvBNAct(3, stem, 3, 2, act=nn.Hardswish)
        blocks: list[nn.Module] = []
        c_in = stem
        self.low_index = 1  # the block whose output is the 1/8 feature map
        for i, (k, exp, out, se, act, stride) in enumerate(_SMALL):
            last_stage = i >= 8
            divide = 2 if (last_stage and reduced_tail) else 1
            dilation = 2 if last_stage else 1
            stride = 1 if last_stage else stride
            c_out = ch(out // divide)
            blocks.append(InvertedResidual(c_in, c_out, hidden=ch(exp // divide), kernel_size=k, stride=stride,
                                           dilation=dilation, se=se, act=_ACTS[act]))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.low_channels = blocks[self.low_index].block[-1][0].out_channels
        self.head_conv = ConvBNAct(c_in, 6 * c_in, 1, act=nn.Hardswish)
        self.high_channels = 6 * c_in

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        low = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.low_index:
                low = x
        return low, self.head_conv(x)


class LRASPPHead(nn.Module):
    def __init__(self, low_ch: int, high_ch: int, num_classes: int, inter_ch: int = 128) -> None:
        super().__init__()
        self.cbr = ConvBNAct(high_ch, inter_ch, 1)
        self.gate = nn.Conv2d(high_ch, inter_ch, 1, bias=False)
        self.low_classifier = nn.Conv2d(low_ch, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_ch, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high) * torch.sigmoid(self.gate(high.mean(dim=(2, 3), keepdim=True)))
        x = resize_to(x, low)
        return self.low_classifier(low) + self.high_classifier(x)


@register_model("lraspp", task="segmentation", description="LR-ASPP on MobileNetV3-Small (dilated, reduced tail)")
class LRASPP(nn.Module):
    """Lite R-ASPP segmentation head on a MobileNetV3-Small encoder."""

    def __init__(self, num_classes: int, *, width_mult: float = 1.0, head_channels: int = 128,
                 reduced_tail: bool = True) -> None:
        super().__init__()
        if num_classes < 1 or width_mult <= 0:
            raise ValueError(f"lraspp needs num_classes >= 1 and width_mult > 0, got {num_classes}, {width_mult}")
        self.num_classes = num_classes
        self.encoder = MobileNetV3SmallEncoder(width_mult, reduced_tail=reduced_tail)
        self.head = LRASPPHead(self.encoder.low_channels, self.encoder.high_channels, num_classes, head_channels)
        init_weights(self)
        init_classifier(self.head.low_classifier)
        init_classifier(self.head.high_classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.encoder(x)
        return resize_to(self.head(low, high), x)
