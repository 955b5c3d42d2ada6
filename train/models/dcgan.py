"""DCGAN (Radford et al., 2016): an unconditional generator (noise -> image) and its discriminator.

Generator: the latent vector (N, latent_size) is projected to a 4x4 map by a 4x4 transposed convolution of the
1x1 map (computed as the equivalent matrix product), then doubled `log2(image_size / 4)` times by 4x4 stride-2
transposed convolutions with BatchNorm + ReLU; the last one maps to 3 channels and ends in tanh, so images are in
[-1, 1]. Width halves at each upsampling from `ngf * 2**(n_up - 1)` (capped at `max_channels`) down to `ngf`.

Discriminator: the mirror image: 4x4 stride-2 convolutions with LeakyReLU(0.2) (BatchNorm from the second layer on,
or spectral normalisation, or none), halving the map down to 4x4, then a 4x4 convolution to one logit per image.
It returns logits (N,): the GAN losses apply their own sigmoid or none (hinge, least squares).

Both export to ONNX with no data-dependent control flow (MatMul, ConvTranspose, BatchNormalization folded into the
transposed convolutions at export, Relu, Tanh).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .catalog import register_model

IMAGE_SIZES = (32, 64, 128)


def dcgan_init(module: nn.Module) -> None:
    """The DCGAN paper's initialisation: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _check_size(image_size: int) -> int:
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"dcgan image_size must be one of {IMAGE_SIZES}, got {image_size}")
    return int(math.log2(image_size)) - 2  # number of stride-2 stages between 4x4 and the image


def _widths(ngf: int, n: int, max_channels: int) -> list[int]:
    """Channels of the 4x4 map and of each upsampled map before the last: ngf * 2**(n-1) ... ngf."""
    return [min(ngf * 2 ** (n - 1 - i), max_channels) for i in range(n)]


@register_model("dcgan", task="generation-noise", description="DCGAN generator: noise (N, latent) -> image in [-1, 1]")
class DCGANGenerator(nn.Module):
    """DCGAN generator: latent (N, latent_size) -> image (N, out_channels, S, S) in [-1, 1]."""

    def __init__(self, *, latent_size: int = 100, image_size: int = 64, ngf: int = 64, out_channels: int = 3,
                 max_channels: int = 512) -> None:
        super().__init__()
        if latent_size < 1 or ngf < 1 or out_channels < 1:
            raise ValueError(f"dcgan needs latent_size, ngf and out_channels >= 1, got {latent_size}, {ngf}, "
                             f"{out_channels}")
        n = _check_size(image_size)
        self.latent_size, self.image_size = latent_size, image_size
        widths = _widths(ngf, n, max_channels)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_size, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for i in range(n - 1):
            layers += [nn.ConvTranspose2d(widths[i], widths[i + 1], 4, 2, 1, bias=False),
                       nn.BatchNorm2d(widths[i + 1]), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # The first layer, a 4x4 transposed convolution of a 1x1 map, is one matrix product: (N, latent) x
        # (latent, C*16). Written as such it exports as a single MatMul over the whole batch; as a ConvTranspose,
        # ONNX Runtime's CPU kernel runs a matrix-vector product per image that re-reads all the layer's weights.
        project = self.net[0]
        x = torch.matmul(z, project.weight.flatten(1)).view(-1, project.out_channels, 4, 4)
        return self.net[1:](x)


@register_model("dcgan_d", task="discriminator", description="DCGAN discriminator: image -> one logit per image")
class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: image (N, in_channels, S, S) -> logits (N,)."""

    def __init__(self, *, image_size: int = 64, ndf: int = 64, in_channels: int = 3, norm: str = "batch",
                 max_channels: int = 512) -> None:
        super().__init__()
        if norm not in ("batch", "spectral", "none"):
            raise ValueError(f"dcgan_d norm must be 'batch', 'spectral' or 'none', got {norm!r}")
        n = _check_size(image_size)
        widths = [min(ndf * 2**i, max_channels) for i in range(n)]
        layers: list[nn.Module] = []
        ch = in_channels
        for i, w in enumerate(widths):
            layers.append(nn.Conv2d(ch, w, 4, 2, 1, bias=norm != "batch" or i == 0))
            if norm == "batch" and i > 0:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            ch = w
        layers.append(nn.Conv2d(ch, 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)
        dcgan_init(self)  # before spectral normalisation, which re-parametrises the weights it initialised
        if norm == "spectral":
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1).squeeze(1)
