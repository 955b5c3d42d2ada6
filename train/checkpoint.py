"""Checkpoints: `{"arch", "arch_kwargs", "spec", "model", "ema"?, "optimizer", "epoch", "metrics", ...}`.

Written atomically (a checkpoint is either whole or absent) and read with `torch.load(weights_only=True)`:
a checkpoint can come from anywhere, and unpickling arbitrary objects would run arbitrary code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from edgepix.runtime.errors import ModelFormatError
from edgepix.runtime.fileio import atomic_output
from edgepix.runtime.spec import ModelSpec

REQUIRED_KEYS = ("arch", "arch_kwargs", "spec", "model")


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint is missing {missing}")
    if isinstance(checkpoint["spec"], ModelSpec):
        checkpoint = {**checkpoint, "spec": checkpoint["spec"].to_dict()}
    with atomic_output(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check an edgepix checkpoint; `ckpt["spec"]` comes back as a ModelSpec."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ModelFormatError(f"expected a checkpoint file, got a folder: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses pickles that would construct arbitrary objects. Never retry unsafely.
        first = str(e).strip().splitlines()[0] if str(e).strip() else "refused"
        raise ModelFormatError(
            f"{path}: torch.load(weights_only=True) refused this file because it contains Python objects other "
            f"than tensors and plain containers ({first}); edgepix does not load such files unsafely. Re-save it as "
            f"a state_dict from the code that created it"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise ModelFormatError(f"{path} is not a PyTorch checkpoint: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    if not isinstance(ckpt, dict):
        raise ModelFormatError(f"{path}: expected a checkpoint dictionary, found {type(ckpt).__name__}")
    if "arch" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise ModelFormatError(
                f"{path} is a plain state_dict without edgepix metadata; wrap it with "
                "edgepix.train.checkpoint.wrap_state_dict(state_dict, arch=..., arch_kwargs=..., spec=...) "
                "and save the result"
            )
        raise ModelFormatError(f"{path}: not an edgepix checkpoint (no 'arch' key; keys: {sorted(ckpt)[:8]})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ModelFormatError(f"{path}: checkpoint lacks {', '.join(missing)}")
    ckpt["spec"] = ModelSpec.from_dict(ckpt["spec"])
    return ckpt


def wrap_state_dict(
    state_dict: dict[str, torch.Tensor], *, arch: str, arch_kwargs: dict[str, Any], spec: ModelSpec
) -> dict[str, Any]:
    """Turn a bare state_dict into an edgepix checkpoint (for models trained outside edgepix)."""
    return {
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "spec": spec.to_dict(),
        "model": state_dict,
        "optimizer": None,
        "epoch": 0,
        "metrics": {},
    }


def model_from_checkpoint(ckpt: dict[str, Any], *, use_ema: bool = True) -> torch.nn.Module:
    """Rebuild the architecture from the registry and load the weights (the EMA weights when present)."""
    from .registry import create_model

    model = create_model(ckpt["arch"], **ckpt["arch_kwargs"])
    weights = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelFormatError(
            f"checkpoint weights do not fit {ckpt['arch']}({ckpt['arch_kwargs']}): {str(e).splitlines()[0]}"
        ) from e
    return model.eval()
