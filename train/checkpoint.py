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


def prepare_run(cfg, *, resume: bool, exist_ok: bool, overridable: tuple[str, ...], kind: str | None = None,
                announce: bool = True):
    """The state of `cfg.out` before a training run starts: (config, checkpoint or None, finished).

    Fresh runs refuse a folder that already holds one (unless `exist_ok`). `--resume` continues from last.pt with
    the saved config, where only the `overridable` fields come from `cfg`; `kind` (the saved config's "kind") must
    match when given. `finished` is True when the saved run already reached its epochs (logged when `announce`)."""
    import dataclasses
    import logging

    from edgepix.runtime.errors import EdgepixError

    out = Path(cfg.out)
    last_path = out / "last.pt"
    if not resume:
        if last_path.exists() and not exist_ok:
            raise EdgepixError(f"{out} already holds a run (last.pt); continue it with --resume, or choose another "
                               "--out (or pass --exist-ok to overwrite it)")
        return cfg, None, False
    if not last_path.exists():
        raise ModelFormatError(f"nothing to resume: {last_path} does not exist; start the run without --resume")
    ckpt = load_checkpoint(last_path)
    if kind is not None and ckpt.get("train_config", {}).get("kind") != kind:
        raise ModelFormatError(f"{last_path} is not a {kind} training run; resume it with its own command")
    saved = type(cfg).from_dict(ckpt["train_config"])
    cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in overridable})
    finished = ckpt["epoch"] >= cfg.epochs
    if finished and announce:
        logging.getLogger("edgepix.train").info(
            "%s already finished %d of %d epochs; nothing to resume (raise --epochs to train on)", last_path,
            ckpt["epoch"], cfg.epochs)
    return cfg, ckpt, finished
