"""Shared fixtures. Models and data are made here, tiny and synthetic; nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A backend profile in the home folder (edgepix tune) must not change which backend `auto` picks in the tests; the
# tests of the profile point EDGEPIX_PROFILE at a file of their own.
os.environ["EDGEPIX_PROFILE"] = "off"


def run_edgepix(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `edgepix` command in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "edgepix", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def edgepix_cli():
    return run_edgepix


@pytest.fixture(scope="session")
def seg_checkpoint(tmp_path_factory) -> Path:
    """A fastscnn checkpoint trained for a few seconds on 64x64 synthetic scenes: its logits are far from ties,
    so parity checks can tell a faithful export from a broken one. Made with plain torch so that export tests do
    not depend on the trainer."""
    import numpy as np
    import torch

    from edgepix.runtime.data.synthetic import CLASS_NAMES, PALETTE, SceneConfig, make_scene
    from edgepix.runtime.description.spec import ModelSpec
    from edgepix.train.checkpoint import save_checkpoint, wrap_state_dict
    from edgepix.train.registry import create_model

    torch.manual_seed(0)
    spec = ModelSpec(task="segmentation", model_name="fastscnn", input_size=(64, 64), class_names=CLASS_NAMES,
                     palette=PALETTE)
    model = create_model("fastscnn", num_classes=len(CLASS_NAMES))
    scenes = [make_scene(i, SceneConfig(size=(64, 64))) for i in range(128)]
    mean = np.array(spec.mean, np.float32) * 255
    std = np.array(spec.std, np.float32) * 255
    x = np.stack([((im[..., ::-1] - mean) / std).transpose(2, 0, 1) for im, _ in scenes])
    x = torch.from_numpy(x.astype(np.float32))
    y = torch.from_numpy(np.stack([m for _, m in scenes])).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        idx = torch.randint(0, len(scenes), (16,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("ckpt") / "fastscnn64.pt"
    save_checkpoint(path, wrap_state_dict(model.state_dict(), arch="fastscnn",
                                          arch_kwargs={"num_classes": len(CLASS_NAMES)}, spec=spec))
    return path


@pytest.fixture(scope="session")
def seg_onnx(seg_checkpoint, tmp_path_factory) -> Path:
    """A real FP32 export of `seg_checkpoint` (the spec in its metadata), made once per session."""
    from edgepix.export.pipeline import ExportRequest, run_export

    out = tmp_path_factory.mktemp("onnx") / "fastscnn64.onnx"
    return run_export(ExportRequest(seg_checkpoint, out=out, verify=False)).path


def engine_manifest_dict(spec: dict, shape: list[int]) -> dict:
    """A valid TensorRT engine manifest (as JSON data) for a model with one input of `shape`."""
    profile = {"input": "images", "min": shape, "opt": shape, "max": shape}
    return {"manifest_version": 1, "spec": spec, "tensorrt": "10.3.0", "cuda": "12.6", "gpu": "Orin",
            "compute_capability": "8.7", "onnx_sha256": "0" * 64, "onnx": "model.onnx", "precision": "fp16",
            "profiles": [[profile]], "io": [{"name": "images", "mode": "input", "dtype": "float32", "shape": shape}],
            "built": "2025-01-01T00:00:00+00:00", "builder": {}, "cache_key": "k", "edgepix": "0.1.0"}
