"""GAN objectives (vanilla, least squares, hinge), the pix2pix objective, and an EMA of generator weights.

Discriminators return raw scores (logits); each mode applies its own link:

| mode | discriminator loss on real r, fake f | generator loss on fake f |
|---|---|---|
| vanilla (Goodfellow et al.) | BCE(sigmoid(r), 1) + BCE(sigmoid(f), 0) | BCE(sigmoid(f), 1) (the non-saturating form) |
| lsgan (Mao et al.) | mean((r - 1)^2) + mean(f^2) | mean((f - 1)^2) |
| hinge (Lim & Ye; Miyato et al.) | mean(relu(1 - r)) + mean(relu(1 + f)) | -mean(f) |

Every term is a mean over all elements, so a PatchGAN's patch logits are averaged. `GANLoss.d_real`/`d_fake`
give the two discriminator terms separately (the trainer back-propagates them one after the other, as the DCGAN
reference does, so BatchNorm in the discriminator sees real and fake batches apart).

pix2pix: L_G = L_GAN(G, D) + lambda * L1(G(A), B), lambda = 100; the discriminator's objective is halved while
optimising D ("we divide the objective by 2 while optimizing D, which slows down the rate at which D learns
relative to G", Isola et al.), which the trainer does with `d_scale = 0.5`.

The EMA of generator weights is the trainers' shared `edgepix.train.loop.ModelEMA` (one class for
both); the trainer saves it as the checkpoint's "ema" entry, which `model_from_checkpoint` prefers for export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DEFAULT_LAMBDA_L1, GANMode

DEFAULT_LR = 2e-4
DEFAULT_BETAS = (0.5, 0.999)


class GANLoss:
    """The adversarial terms of one GAN mode (see the module docstring for the formulas)."""

    def __init__(self, mode: GANMode | str = GANMode.VANILLA) -> None:
        self.mode = GANMode(mode)

    def d_real(self, real_logits: torch.Tensor) -> torch.Tensor:
        x = real_logits.float()
        if self.mode is GANMode.VANILLA:
            return F.binary_cross_entropy_with_logits(x, torch.ones_like(x))
        if self.mode is GANMode.LSGAN:
            return ((x - 1.0) ** 2).mean()
        return F.relu(1.0 - x).mean()

    def d_fake(self, fake_logits: torch.Tensor) -> torch.Tensor:
        x = fake_logits.float()
        if self.mode is GANMode.VANILLA:
            return F.binary_cross_entropy_with_logits(x, torch.zeros_like(x))
        if self.mode is GANMode.LSGAN:
            return (x**2).mean()
        return F.relu(1.0 + x).mean()

    def d_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return self.d_real(real_logits) + self.d_fake(fake_logits)

    def g_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        x = fake_logits.float()
        if self.mode is GANMode.VANILLA:
            return F.binary_cross_entropy_with_logits(x, torch.ones_like(x))
        if self.mode is GANMode.LSGAN:
            return ((x - 1.0) ** 2).mean()
        return -x.mean()


def pix2pix_generator_loss(gan: GANLoss, fake_logits: torch.Tensor, fake_b: torch.Tensor, real_b: torch.Tensor,
                           *, lambda_l1: float = DEFAULT_LAMBDA_L1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, adversarial term, L1 term): total = L_GAN(G, D) + lambda * mean|G(A) - B|."""
    adversarial = gan.g_loss(fake_logits)
    l1 = F.l1_loss(fake_b.float(), real_b.float())
    return adversarial + lambda_l1 * l1, adversarial, l1


def make_adam(params, *, lr: float = DEFAULT_LR, betas: tuple[float, float] = DEFAULT_BETAS) -> torch.optim.Adam:
    """Adam(2e-4, beta1 = 0.5): the DCGAN and pix2pix papers' optimiser."""
    return torch.optim.Adam(params, lr=lr, betas=betas)


