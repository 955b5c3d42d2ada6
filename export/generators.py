"""Export rules for generators: train-mode graphs, their PyTorch reference, and the inputs a generator expects.

Train mode (`--train-mode`). pix2pix runs its generator at test time "in exactly the same manner as during the
training phase": BatchNorm with the statistics of the test batch (batch size 1, i.e. instance normalisation) and,
in the paper, dropout. These are two different things for deployment:

- Normalisation with the input's own statistics is deterministic. The exported graph computes it *per image*
  (`InstanceNormalization` with the BatchNorm's scale and shift), which is exactly PyTorch's train-mode BatchNorm
  for a batch of one, and stays correct when the runtime batches several images: a batch-statistics graph would
  make each output depend on the other images in its batch. The parity gate runs PyTorch in train mode on batches
  of one (with dropout off) and needs the usual PSNR (>= 40 dB FP32).
- Dropout is noise. It stays off (the eval-mode identity) unless `--dropout` asks for it; then each Dropout becomes
  `x * (RandomUniformLike(x) >= p) / (1 - p)` in the graph, so every run draws new masks, as PyTorch does, and no
  backend can reproduce PyTorch's draws. The gate then compares distributions instead of pixels: for each
  verification input it averages k outputs of the artifact and k of PyTorch and requires the artifact's mean to be
  as close to PyTorch's mean as a second, independent PyTorch mean is (PSNR within 1 dB), and the per-pixel spread
  of the outputs to match (std ratio 0.8-1.25), which also proves the dropout is really active.

Everything is built on a deep copy: the caller's model is not changed.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgepix.runtime.spec import ModelSpec, Task


class PerImageNorm(nn.Module):
    """A BatchNorm2d that normalises with each image's own statistics (train-mode BatchNorm for a batch of one)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight = None if bn.weight is None else nn.Parameter(bn.weight.detach().clone(), requires_grad=False)
        self.bias = None if bn.bias is None else nn.Parameter(bn.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


class SampledDropout(nn.Module):
    """Dropout that is always active: exported as RandomUniformLike >= p, a new mask on every run."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep * (1.0 / (1.0 - self.p))


def _replace(module: nn.Module, *, dropout: bool) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, PerImageNorm(child))
        elif isinstance(child, (nn.Dropout, nn.Dropout2d)):
            setattr(module, name, SampledDropout(child.p) if dropout and child.p > 0 else nn.Identity())
        else:
            _replace(child, dropout=dropout)


def train_mode_graph(model: nn.Module, *, dropout: bool = False) -> nn.Module:
    """A copy of `model` whose eval-mode forward is its train-mode forward, image by image (see the docstring)."""
    graph = copy.deepcopy(model)
    _replace(graph, dropout=dropout)
    return graph.eval()


def reference_mode(model: nn.Module, *, train_mode: bool, dropout: bool = False) -> nn.Module:
    """Put the PyTorch reference in the mode the artifact was exported in: train-mode normalisation with dropout
    only when asked for (the gate feeds it one image at a time)."""
    model.train(train_mode)
    if train_mode:
        for m in model.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                m.train(dropout)
    return model


def generator_input_image(image: np.ndarray, mask: np.ndarray | None, spec: ModelSpec) -> np.ndarray:
    """What an image generator is fed for a (scene, mask) sample: a mask -> image model (its spec carries a
    palette) gets the mask painted with the palette (BGR), any other model the image itself."""
    if spec.task is not Task.GENERATION_IMAGE or not spec.palette or mask is None:
        return image
    table = np.zeros((256, 3), np.uint8)
    for i, (r, g, b) in enumerate(spec.palette):
        table[i] = (b, g, r)
    return table[mask]
