"""Hugging Face semantic-segmentation models (`transformers`' AutoModelForSemanticSegmentation) as edgepix models.

Two registry names lead here:
- `hf:PATH` builds the pretrained model in PATH, a local folder written by `save_pretrained` (config.json,
  model.safetensors, optionally preprocessor_config.json). Given class names that differ from the folder's labels,
  the classifier layers are replaced by new ones for those classes and every other weight is kept as it was.
- `hf` rebuilds the architecture from a config dictionary: checkpoints record `arch="hf"` and the config, never a
  path, so a checkpoint rebuilds offline on any machine.

`HFSegmentation` wraps the transformers model so that it looks like every other edgepix segmentation model: images
in, logits out (SegFormer's at 1/4 of the input, MobileViT's at 1/32; the loss, the evaluation and the runtime
resize them). It also knows which of its parameters are the pretrained backbone and which are the classifier, for
fine-tuning, and which of its constructs the ONNX exporters cannot trace, for the pre-export audit.

`transformers` is imported inside the functions: the registry imports this module whether or not the `hub` extra is
installed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepix.runtime.core.errors import ModelFormatError, require
from edgepix.runtime.description.hfconfig import read_hf_folder, spec_fields

from .catalog import ModelEntry, register_model, register_prefix

log = logging.getLogger("edgepix.train")

HF_PREFIX = "hf:"
CHECKPOINT_ARCH = "hf"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
DEFAULT_INPUT_SIZE = (512, 512)  # when the folder's image processor does not say


@dataclass(frozen=True)
class Architecture:
    """What is known about exporting one transformers architecture (checked by tests/test_hf_models.py)."""

    fixed_size: bool = True  # exports at a fixed input size and passes the parity gate
    dynamic_size: str | None = None  # None: dynamic-size export works; else why it does not
    exporter: str | None = None  # the exporter it needs, when only one works
    exporter_reason: str = ""


ARCHITECTURES: dict[str, Architecture] = {
    "segformer": Architecture(),
    "dpt": Architecture(dynamic_size="its ViT backbone reshapes the patch tokens into a square grid, so a "
                                     "dynamic-size graph only holds for square inputs"),
    "mobilevit": Architecture(dynamic_size="its patch unfolding computes the patch grid with Python integers from "
                                           "the traced size, so the graph only holds at the export size"),
    "mobilevitv2": Architecture(exporter="dynamo",
                                exporter_reason="the TorchScript exporter cannot translate its fold (col2im)"),
    "upernet": Architecture(dynamic_size="its pyramid pooling (adaptive average pooling) is exported with the "
                                         "kernel of the traced size"),
}


def _transformers():
    return require("transformers", extra="hub", purpose="Hugging Face models")


@contextlib.contextmanager
def _quiet_transformers():
    """No per-tensor progress bar or informational logs from transformers while a model loads (edgepix logs what
    it did itself); restored afterwards for the caller's own use of the library."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def config_dict(config) -> dict[str, Any]:
    """A transformers config as plain JSON types (what a weights_only checkpoint may hold), without the path it
    was loaded from (`_name_or_path`: meaningless on another machine)."""
    data = json.loads(config.to_json_string(use_diff=False))
    data.pop("_name_or_path", None)
    return data


