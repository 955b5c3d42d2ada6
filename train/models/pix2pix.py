"""pix2pix (Isola et al., 2017): a U-Net generator (image -> image) and a conditional PatchGAN discriminator.

Generator (`pix2pix`): the paper's U-Net. `variant` "unet_256" has 8 stride-2 stages (a 256x256 input reaches 1x1),
"unet_128" has 7. Encoder: Conv 4x4/2, then [LeakyReLU(0.2), Conv 4x4/2, Norm] with widths ngf, 2ngf, 4ngf, 8ngf,
8ngf, ... (the innermost stage has no norm: its map is 1x1). Decoder: [ReLU, ConvTranspose 4x4/2, Norm] with
Dropout(p) in the `n_downs - 5` stages next to the innermost one, concatenating the encoder feature of the same
size (skip first); the outermost stage maps to `out_channels` and ends in tanh, so images are in [-1, 1].
Norm is BatchNorm ("batch", the paper's) or InstanceNorm without affine parameters ("instance", the CycleGAN code's);
convolutions carry a bias only with instance norm (BatchNorm has its own shift).

Discriminator (`patchgan`): the paper's 70x70 PatchGAN for `n_layers=3`: Conv 4x4/2 + LeakyReLU, (n_layers - 1)
x [Conv 4x4/2, Norm, LeakyReLU], [Conv 4x4/1, Norm, LeakyReLU], Conv 4x4/1 -> one logit per patch. It is
conditional: its input is concat(A, B) along channels (in_channels = 6 for RGB pairs).

Everything is plain Conv/ConvTranspose/norm/activation/Concat: ONNX-exportable at any input size divisible by
2**n_downs, with no resize (so no align_corners) and no data-dependent control flow.
"""

from __future__ import annotations

import torch
from torch import nn

from .catalog import register_model

VARIANTS = {"unet_128": 7, "unet_256": 8}
NORMS = ("batch", "instance")


def pix2pix_init(module: nn.Module) -> None:
    """The pix2pix code's 'normal' initialisation: weights ~ N(0, 0.02), norm scale ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


@register_model("pix2pix", task="generation-image",
                description="pix2pix U-Net generator (unet_128 / unet_256): image -> image in [-1, 1]")
class UNetGenerator(nn.Module):
    """pix2pix U-Net generator: (N, in_channels, H, W) -> (N, out_channels, H, W) in [-1, 1]."""

    def __init__(self, *, variant: str = "unet_256", ngf: int = 64, dropout: float = 0.5, norm: str = "batch",
                 in_channels: int = 3, out_channels: int = 3) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"pix2pix variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        _check_norm(norm)
        if ngf < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"pix2pix needs ngf >= 1 and 0 <= dropout < 1, got ngf={ngf}, dropout={dropout}")
        self.variant, self.n_downs = variant, VARIANTS[variant]
        bias = norm == "instance"
        n = self.n_downs
        widths = [ngf * min(2**i, 8) for i in range(n)]  # encoder output widths, outermost first
        self.down = nn.ModuleList()
        for i in range(n):
            if i == 0:
                self.down.append(nn.Conv2d(in_channels, widths[0], 4, 2, 1, bias=bias))
                continue
            layers: list[nn.Module] = [nn.LeakyReLU(0.2), nn.Conv2d(widths[i - 1], widths[i], 4, 2, 1, bias=bias)]
            if i < n - 1:  # the innermost map is 1x1 at the design size: no norm there
                layers.append(_norm(norm, widths[i]))
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()  # innermost first
        for i in reversed(range(n)):
            in_ch = widths[i] if i == n - 1 else 2 * widths[i]
            if i == 0:
                self.up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(in_ch, out_channels, 4, 2, 1), nn.Tanh()))
                continue
            layers = [nn.ReLU(), nn.ConvTranspose2d(in_ch, widths[i - 1], 4, 2, 1, bias=bias),
                      _norm(norm, widths[i - 1])]
            # The paper's dropout sits in the decoder stages between the innermost one and the 8ngf->4ngf one.
            if dropout > 0 and 4 <= i < n - 1:
                layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))
        pix2pix_init(self)

    @property
    def size_divisor(self) -> int:
        return 2**self.n_downs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()  # the innermost output feeds the decoder directly
        for block in self.up[:-1]:
            x = block(x)
            x = torch.cat([skips.pop(), x], dim=1)
        return self.up[-1](x)


@register_model("patchgan", task="discriminator",
                description="pix2pix PatchGAN discriminator (70x70 for n_layers=3), conditional on concat(A, B)")
class PatchDiscriminator(nn.Module):
    """PatchGAN: concat(A, B) (N, in_channels, H, W) -> patch logits (N, 1, H', W')."""

    def __init__(self, *, in_channels: int = 6, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        _check_norm(norm)
        if ndf < 1 or n_layers < 1:
            raise ValueError(f"patchgan needs ndf >= 1 and n_layers >= 1, got {ndf}, {n_layers}")
        bias = norm == "instance"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=bias), _norm(norm, out), nn.LeakyReLU(0.2, inplace=True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.n_layers = n_layers
        pix2pix_init(self)

    @staticmethod
    def receptive_field(n_layers: int = 3) -> int:
        """Input pixels seen by one output logit: 70 for n_layers=3 (the paper's 70x70 PatchGAN)."""
        kernels_strides = [(4, 2)] * n_layers + [(4, 1), (4, 1)]
        rf = 1
        for k, s in reversed(kernels_strides):
            rf = (rf - 1) * s + k
        return rf

    def forward(self, ab: torch.Tensor) -> torch.Tensor:
        return self.net(ab)
