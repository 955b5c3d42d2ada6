"""One gate check: a measured number against its threshold. Shared by the ONNX parity gate and the TensorRT check,
and free of torch so that engine checks run on devices without it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Check:
    name: str
    measured: float
    threshold: float
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        if np.isnan(self.measured):
            return False
        return self.measured >= self.threshold if self.higher_is_better else self.measured <= self.threshold
