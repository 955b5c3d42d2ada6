"""Segmentation losses: cross-entropy with an ignore index, optionally with online hard-example mining (OHEM)
and/or a soft Dice term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossKind


class SegmentationLoss(nn.Module):
    """CE (or OHEM CE) + `dice_weight` * soft Dice over the classes present; ignored pixels count for nothing.

    OHEM (as in the HRNet/BiSeNet recipes): keep the pixels whose probability of the true class is below
    `ohem_threshold`, but at least `ohem_min_fraction` of the labelled pixels (the hardest ones), and average the
    cross-entropy over those.
    """

    def __init__(self, kind: LossKind | str = LossKind.CE, *, ignore_index: int | None = 255, dice_weight: float = 0.0,
                 ohem_threshold: float = 0.7, ohem_min_fraction: float = 1 / 16) -> None:
        super().__init__()
        self.kind = LossKind(kind)
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.dice_weight = dice_weight
        self.ohem_threshold = ohem_threshold
        self.ohem_min_fraction = ohem_min_fraction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.shape[-2:] != target.shape[-2:]:
            # Models whose logits come out at a fraction of the input (SegFormer: 1/4) are scored at the labels'
            # resolution, as their own training recipes do.
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        if self.kind is LossKind.OHEM:
            loss = self._ohem(logits, target)
        else:
            loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        if self.dice_weight > 0:
            loss = loss + self.dice_weight * self._dice(logits, target)
        return loss

    def _ohem(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pixel_loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none").reshape(-1)
        valid = (target != self.ignore_index).reshape(-1)
        losses = pixel_loss[valid]
        if losses.numel() == 0:
            return logits.sum() * 0.0
        threshold = -torch.log(torch.tensor(self.ohem_threshold, device=logits.device))
        n_min = max(1, int(self.ohem_min_fraction * losses.numel()))
        hard = losses[losses > threshold]
        if hard.numel() < n_min:
            hard = torch.topk(losses, n_min).values
        return hard.mean()

    def _dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n_classes = logits.shape[1]
        valid = (target != self.ignore_index).unsqueeze(1).to(logits.dtype)
        probs = logits.softmax(1) * valid
        onehot = F.one_hot(torch.where(target == self.ignore_index, 0, target), n_classes)
        onehot = onehot.permute(0, 3, 1, 2).to(logits.dtype) * valid
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        cardinality = probs.sum(dims) + onehot.sum(dims)
        present = onehot.sum(dims) > 0
        dice = (2 * inter + 1.0) / (cardinality + 1.0)
        return (1 - dice[present]).mean() if present.any() else logits.sum() * 0.0
