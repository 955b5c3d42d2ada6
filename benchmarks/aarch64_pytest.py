"""A pytest plugin for runs on a runtime-only install (no torch, no onnx): a test that stops because one of the
train extra's modules is missing is reported as skipped, with the module's name, instead of failed.

    python -m pytest -p edgepix.benchmarks.aarch64_pytest tests/...

`benchmarks/aarch64_run.py` loads it for the test run on the aarch64 userland, whose install is what a device
gets (`pip install 'edgepix[cpu]'`). Only `ModuleNotFoundError` for those modules is converted; every other
failure, an `ImportError` of anything else included, stays a failure.
"""

from __future__ import annotations

import pytest

# The modules of the train and hub extras: a runtime-only install has none of them.
TRAIN_EXTRA_MODULES = frozenset({"torch", "torchvision", "onnx", "onnxscript", "onnxslim", "transformers",
                                 "safetensors"})
SKIP_PREFIX = "needs the train extra"


def missing_train_module(error: BaseException | None) -> str | None:
    """The train-extra module whose absence raised `error`, or None when `error` is anything else."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        top = error.name.split(".")[0]
        if top in TRAIN_EXTRA_MODULES:
            return top
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport | None:
    module = missing_train_module(call.excinfo.value if call.excinfo is not None else None)
    if module is None:
        return None  # pytest's own report
    report = pytest.TestReport.from_item_and_call(item, call)
    report.outcome = "skipped"
    path, lineno, _ = item.location
    report.longrepr = (path, lineno, f"Skipped: {SKIP_PREFIX} ({module} is not installed: runtime-only install)")
    return report
