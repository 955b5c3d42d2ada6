"""PyTorch eager as a Backend, so the baseline runs through exactly the harness the exported models run through."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from edgepix.runtime.backends.base import Backend
from edgepix.runtime.description.spec import ONNX_METADATA_KEY, ModelSpec, Task
from edgepix.runtime.description.tensors import TensorMeta


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, checkpoint: str | os.PathLike, *, threads: int | None = None,
                 imgsz: tuple[int, int] | None = None) -> None:
        import torch

        from edgepix.train.checkpoint import load_source

        super().__init__(checkpoint)
        if threads is not None:
            torch.set_num_threads(threads)
        self._torch = torch
        ckpt, self.model = load_source(checkpoint)
        spec: ModelSpec = ckpt["spec"]
        if imgsz is not None and spec.task is not Task.GENERATION_NOISE:
            spec = spec.replace(input_size=tuple(imgsz))
        self._spec = spec
        if spec.task is Task.GENERATION_NOISE:
            in_shape: tuple = ("batch", spec.latent_size)
        else:
            in_shape = ("batch", 3, *spec.input_size)
        self.inputs = (TensorMeta(spec.input_name, np.dtype(np.float32), in_shape),)
        self.outputs = (TensorMeta(spec.output_name, np.dtype(np.float32), ("batch", None, None, None)),)
        self.metadata = {ONNX_METADATA_KEY: spec.to_json()}
        self.threads = torch.get_num_threads()

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def description(self) -> str:
        return f"torch {self._torch.__version__} eager ({self.threads} threads)"

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self._torch.from_numpy(feed[self.inputs[0].name])
        with self._torch.inference_mode():
            y = self.model(x)
        return {self.outputs[0].name: y.numpy()}

    def close_impl(self) -> None:
        del self.model
