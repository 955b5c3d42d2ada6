"""Read a Hugging Face `save_pretrained` folder (config.json, preprocessor_config.json) into ModelSpec fields.

Plain JSON, no `transformers` and no torch: the same reading serves training and export (which then build the model
with `transformers`) and `edgepix spec --from-hf` on a device that only has the runtime. Nothing is downloaded: a
folder is a folder the user already has.

What comes from where:
- class names: `id2label` of config.json, in index order (the indices must be 0..N-1);
- ignore index: `semantic_loss_ignore_index` (255 when absent), dropped when it names a class or is negative (a
  label mask never holds a negative value);
- scale, mean and std: `do_rescale`/`rescale_factor`, `do_normalize`/`image_mean`/`image_std` of
  preprocessor_config.json (the ImageNet values only when the folder has no preprocessor config);
- input size: the processor's `size` (`height`/`width`, or `shortest_edge` as a square), or `crop_size` when the
  processor crops;
- channel order RGB: every Hugging Face image processor feeds RGB.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ModelFormatError

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a model config is a few KB; refuse to parse anything absurd
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HFFolder:
    path: Path
    config: dict[str, Any]
    preprocessor: dict[str, Any] | None

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def class_names(self) -> tuple[str, ...]:
        return labels_from_config(self.config, source=str(self.path / CONFIG_FILE))


def is_hf_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_hf_folder(path: str | os.PathLike) -> HFFolder:
    """The folder's config (and preprocessor config when present); one-line errors for anything malformed."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFormatError(f"{path}: expected a folder written by save_pretrained (config.json, "
                               "model.safetensors), found " + ("a file" if path.exists() else "nothing"))
    config = _read_json(path / CONFIG_FILE, required=True)
    if not isinstance(config.get("model_type"), str):
        raise ModelFormatError(f"{path / CONFIG_FILE}: no 'model_type' string; is this a transformers config?")
    preprocessor = _read_json(path / PREPROCESSOR_FILE, required=False)
    labels_from_config(config, source=str(path / CONFIG_FILE))  # id2label is checked now, not at first use
    return HFFolder(path, config, preprocessor)


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.exists():
        if required:
            raise ModelFormatError(f"{path.parent}: no {path.name}; expected a folder written by save_pretrained")
        return None
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelFormatError(f"{path}: {path.stat().st_size} bytes is too large for a config file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise ModelFormatError(f"{path}: not a readable JSON file ({str(e).splitlines()[0][:200]})") from e
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def labels_from_config(config: dict[str, Any], *, source: str = CONFIG_FILE) -> tuple[str, ...]:
    """Class names from `id2label`, whose keys (strings in JSON) must be the indices 0..N-1."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise ModelFormatError(f"{source}: no id2label mapping; a segmentation config names its classes there")
    try:
        by_index = {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ModelFormatError(f"{source}: id2label keys must be class indices, found {sorted(id2label)[:5]}") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ModelFormatError(f"{source}: id2label must cover indices 0..{len(by_index) - 1} without gaps, found "
                               f"{sorted(by_index)[:10]}")
    names = tuple(by_index[i] for i in range(len(by_index)))
    if any(not isinstance(n, str) or not n for n in names):
        raise ModelFormatError(f"{source}: every id2label value must be a non-empty string")
    return names


def spec_fields(folder: HFFolder) -> dict[str, Any]:
    """ModelSpec fields the folder determines (class names, ignore index, scale, mean, std, input size, RGB)."""
    names = folder.class_names
    fields: dict[str, Any] = {"class_names": names, "channel_order": "RGB"}
    ignore = folder.config.get("semantic_loss_ignore_index", 255)
    fields["ignore_index"] = ignore if isinstance(ignore, int) and ignore >= len(names) else None
    fields.update(_normalisation(folder))
    size = _input_size(folder)
    if size is not None:
        fields["input_size"] = size
    return fields


def _normalisation(folder: HFFolder) -> dict[str, Any]:
    p = folder.preprocessor
    source = folder.path / PREPROCESSOR_FILE
    if p is None:
        return {"scale": 1.0 / 255.0, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    scale = _number(p.get("rescale_factor", 1.0 / 255.0), f"{source}: rescale_factor") if p.get("do_rescale", True) \
        else 1.0
    if not p.get("do_normalize", True):
        return {"scale": scale, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    mean = _triple(p.get("image_mean", IMAGENET_MEAN), f"{source}: image_mean")
    std = _triple(p.get("image_std", IMAGENET_STD), f"{source}: image_std")
    return {"scale": scale, "mean": mean, "std": std}


def _input_size(folder: HFFolder) -> tuple[int, int] | None:
    p = folder.preprocessor
    if p is None:
        return None
    source = folder.path / PREPROCESSOR_FILE
    size = p.get("crop_size") if p.get("do_center_crop") and p.get("crop_size") else p.get("size")
    if isinstance(size, int):
        return _side(size, source), _side(size, source)
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return _side(size["height"], source), _side(size["width"], source)
        if "shortest_edge" in size:
            side = _side(size["shortest_edge"], source)
            return side, side
    return None


def _side(value: Any, source: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16384:
        raise ModelFormatError(f"{source}: size: expected a side length in 1..16384, found {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelFormatError(f"{name}: expected a positive number, found {value!r}")
    return float(value)


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ModelFormatError(f"{name}: expected 3 numbers (one per RGB channel), found {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        raise ModelFormatError(f"{name}: expected 3 finite numbers, found {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]
