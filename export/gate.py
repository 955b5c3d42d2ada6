"""One gate check: a measured number against its threshold, and the error a failed gate raises. Shared by the ONNX
parity gate, the TFLite conversion's gate and the TensorRT check, and free of torch so that engine checks run on
devices without it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgepix.runtime.core.errors import ExportError

if TYPE_CHECKING:
    from .compare import GateReport


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


class VerificationFailed(ExportError):
    """The artifact does not compute what its reference computed; `report` holds the table."""

    def __init__(self, report: GateReport) -> None:
        super().__init__(f"the artifact failed the parity gate and was not written:\n{report.format()}")
        self.report = report
