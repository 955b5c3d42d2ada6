"""An edgepix model served by Triton Inference Server's Python backend: the edgepix runtime, with ONNX Runtime on the
CPU, inside the server. Written as REPO/NAME/1/model.py by `edgepix export ... --format triton --triton-backend
python`, beside the model's ONNX (model.onnx); config.pbtxt says what it does (its `edgepix.*` parameters):

    edgepix.io = frames    BGR uint8 frames in (`frames`, N x H x W x 3, any size): segmenters answer class maps at
                           the frame's size (`class_map`, N x H x W), image -> image generators images at the
                           frame's size (`image`, N x H x W x 3, BGR uint8). Pre- and post-processing run here,
                           from the spec: a client needs no edgepix, only a frame.
    edgepix.io = tensors   the ONNX's own inputs and outputs, as the onnxruntime backend would serve them (what
                           edgepix's `triton` backend sends).
    edgepix.threads        ONNX Runtime's intra-op threads in each instance (0: ONNX Runtime's default).

Requests that arrive together (dynamic batching) run as one batch. The server's Python needs the edgepix runtime
and ONNX Runtime (`pip install 'edgepix[cpu]'` into the Python that the server's backend stub is built for); this
file imports nothing else (no torch). It is not imported by edgepix itself: `triton_python_backend_utils` exists only
inside Triton.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from edgepix.runtime import ImageGenerator, Segmenter, load_backend
from edgepix.runtime.core.errors import EdgepixError
from edgepix.runtime.description.spec import ModelSpec, Task


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.io = parameters["edgepix.io"]
        threads = int(parameters.get("edgepix.threads", "0"))
        options = {"threads": threads} if threads > 0 else {}
        onnx = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        spec = ModelSpec.from_json(parameters["edgepix.spec"])
        self.output_types = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        self.segmenter = self.generator = self.backend = None
        if self.io == "tensors":
            self.backend = load_backend(onnx, "ort-cpu", **options)
        elif spec.task is Task.SEGMENTATION:
            self.segmenter = Segmenter.load(onnx, "ort-cpu", **options)
        else:
            self.generator = ImageGenerator.load(onnx, "ort-cpu", to_frame_size=True, **options)

    def execute(self, requests: list) -> list:
        if self.io == "tensors":
            return self._run_tensors(requests)
        return self._run_frames(requests)

    def _run_frames(self, requests: list) -> list:
        """Every request's frames in one batch (frames of any size: the runtime resizes them), answers split back."""
        frames, counts = [], []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, "frames").as_numpy()
            frames.extend(batch)
            counts.append(len(batch))
        try:
            if self.segmenter is not None:
                name, results = "class_map", [r.class_map for r in self.segmenter.segment_batch(frames)]
            else:
                name, results = "image", self.generator.generate_batch(frames)
        except EdgepixError as e:
            return [_failed(e) for _ in requests]
        answers, start = [], 0
        for n in counts:
            out = np.stack(results[start:start + n]).astype(self.output_types[name], copy=False)
            answers.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, out)]))
            start += n
        return answers

    def _run_tensors(self, requests: list) -> list:
        """The requests' tensors joined along the batch when their other dimensions agree, else one call each."""
        names = [t.name for t in self.backend.inputs]
        feeds = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in names} for r in requests]
        joinable = len(feeds) > 1 and all(
            {n: f[n].shape[1:] for n in names} == {n: feeds[0][n].shape[1:] for n in names} for f in feeds)
        try:
            if joinable:
                counts = [len(f[names[0]]) for f in feeds]
                joined = self.backend.infer({n: np.concatenate([f[n] for f in feeds]) for n in names})
                bounds = np.cumsum([0, *counts])
                outputs = [{k: v[a:b] for k, v in joined.items()} for a, b in zip(bounds[:-1], bounds[1:])]
            else:
                outputs = [self.backend.infer(f) for f in feeds]
        except EdgepixError as e:
            return [_failed(e) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(k, np.ascontiguousarray(v).astype(self.output_types[k], copy=False))
            for k, v in out.items() if k in self.output_types]) for out in outputs]

    def finalize(self) -> None:
        for owner in (self.segmenter, self.generator, self.backend):
            if owner is not None:
                owner.close()


def _failed(e: Exception):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
