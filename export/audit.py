"""Find constructs that break ONNX or TensorRT before exporting, and name the module that holds them.

One forward pass runs under a TorchFunctionMode that sees every functional call, while forward hooks keep a stack of
the modules being executed, so each finding names the module (e.g. `ppm.stages.1`) and the reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class Severity(str, enum.Enum):
    ERROR = "error"  # the exported graph would compute something else, or fail to build
    WARNING = "warning"  # exports, but some backends differ or run it slowly


@dataclass(frozen=True)
class Finding:
    module: str
    construct: str
    reason: str
    severity: Severity

    def __str__(self) -> str:
        return f"{self.severity.value}: {self.module or '<model>'}: {self.construct}: {self.reason}"


def _pair(value, like: tuple[int, int]) -> tuple[int | None, int | None]:
    if isinstance(value, int):
        return value, value
    if value is None:
        return like
    return tuple(like[i] if v is None else int(v) for i, v in enumerate(value))  # type: ignore[return-value]


class _Recorder(TorchFunctionMode):
    def __init__(self, stack: list[str], findings: list[Finding], *, dynamic_size: bool) -> None:
        super().__init__()
        self.stack, self.findings, self.dynamic_size = stack, findings, dynamic_size

    def _add(self, construct: str, reason: str, severity: Severity) -> None:
        finding = Finding(self.stack[-1] if self.stack else "", construct, reason, severity)
        if finding not in self.findings:
            self.findings.append(finding)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.interpolate, F.upsample) and kwargs.get("align_corners", args[4] if len(args) > 4 else None):
            self._add("interpolate(align_corners=True)",
                      "align_corners resizes are exported with coordinate_transformation_mode=align_corners, "
                      "which OpenCV dnn and some TensorRT versions compute differently; use align_corners=False",
                      Severity.WARNING)
        elif func in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            x = args[0]
            size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
            h, w = x.shape[-2:]
            oh, ow = _pair(size, (h, w))
            if (oh, ow) != (1, 1):
                if h % oh or w % ow:
                    self._add(f"{func.__name__}({h}x{w} -> {oh}x{ow})",
                              "output size does not divide the input, so the bins are unequal; ONNX has no such "
                              "pooling and TensorRT cannot build it; use bins that divide the feature map or "
                              "fixed-kernel pooling", Severity.ERROR)
                elif self.dynamic_size:
                    self._add(f"{func.__name__}({h}x{w} -> {oh}x{ow})",
                              "exported as AveragePool with the kernel of this input size; at other sizes the "
                              "dynamic-size graph computes something else; use fixed-kernel pooling",
                              Severity.ERROR)
        elif func is torch.Tensor.__bool__:
            self._add("tensor used as a Python bool",
                      "data-dependent control flow is frozen at export: the graph always takes the branch this "
                      "example took", Severity.ERROR)
        elif func in (torch.Tensor.item, torch.Tensor.tolist):
            self._add(f"Tensor.{func.__name__}()",
                      "a tensor value becomes a Python number and is frozen into the graph as a constant",
                      Severity.ERROR)
        elif func in (torch.nonzero, torch.Tensor.nonzero):
            self._add("nonzero", "data-dependent output shape; TensorRT needs extra work for it", Severity.WARNING)
        return func(*args, **kwargs)


def audit_model(model: nn.Module, example: torch.Tensor, *, dynamic_size: bool = False,
                exporter: str = "torchscript") -> list[Finding]:
    """Run `model(example)` once in eval mode and report export hazards, naming the module of each.

    Modules that know their own limits (a Hugging Face architecture whose patch grid is computed in Python) say so
    through `export_hazards(dynamic_size=..., exporter=...)`, a list of (construct, reason) errors: those are
    reported without running anything, since the forward pass would not show them."""
    stack: list[str] = []
    findings: list[Finding] = []
    for name, module in model.named_modules():
        hazards = getattr(module, "export_hazards", None)
        if callable(hazards):
            findings += [Finding(name, construct, reason, Severity.ERROR)
                         for construct, reason in hazards(dynamic_size=dynamic_size, exporter=exporter)]
    if findings:
        return findings
    handles = []
    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)
        return hook

    def leave(module, args, output) -> None:  # must return None, or it would replace the module's output
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), _Recorder(stack, findings, dynamic_size=dynamic_size):
            model(example)
    finally:
        for h in handles:
            h.remove()
    return findings
