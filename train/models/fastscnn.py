"""Fast-SCNN (Poudel et al., 2019, "Fast-SCNN: Fast Semantic Segmentation Network").

Learning-to-downsample (1/8) -> global feature extractor (inverted-residual bottlenecks down to 1/32, then
pyramid pooling) -> feature fusion with the 1/8 branch -> classifier -> bilinear upsampling to the input size.
About 1.1M parameters at 19 classes, as in the paper.

Pyramid pooling: the paper pools the 1/32 map into 1x1, 2x2, 3x3 and 6x6 bins with adaptive pooling, which ONNX
can only express when the bins divide the map (a 96x128 input gives a 3x4 map). Here the same four context branches
are a global average (bin 1, exact at any size) and three fixed-kernel average pools (3x3, 5x5, 7x7, stride 1,
'same' padding that excludes the padded pixels), each reduced to in/4 channels, concatenated with the input and
fused by a 1x1 convolution. The branches see the same scales of context (about 1/3, 1/2 and 3/4 of an 8x8 map at
a 256 input) and the graph is identical at every input size, so a dynamic-size export means what training meant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .catalog import register_model
from .layers import ConvBNAct, DSConv, InvertedResidual, init_classifier, init_weights, resize_to


class LearningToDownsample(nn.Sequential):
    def __init__(self, channels: tuple[int, int, int] = (32, 48, 64)) -> None:
        c1, c2, c3 = channels
        super().__init__(ConvBNAct(3, c1, 3, 2), DSConv(c1, c2, 2), DSConv(c2, c3, 2))


class PyramidPooling(nn.Module):
    """Global average + fixed-kernel average pools, each 1x1-reduced to in/4, concatenated, fused by 1x1."""

    def __init__(self, in_ch: int, out_ch: int, kernels: tuple[int, ...] = (3, 5, 7)) -> None:
        super().__init__()
        for k in kernels:
            if k < 1 or k % 2 == 0:
                raise ValueError(f"pyramid pooling kernels must be odd and positive, got {kernels}")
        self.kernels = tuple(kernels)
        branch_ch = in_ch // 4
        self.global_branch = ConvBNAct(in_ch, branch_ch, 1)
        self.local_branches = nn.ModuleList(ConvBNAct(in_ch, branch_ch, 1) for _ in self.kernels)
        self.fuse = ConvBNAct(in_ch + branch_ch * (1 + len(self.kernels)), out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.global_branch(x.mean(dim=(2, 3), keepdim=True))
        feats = [x, resize_to(g, x)]
        for k, conv in zip(self.kernels, self.local_branches):
            pooled = F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
            feats.append(conv(pooled))
        return self.fuse(torch.cat(feats, dim=1))


class GlobalFeatureExtractor(nn.Module):
    def __init__(
        self,
        in_ch: int = 64,
        block_channels: tuple[int, int, int] = (64, 96, 128),
        out_ch: int = 128,
        expand: int = 6,
        num_blocks: tuple[int, int, int] = (3, 3, 3),
        ppm_kernels: tuple[int, ...] = (3, 5, 7),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_ch
        for c_out, n, stride in zip(block_channels, num_blocks, (2, 2, 1)):
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, stride=stride if i == 0 else 1, expand=expand))
                c_in = c_out
        self.bottlenecks = nn.Sequential(*layers)
        self.ppm = PyramidPooling(c_in, out_ch, ppm_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ppm(self.bottlenecks(x))


class FeatureFusion(nn.Module):
    """Upsample the 1/32 features to 1/8, depthwise 3x3 + 1x1 on them, 1x1 on the 1/8 features, add, ReLU."""

    def __init__(self, high_ch: int, low_ch: int, out_ch: int) -> None:
        super().__init__()
        self.dw = ConvBNAct(low_ch, out_ch, 3, groups=low_ch if low_ch == out_ch else 1)
        self.conv_low = ConvBNAct(out_ch, out_ch, 1, act=None)
        self.conv_high = ConvBNAct(high_ch, out_ch, 1, act=None)

    def forward(self, high_res: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        low = self.conv_low(self.dw(resize_to(low_res, high_res)))
        return F.relu(low + self.conv_high(high_res), inplace=True)


class Classifier(nn.Sequential):
    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__(
            DSConv(channels, channels),
            DSConv(channels, channels),
            nn.Dropout(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )


@register_model("fastscnn", task="segmentation", description="Fast-SCNN: two-branch real-time network, ~1.1M params")
class FastSCNN(nn.Module):
    """Fast-SCNN: learning-to-downsample, global feature extractor with pyramid pooling, fusion, classifier."""

    def __init__(
        self,
        num_classes: int,
        *,
        downsample_channels: tuple[int, int, int] = (32, 48, 64),
        block_channels: tuple[int, int, int] = (64, 96, 128),
        num_blocks: tuple[int, int, int] = (3, 3, 3),
        expand: int = 6,
        fusion_channels: int = 128,
        ppm_kernels: tuple[int, ...] = (3, 5, 7),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.downsample = LearningToDownsample(tuple(downsample_channels))
        self.global_features = GlobalFeatureExtractor(
            downsample_channels[-1], tuple(block_channels), fusion_channels, expand, tuple(num_blocks),
            tuple(ppm_kernels),
        )
        self.fusion = FeatureFusion(downsample_channels[-1], fusion_channels, fusion_channels)
        self.classifier = Classifier(fusion_channels, num_classes, dropout)
        init_weights(self)
        init_classifier(self.classifier[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high = self.downsample(x)
        low = self.global_features(high)
        logits = self.classifier(self.fusion(high, low))
        return resize_to(logits, x)
