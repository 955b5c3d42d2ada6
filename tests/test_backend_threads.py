"""Inference workers never share a backend that is not thread-safe: what each backend declares, the crash that one
ONNX Runtime IOBinding called from two threads gives (on the CPU provider, so it runs here), and the pipeline's
answer (a model instance per worker) checked on the same workload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from test_runtime_models import export, seg_spec, small_seg_net

from edgepix.runtime.backends import load_backend
from edgepix.runtime.backends.ort import OrtCudaBackend, OrtCudaOptions, OrtTensorrtBackend, OrtTensorrtOptions
from edgepix.runtime.streams.pipeline import WorkerPlan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A few convolutions at 96x96: long enough per call that two threads' calls overlap."""
    return export(small_seg_net(4), tmp_path_factory.mktemp("threads") / "net.onnx", torch.zeros(1, 3, 96, 96),
                  spec=seg_spec(input_size=(96, 96), classes=tuple("abcd")), dynamic_batch=True)


def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter: a crash there (a segmentation fault) is a result, not the end of the tests."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONFAULTHANDLER": ""})


def test_each_backend_declares_whether_two_threads_may_call_one_instance(model):
    from edgepix.runtime.backends.opencv import OpenCVBackend
    from edgepix.runtime.backends.openvino import OpenVINOBackend
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend
    from edgepix.runtime.backends.triton import TritonBackend

    assert (OpenCVBackend.thread_safe, OpenVINOBackend.thread_safe, TensorRTBackend.thread_safe) == (False,) * 3
    assert TritonBackend.thread_safe is True  # a tritonclient client per calling thread
    # ONNX Runtime: InferenceSession.run is thread-safe, an IOBinding is not; the options decide
    with load_backend(model, "ort-cpu") as plain, load_backend(model, "ort-cpu", io_binding=True) as bound:
        assert plain.thread_safe is True and bound.thread_safe is False
        assert "IOBinding" in bound.description and "IOBinding" not in plain.description
    for cls, options in ((OrtCudaBackend, OrtCudaOptions), (OrtTensorrtBackend, OrtTensorrtOptions)):
        assert cls.thread_safe.fget(types.SimpleNamespace(options=options())) is False  # IOBinding by default
        assert cls.thread_safe.fget(types.SimpleNamespace(options=options(io_binding=False))) is True


def test_the_worker_plan_says_whether_workers_share_the_model(model):
    from edgepix.runtime.tasks.segmenter import Segmenter

    plan = WorkerPlan("ort-cpu", 2, 1)
    with Segmenter.load(model, "ort-cpu", threads=1) as shared, \
            Segmenter.load(model, "ort-cpu", threads=1, io_binding=True) as bound:
        assert plan.for_processor(shared, can_load_more=True).instances == 1
        assert "sharing one model (its backend is thread-safe)" in plan.for_processor(
            shared, can_load_more=True).describe()
        each = plan.for_processor(bound, can_load_more=True)
        assert (each.workers, each.instances) == (2, 2)
        assert each.describe() == ("2 inference worker(s) x 1 thread(s), one model instance each (ort-cpu is not "
                                   "thread-safe; 2x the model's memory)")
        alone = plan.for_processor(bound, can_load_more=False)
        assert (alone.workers, alone.instances) == (1, 1)
        assert "(not 2: ort-cpu is not thread-safe and no second instance can be loaded" in alone.describe()
        assert WorkerPlan("ort-cpu", 1, 2).for_processor(bound, can_load_more=False).describe() == \
            "1 inference worker(s) x 2 thread(s)"


# Two threads call ONE backend instance that runs through an IOBinding, each with its own input, many times.
SHARED_BINDING = """
import json, sys, threading
import numpy as np
from edgepix.runtime.backends import load_backend

backend = load_backend(sys.argv[1], "ort-cpu", threads=1, io_binding=True)
rng = np.random.default_rng(0)
inputs = [rng.standard_normal((1, 3, 96, 96), dtype=np.float32) for _ in range(2)]
expected = [backend.infer(x)["output"] for x in inputs]
wrong = [0, 0]

def work(k):
    for _ in range(int(sys.argv[2])):
        if not np.array_equal(backend.infer(inputs[k], check=False)["output"], expected[k]):
            wrong[k] += 1

threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"wrong": wrong}))
"""


