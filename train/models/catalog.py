"""The table of architectures and the `@register_model` decorator that fills it (timm's `_registry.py`). The model
modules import this; `train/registry.py` (the factory: create_model, list_models) imports the models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: Callable[..., nn.Module]
    task: str  # "segmentation", "generation-noise", "generation-image" or "discriminator"
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # ModelSpec fields the model brings with it (a pretrained model's class names and normalisation).
    spec_fields: dict[str, Any] = field(default_factory=dict)
    # Pretrained models take the dataset's class names and replace their classifier when they differ.
    takes_class_names: bool = False
    # False for entries that only rebuild checkpoints (`hf`: a Hugging Face architecture from its saved config),
    # which list_models leaves out: nobody trains them by that name.
    listed: bool = True




_REGISTRY: dict[str, ModelEntry] = {}
# Names with a prefix (`hf:PATH`) are resolved by a function of the whole name into an entry made on the spot.
_PREFIXES: dict[str, Callable[[str], ModelEntry]] = {}


def register_model(name: str, *, task: str, description: str = "", listed: bool = True, **defaults: Any):
    """Decorator: register `fn(**kwargs) -> nn.Module` under `name` with default keyword arguments."""

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, task, dict(defaults), description or (fn.__doc__ or "").strip(),
                                     listed=listed)
        return fn

    return decorate


def register_prefix(prefix: str, resolve: Callable[[str], ModelEntry]) -> None:
    """Names starting with `prefix` are entries made by `resolve(name)` (e.g. `hf:PATH` from a local folder)."""
    if prefix in _PREFIXES:
        raise ValueError(f"model prefix {prefix!r} is registered twice")
    _PREFIXES[prefix] = resolve


def measure_output_stride(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Input pixels per output pixel of a segmentation model (1 for models that upsample their logits to the
    input; 4 for SegFormer), from one forward pass on zeros in eval mode."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            out = model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        model.train(was_training)
    return max(1, round(input_size[1] / out.shape[-1]))
