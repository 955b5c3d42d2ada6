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

from edgepix.runtime.core.errors import ModelFormatError, SpecError
from edgepix.runtime.core.fileio import atomic_output
from edgepix.runtime.description.spec import ModelSpec

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
    if _is_onnx(path):  # torch.load would only say that the file holds unexpected Python objects
        onnx = path if path.suffix.lower() == ".onnx" else path.with_suffix(".onnx")
        rename = "" if onnx == path else f"; rename it to {onnx.name}"
        raise ModelFormatError(
            f"{path} is an ONNX model, not a training checkpoint (.pt){rename}: `edgepix info {onnx}` shows its spec, "
            f"`edgepix export {onnx} --format engine` builds a TensorRT engine from it, and an ONNX export starts "
            "from the checkpoint it was made from")
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
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFormatError(f"{path} is not a PyTorch checkpoint: {reason}") from e
    if not isinstance(ckpt, dict):
        raise ModelFormatError(f"{path}: expected a checkpoint dictionary, found {type(ckpt).__name__}")
    if "arch" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise ModelFormatError(
                f"{path} is a plain state_dict without edgepix metadata; wrap it with "
                "edgepix.train.checkpoint.wrap_state_dict(state_dict, arch=..., arch_kwargs=..., spec=...) "
                "and save the result"
            )
        keys = sorted(str(k)[:40] for k in ckpt)[:8]  # keys may be of any type: sorting mixed ones raises
        raise ModelFormatError(f"{path}: not an edgepix checkpoint (no 'arch' key; keys: {keys})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ModelFormatError(f"{path}: checkpoint lacks {', '.join(missing)}")
    _check_fields(ckpt, path)
    try:
        ckpt["spec"] = ModelSpec.from_dict(ckpt["spec"])
    except SpecError as e:
        raise ModelFormatError(f"{path}: the checkpoint's spec is invalid: {e}") from e
    return ckpt


def _is_onnx(path: Path) -> bool:
    """Whether `path` parses as an ONNX model (torch.save writes a zip archive or a pickle, never that)."""
    from edgepix.runtime.description.onnxproto import read_onnx_header

    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False  # torch.load reports the problem
    if head in (b"PK", b"\x80\x02"):  # torch.save's zip archive or its legacy pickle format
        return False
    try:
        read_onnx_header(path)
    except ModelFormatError:
        return False
    return True


def _check_fields(ckpt: dict[str, Any], path: Path) -> None:
    """The types of the fields edgepix reads, so that a damaged or crafted checkpoint fails here with one line
    naming the field instead of as an AttributeError or TypeError deep inside `info`, `export` or a resume."""

    def fail(field: str, expected: str, found: str | None = None) -> None:
        found = found or type(ckpt[field]).__name__
        raise ModelFormatError(f"{path}: checkpoint field {field!r} must be {expected}, found {found}; the file is "
                               "damaged or was not written by edgepix: re-save it with save_checkpoint")

    def entry(key: Any, value: Any) -> str:
        return f"the entry {str(key)[:40]!r} ({type(key).__name__} key) of type {type(value).__name__}"

    def str_keys(field: str, expected: str) -> None:
        value = ckpt[field]
        if not isinstance(value, dict):
            fail(field, expected)
        bad = next(((k, v) for k, v in value.items() if not isinstance(k, str)), None)
        if bad is not None:
            fail(field, expected, found=entry(*bad))

    def state_dict(field: str) -> None:
        expected = "a dict of parameter names to tensors (a state_dict)"
        str_keys(field, expected)
        bad = next(((k, v) for k, v in ckpt[field].items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            fail(field, expected, found=entry(*bad))

    if not isinstance(ckpt["arch"], str) or not ckpt["arch"]:
        fail("arch", "a model name (a non-empty str)")
    str_keys("arch_kwargs", "a dict of keyword arguments with str keys")
    if not isinstance(ckpt["spec"], dict):
        fail("spec", "a dict (ModelSpec.to_dict())")
    state_dict("model")
    if ckpt.get("ema") is not None:
        state_dict("ema")
    if "epoch" in ckpt and (isinstance(ckpt["epoch"], bool) or not isinstance(ckpt["epoch"], int)
                            or ckpt["epoch"] < 0):
        fail("epoch", "a non-negative int", found=None if not isinstance(ckpt["epoch"], int) else "a negative int")
    for field in ("metrics", "train_config"):
        if field in ckpt:
            str_keys(field, "a dict with str keys")
    if ckpt.get("optimizer") is not None and not isinstance(ckpt["optimizer"], dict):
        fail("optimizer", "a dict (an optimizer state_dict) or None")


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

    try:
        model = create_model(ckpt["arch"], **ckpt["arch_kwargs"])
    except (TypeError, ValueError) as e:  # arguments of the wrong name or type for this architecture
        raise ModelFormatError(f"checkpoint field 'arch_kwargs' does not build {ckpt['arch']}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    weights = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelFormatError(
            f"checkpoint weights do not fit {ckpt['arch']}({ckpt['arch_kwargs']}): {str(e).splitlines()[0]}"
        ) from e
    return model.eval()


def load_source(path: str | os.PathLike, *, use_ema: bool = True) -> tuple[dict[str, Any], torch.nn.Module]:
    """(checkpoint, model in eval mode) from an edgepix checkpoint file or a Hugging Face `save_pretrained`
    folder: the commands that start from a trained model (export, verify, val, bench --torch) take either."""
    from edgepix.runtime.description.hfconfig import is_hf_folder

    if is_hf_folder(path):
        from .models.hf import load_folder

        return load_folder(path)
    ckpt = load_checkpoint(path)
    return ckpt, model_from_checkpoint(ckpt, use_ema=use_ema)


def prepare_run(cfg, *, resume: bool, exist_ok: bool, overridable: tuple[str, ...], kind: str | None = None,
                announce: bool = True):
    """The state of `cfg.out` before a training run starts: (config, checkpoint or None, finished).

    Fresh runs refuse a folder that already holds one (unless `exist_ok`). `--resume` continues from last.pt with
    the saved config, where only the `overridable` fields come from `cfg`; `kind` (the saved config's "kind") must
    match when given. `finished` is True when the saved run already reached its epochs (logged when `announce`)."""
    import dataclasses
    import logging

    from edgepix.runtime.core.errors import EdgepixError

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