def test_one_iobinding_called_from_two_threads_crashes_or_mixes_results(model):
    """The hazard the pipeline avoids, documented: a segmentation fault (as on this 2-core machine, every time
    at 500 calls per thread), or results of the other thread's input."""
    done = run_child(SHARED_BINDING, str(model), "500")
    if done.returncode == 0:
        wrong = json.loads(done.stdout)["wrong"]
        assert sum(wrong) > 0, f"two threads on one IOBinding: no crash and no wrong result ({done.stdout})"
    else:
        assert done.returncode < 0, done.stderr[-2000:]  # killed by a signal (SIGSEGV), not a Python error


# The same two-thread workload through the pipeline's workers: `workers` of them, the model loaded with IOBinding.
# Every Segmenter.run call records (thread, backend) so the child can say which worker used which instance.
PIPELINE = """
import json, sys, threading
import numpy as np
from edgepix.runtime import RenderOptions, Segmenter
from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions
from edgepix.runtime.streams.sinks.base import Sink

model, frames, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
source = f"synthetic://?size=128x96&fps=0&frames={frames}&seed=5"
calls, lock = set(), threading.Lock()
run = Segmenter.run

def recording_run(self, tensor):
    with lock:
        calls.add((threading.current_thread().name, id(self.backend)))
    return run(self, tensor)

Segmenter.run = recording_run

class Keep(Sink):
    def __init__(self):
        super().__init__("keep://")
        self.images = {}

    def write(self, out):
        self.images[out.index] = out.image.copy()

def load(**options):
    return Segmenter.load(model, "ort-cpu", threads=1, render=RenderOptions(mode="mask"), **options)

def stream(processor, workers, factory=None):
    sink = Keep()
    stats = Pipeline(processor, [source], [sink], PipelineOptions(workers=workers),
                     processor_factory=factory).run()
    return sink.images, stats

with load() as seg:  # the reference: one worker, InferenceSession.run
    reference, _ = stream(seg, 1)
calls.clear()
with load(io_binding=True) as seg:
    images, stats = stream(seg, workers, lambda: load(io_binding=True))
threads_per_backend = {}
for thread, backend in calls:
    threads_per_backend.setdefault(backend, set()).add(thread)
print(json.dumps({
    "frames": len(images), "reference_frames": len(reference),
    "different": sorted(i for i in reference if i not in images or not np.array_equal(images[i], reference[i])),
    "workers": stats["config"]["workers"], "instances": stats["config"]["model_instances"],
    "threads_per_backend": sorted(len(t) for t in threads_per_backend.values()),
    "threads": len({thread for thread, _ in calls}),
}))
"""


def test_pipeline_workers_each_get_their_own_iobinding_and_match_one_thread(model):
    frames = 400
    done = run_child(PIPELINE, str(model), str(frames), "2")
    assert done.returncode == 0, (f"the two-worker pipeline crashed (exit {done.returncode}): the workers shared an "
                                  f"IOBinding\n{done.stderr[-2000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["reference_frames"] == got["frames"] == frames
    assert got["different"] == []  # every frame as the single-threaded run made it
    assert (got["workers"], got["instances"]) == (2, 2)
    assert got["threads"] == 2 and got["threads_per_backend"] == [1, 1]  # both workers ran, each on its own model


def test_without_a_factory_a_backend_that_is_not_thread_safe_runs_one_worker(model, caplog):
    from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions
    from edgepix.runtime.tasks.segmenter import Segmenter

    with Segmenter.load(model, "ort-cpu", threads=1, io_binding=True) as seg:
        pipeline = Pipeline(seg, ["synthetic://?size=64x48&fps=0&frames=30"], ["null://"], PipelineOptions(workers=2))
        stats = pipeline.run()
    assert stats["frames"] == 30 and (stats["config"]["workers"], stats["config"]["model_instances"]) == (1, 1)
    assert "no second instance can be loaded" in caplog.text


def test_a_copy_that_fails_to_load_closes_the_copies_loaded_before_it(model):
    from edgepix.runtime.core.errors import BackendError
    from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions
    from edgepix.runtime.tasks.segmenter import Segmenter

    copies = []

    def load():
        if copies:
            raise BackendError("out of memory for a third copy")
        copies.append(Segmenter.load(model, "ort-cpu", threads=1, io_binding=True))
        return copies[-1]

    with Segmenter.load(model, "ort-cpu", threads=1, io_binding=True) as seg:
        pipeline = Pipeline(seg, ["synthetic://?size=64x48&fps=0&frames=30"], ["null://"], PipelineOptions(workers=3),
                            processor_factory=load)
        with pytest.raises(BackendError, match="third copy"):
            pipeline.run()
        assert not seg.backend.closed  # the caller's
    assert len(copies) == 1 and copies[0].backend.closed
