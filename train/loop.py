"""What every edgepix trainer shares: the run folder and its log, devices and threads, seeds and RNG states,
the weights' EMA, data-loader workers and the metrics file. The segmentation trainer (segmentation.py) and the GAN
trainer (gan_trainer.py) have the same shape on top of it: set-up (data, models, optimisation, restored state),
then per epoch `train_one_epoch`, `validate` and a checkpoint."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepix.runtime.core.cpuinfo import usable_cores
from edgepix.runtime.core.errors import EdgepixError
from edgepix.runtime.core.fileio import atomic_write_text

from .distributed import DistInfo, init_distributed, shutdown_distributed

log = logging.getLogger("edgepix.train")


@contextlib.contextmanager
def restored_threads() -> Iterator[None]:
    """Give torch and OpenCV back the thread counts they had: a training run sets its own, and a caller (a test,
    a notebook) should not find them changed afterwards."""
    import cv2

    saved = torch.get_num_threads(), cv2.getNumThreads()
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        cv2.setNumThreads(saved[1])


@contextlib.contextmanager
def training_process(info: DistInfo, device: torch.device, *, threads: int | None, out: Path,
                     quiet: bool) -> Iterator[None]:
    """What a training run holds while it runs: torch's CPU threads (`threads`, or this process's share of the
    cores), OpenCV on one thread, the process group of a torchrun job and the run folder's log; all given back
    afterwards. Augmentation runs one sample per call on small images: OpenCV's own threads would only fight the
    training threads (and a forked DataLoader worker must not touch OpenCV's thread pool)."""
    import cv2

    with restored_threads():
        if device.type == "cpu":
            torch.set_num_threads(threads or max(1, usable_cores() // info.local_world_size))
        cv2.setNumThreads(1)
        init_distributed(info, device)
        try:
            with run_log(out, quiet=quiet, main=info.is_main):
                yield
        finally:
            shutdown_distributed()


class ModelEMA:
    """Exponential moving average of the weights (timm/YOLO style: the decay ramps up over the first updates)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / 2000))
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[name].detach(), alpha=1 - d)
            else:
                value.copy_(source[name])

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates}


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EdgepixError("--device cuda: this PyTorch has no usable CUDA device (CPU build or no GPU); "
                               "use --device cpu")
        return torch.device("cuda", info.local_rank if info.enabled else (torch.device(name).index or 0))
    if name != "cpu":
        raise EdgepixError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device("cpu")


def default_workers(device: torch.device, info: DistInfo) -> int:
    """Loader processes per training process. On a CPU with few cores per process, loading in the training process
    is faster: a worker process takes cycles from the training threads (measured on 2 cores: 22 img/s with none,
    16-20 img/s with one)."""
    cores = max(1, usable_cores() // info.local_world_size)
    if device.type == "cuda":
        return min(4, cores)
    return 0 if cores <= 4 else 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_init(_: int) -> None:
    # OpenCV's thread count is set to 1 in the parent before the workers fork: calling cv2.setNumThreads in a
    # forked child can deadlock on the parent's thread-pool state.
    torch.set_num_threads(1)


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


@contextlib.contextmanager
def run_log(out: Path, *, quiet: bool, main: bool) -> Iterator[None]:
    """Create the run folder and send the run's log lines to out/train.log (rank 0 only; other ranks log nothing
    to files). With `quiet` the lines go only to the file, not to the console."""
    if not main:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if quiet:
        log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(saved[0])
        log.propagate = saved[1]


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics (the ones rank 0 saves), so validation on every shard uses the
    weights of the checkpoint and the reduced metrics are those of the saved model."""
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def gather_rng_states(info: DistInfo, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Every rank's torch (and CUDA) RNG state, gathered on all ranks so rank 0 can save them."""
    states = {"torch": [torch.get_rng_state()]}
    if device.type == "cuda":
        states["cuda"] = [torch.cuda.get_rng_state(device)]
    if not info.enabled:
        return states
    gathered: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, {k: v[0] for k, v in states.items()})
    return {k: [g[k] for g in gathered] for k in states}


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