def config_from_dict(data: dict[str, Any]):
    transformers = _transformers()
    data = dict(data)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ModelFormatError("the checkpoint's Hugging Face config has no model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise ModelFormatError(f"transformers cannot build a {model_type!r} config: {str(e).splitlines()[0]}") from e


def with_labels(config, class_names: Sequence[str]):
    """A copy of `config` whose labels are `class_names`."""
    config = copy.deepcopy(config)
    config.id2label = {i: n for i, n in enumerate(class_names)}
    config.label2id = {n: i for i, n in enumerate(class_names)}
    config.num_labels = len(class_names)
    return config


def _model_class(config):
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES:
        valid = ", ".join(sorted(MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES))
        raise ModelFormatError(f"model_type {config.model_type!r} is not a semantic-segmentation architecture in "
                               f"transformers {transformers.__version__} (those are: {valid})")
    if config.model_type not in ARCHITECTURES:
        _warn_untried(config.model_type)
    return transformers.AutoModelForSemanticSegmentation


@functools.cache
def _warn_untried(model_type: str) -> None:  # once per architecture and process
    log.warning("%s models have not been tried with edgepix (tried: %s); the export audit and the parity gate "
                "will say whether this one works", model_type, ", ".join(sorted(ARCHITECTURES)))


def classifier_keys(config) -> frozenset[str]:
    """The state_dict keys of the layers whose shape follows the number of labels (the classifier head, and an
    auxiliary head's classifier where there is one). Found by building the architecture on the meta device with
    N and N + 1 labels and comparing shapes: no list of layer names per architecture to keep up to date."""
    auto = _model_class(config)
    n = config.num_labels
    with torch.device("meta"):
        a = auto.from_config(with_labels(config, [f"c{i}" for i in range(n)])).state_dict()
        b = auto.from_config(with_labels(config, [f"c{i}" for i in range(n + 1)])).state_dict()
    return frozenset(f"hf.{k}" for k in a if a[k].shape != b[k].shape)


class HFSegmentation(nn.Module):
    """A transformers semantic-segmentation model as an edgepix model: `forward(images) -> logits`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    @property
    def config(self):
        return self.hf.config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=images).logits

    def checkpoint_arch(self) -> tuple[str, dict[str, Any]]:
        """What a checkpoint records to rebuild this model offline: the config, not a path."""
        return CHECKPOINT_ARCH, {"config": config_dict(self.config)}

    def head_parameter_names(self) -> frozenset[str]:
        return classifier_keys(self.config) & {n for n, _ in self.named_parameters()}

    def backbone_parameter_names(self) -> frozenset[str]:
        """The encoder: the transformers base model (`segformer`, `mobilevit`, `dpt`) or UperNet's `backbone`."""
        prefix = self.hf.base_model_prefix
        base = getattr(self.hf, prefix, None) if isinstance(prefix, str) and prefix else None
        if not isinstance(base, nn.Module):
            prefix, base = "backbone", getattr(self.hf, "backbone", None)
        if not isinstance(base, nn.Module):
            return frozenset()
        return frozenset(f"hf.{prefix}.{n}" for n, _ in base.named_parameters())

    def export_hazards(self, *, dynamic_size: bool, exporter: str) -> list[tuple[str, str]]:
        """(construct, reason) pairs for what this architecture cannot export with these options."""
        arch = ARCHITECTURES.get(self.config.model_type)
        if arch is None:
            return []
        hazards = []
        if arch.exporter and arch.exporter != exporter:
            hazards.append((f"{self.config.model_type} with the {exporter} exporter",
                            f"{arch.exporter_reason}; export with --exporter {arch.exporter}"))
        if dynamic_size and arch.dynamic_size:
            hazards.append((f"{self.config.model_type} with --dynamic-size",
                            f"{arch.dynamic_size}; export at a fixed size (--imgsz H W) instead"))
        return hazards


@register_model(CHECKPOINT_ARCH, task="segmentation", listed=False,
                description="a Hugging Face semantic-segmentation architecture rebuilt from a checkpoint's config")
def from_config(config: dict[str, Any]) -> HFSegmentation:
    """The `hf` architecture: a randomly initialised model of this config (checkpoints then load the weights)."""
    cfg = config_from_dict(config)
    return HFSegmentation(_model_class(cfg).from_config(cfg))


def pretrained(path: str | Path, *, class_names: Sequence[str] | None = None,
               num_classes: int | None = None) -> HFSegmentation:
    """The `hf:PATH` architecture: the pretrained model in PATH, with a new classifier for `class_names` when they
    differ from the folder's labels (every other weight stays bit-identical to the folder's)."""
    folder = read_hf_folder(path)
    if not any((folder.path / f).exists() for f in WEIGHT_FILES):
        found = ", ".join(sorted(p.name for p in folder.path.iterdir())) or "nothing"
        raise ModelFormatError(f"{folder.path}: no model.safetensors (found {found}); save the model with "
                               "save_pretrained(folder), which writes safetensors")
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(folder.path, local_files_only=True)
    auto = _model_class(config)
    try:
        with _quiet_transformers():
            model = auto.from_pretrained(folder.path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFormatError(f"{folder.path}: transformers cannot load the model: {str(e).splitlines()[0]}") from e
    wrapped = HFSegmentation(model).eval()
    if class_names is None:
        if num_classes is not None and num_classes != config.num_labels:
            raise ModelFormatError(f"{folder.path}: the model has {config.num_labels} labels; give the names of the "
                                   f"{num_classes} new classes to replace its classifier")
        return wrapped
    class_names = tuple(class_names)
    if num_classes is not None and num_classes != len(class_names):
        raise ModelFormatError(f"num_classes {num_classes} does not match {len(class_names)} class names")
    if class_names == folder.class_names:
        return wrapped
    return replace_classifier(wrapped, class_names)


def replace_classifier(model: HFSegmentation, class_names: Sequence[str]) -> HFSegmentation:
    """A copy of `model` for `class_names`: new (randomly initialised) classifier layers, every other weight
    copied unchanged."""
    old_names = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
    head = classifier_keys(model.config)
    new = HFSegmentation(_model_class(model.config).from_config(with_labels(model.config, class_names)))
    kept = {k: v for k, v in model.state_dict().items() if k not in head}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    if set(missing) != head or unexpected:
        raise ModelFormatError(f"replacing the classifier of {model.config.model_type} left {sorted(missing)} "
                               f"unloaded and {sorted(unexpected)} unused")
    shapes = ", ".join(f"{k.removeprefix('hf.')} {tuple(model.state_dict()[k].shape)} -> "
                       f"{tuple(new.state_dict()[k].shape)}" for k in sorted(head))
    log.info("replaced the classifier of %s for %d classes (%s; the model had %d: %s): %s", model.config.model_type,
             len(class_names), ", ".join(class_names), len(old_names), ", ".join(old_names[:8])
             + (", ..." if len(old_names) > 8 else ""), shapes)
    return new.eval()


def load_folder(path: str | Path) -> tuple[dict[str, Any], HFSegmentation]:
    """A `save_pretrained` folder as (checkpoint, model): what export, `val seg` and `bench --torch` take in place
    of an edgepix checkpoint. The spec comes from the folder; the output stride from one forward pass."""
    from edgepix.runtime.description.spec import ModelSpec, Task, default_palette

    from .catalog import measure_output_stride

    folder = read_hf_folder(path)
    model = pretrained(folder.path)
    fields = spec_fields(folder)
    size = fields.pop("input_size", DEFAULT_INPUT_SIZE)
    try:
        stride = measure_output_stride(model, size)
    except RuntimeError as e:  # e.g. a ViT backbone that only takes square inputs
        raise ModelFormatError(f"{folder.path}: the model does not run at {size[0]}x{size[1]}, the image processor's "
                               f"size: {str(e).splitlines()[0]}") from e
    spec = ModelSpec(task=Task.SEGMENTATION, model_name=folder.path.resolve().name or folder.model_type,
                     input_size=size, output_stride=stride,
                     palette=default_palette(len(fields["class_names"])), **fields)
    arch, arch_kwargs = model.checkpoint_arch()
    ckpt = {"arch": arch, "arch_kwargs": arch_kwargs, "spec": spec, "model": model.state_dict(), "optimizer": None,
            "epoch": 0, "metrics": {}}
    return ckpt, model


def pretrained_entry(name: str) -> ModelEntry:
    """The registry entry for `hf:PATH`: the folder is read (and checked) now, the weights when the model is made."""
    folder = read_hf_folder(name[len(HF_PREFIX):])
    fields = {**spec_fields(folder), "model_name": folder.path.name or folder.model_type}
    return ModelEntry(name, lambda **kwargs: pretrained(folder.path, **kwargs), "segmentation",
                      description=f"pretrained {folder.model_type} from {folder.path}", spec_fields=fields,
                      takes_class_names=True)


register_prefix(HF_PREFIX, pretrained_entry)
