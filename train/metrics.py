"""Segmentation metrics accumulated on the training device and reduced across processes.

`SegmentationMeter` keeps a num_classes x num_classes confusion matrix (rows: truth, columns: prediction) as an
int64 tensor; `all_reduce()` sums it over DistributedDataParallel ranks, so every rank ends with the metrics of the
whole validation set. The arithmetic (IoU, mIoU, pixel accuracy) is `edgepix.runtime.data.metrics.ConfusionMatrix`'s,
so the trainer, the export gate and the runtime report the same numbers for the same predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgepix.runtime.data.metrics import ConfusionMatrix


@dataclass(frozen=True)
class SegmentationMetrics:
    miou: float
    pixel_accuracy: float
    iou: tuple[float, ...]  # per class; NaN for a class absent from both truth and prediction
    pixels: tuple[int, ...]  # labelled pixels per class (truth)

    def as_dict(self, class_names: tuple[str, ...] | None = None) -> dict[str, float]:
        out = {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy}
        names = class_names or tuple(str(i) for i in range(len(self.iou)))
        out.update({f"iou/{n}": v for n, v in zip(names, self.iou)})
        return out


class SegmentationMeter:
    def __init__(self, num_classes: int, *, ignore_index: int | None = 255, device: str | torch.device = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """`prediction`: class indices (N, H, W) or logits (N, C, H, W); `target`: class indices (N, H, W)."""
        if prediction.dim() == target.dim() + 1:
            prediction = prediction.argmax(1)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from target {tuple(target.shape)}")
        target = target.to(self.matrix.device, torch.int64).reshape(-1)
        prediction = prediction.to(self.matrix.device, torch.int64).reshape(-1)
        valid = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        index = target[valid] * self.num_classes + prediction[valid].clamp(0, self.num_classes - 1)
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def all_reduce(self) -> None:
        """Sum the confusion matrices of all ranks (no-op without torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix, op=torch.distributed.ReduceOp.SUM)

    def compute(self) -> SegmentationMetrics:
        cm = ConfusionMatrix(self.num_classes, self.ignore_index)
        cm.matrix = self.matrix.cpu().numpy().astype(np.int64)
        return SegmentationMetrics(
            miou=cm.miou(),
            pixel_accuracy=cm.pixel_accuracy(),
            iou=tuple(float(v) for v in cm.iou()),
            pixels=tuple(int(v) for v in cm.matrix.sum(1)),
        )
