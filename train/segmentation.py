"""Segmentation training and evaluation.

`train_segmentation(config)` runs the whole job: check the data, build the model from the registry, train with
AdamW or SGD under a warm-up + cosine/poly schedule (per iteration), clip gradients, use AMP on CUDA, validate every
epoch (mIoU, per-class IoU, pixel accuracy over a confusion matrix summed across processes), and keep the run folder
up to date: `last.pt` and `best.pt` (atomic, with the ModelSpec inside), `metrics.csv`, `curves.png`, `train.log`.
`--resume` reloads `last.pt` and continues with the same optimizer, scheduler, scaler, EMA and RNG state; samples and
their augmentation are seeded by (seed, epoch, index), so a resumed run sees exactly the batches the uninterrupted
run would have seen.

Under `torchrun --nproc_per_node N` the same call uses DistributedDataParallel (gloo on CPU, NCCL on GPU); `batch`
is the global batch, split evenly over the processes, so a command means the same training at any N. Only rank 0
logs and writes files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from edgepix import __version__
from edgepix.plotting import pyplot, save_figure
from edgepix.runtime.core.cpuinfo import usable_cores
from edgepix.runtime.core.errors import DataError, EdgepixError, ModelFormatError
from edgepix.runtime.core.progress import progress_bar
from edgepix.runtime.description.spec import ModelSpec, Task

from .checkpoint import load_source, prepare_run, save_checkpoint
from .config import OptimizerKind, Schedule, SegTrainConfig
from .data import SegmentationDataset, SegmentationSource, SyntheticSource, collate, open_source
from .distributed import DistInfo, all_reduce_sum, barrier, dist_info_from_env
from .loop import (
    ModelEMA,
    broadcast_buffers,
    cpu_state,
    default_workers,
    gather_rng_states,
    resolve_device,
    restored_threads,
    seed_everything,
    training_process,
    worker_init,
    write_metrics_csv,
)
from .losses import LossKind, SegmentationLoss
from .metrics import SegmentationMeter, SegmentationMetrics
from .models.catalog import measure_output_stride
from .registry import checkpoint_arch, create_model, get_entry
from .transforms import EvalTransform, TrainTransform

log = logging.getLogger("edgepix.train")


# The options `--resume` may change; everything else comes from the checkpoint.
RESUME_OVERRIDABLE = ("device", "workers", "threads", "quiet", "out")


# ---- schedule, EMA -------------------------------------------------------------------------------------


def lr_factor(iteration: int, *, total: int, warmup: int, schedule: Schedule, warmup_start: float,
              min_ratio: float) -> float:
    """The learning rate at `iteration` as a fraction of the base rate: linear warm-up, then cosine or poly(0.9)."""
    if warmup > 0 and iteration < warmup:
        return warmup_start + (1.0 - warmup_start) * iteration / warmup
    t = min(1.0, (iteration - warmup) / max(1, total - warmup))
    if schedule is Schedule.COSINE:
        decay = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        decay = (1.0 - t) ** 0.9
    return min_ratio + (1.0 - min_ratio) * decay


# ---- helpers -------------------------------------------------------------------------------------------


def make_spec(arch: str, imgsz: tuple[int, int], source: SegmentationSource, *,
              model_fields: dict[str, Any] | None = None) -> ModelSpec:
    """The spec of a model trained on `source`: the dataset's classes, the model's own normalisation (a pretrained
    model's `model_fields`: its image processor's mean/std and scale; ImageNet's otherwise)."""
    c = source.classes
    fields = {k: v for k, v in (model_fields or {}).items()
              if k in ("model_name", "scale", "mean", "std", "channel_order")}
    fields.setdefault("model_name", arch)
    return ModelSpec(task=Task.SEGMENTATION, input_size=tuple(imgsz), class_names=c.names, palette=c.palette,
                     ignore_index=c.ignore_index, **fields)


def parameter_groups(model: nn.Module, cfg: SegTrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: no weight decay on BatchNorm/LayerNorm weights and biases, and for a pretrained model
    (one that names its classifier) every layer but the classifier at lr x `pretrained_lr_ratio`. The grouping
    depends only on the architecture, so a resumed run rebuilds the groups its optimizer state was saved with."""
    head_names = getattr(model, "head_parameter_names", None)
    head = head_names() if callable(head_names) else None
    by_kind: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        by_kind.setdefault((p.ndim <= 1, head is not None and name not in head), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
             "lr": cfg.lr * (cfg.pretrained_lr_ratio if pretrained else 1.0)}
            for (no_decay, pretrained), params in sorted(by_kind.items())]


def _frozen_parameters(model: nn.Module, cfg: SegTrainConfig) -> list[nn.Parameter]:
    """The backbone parameters `--freeze-epochs` holds still (none when it is 0)."""
    if cfg.freeze_epochs == 0:
        return []
    names = getattr(model, "backbone_parameter_names", None)
    backbone = names() if callable(names) else frozenset()
    if not backbone:
        raise EdgepixError(f"--freeze-epochs needs a pretrained model with a backbone (--model hf:PATH); "
                           f"{cfg.model} has none")
    return [p for n, p in model.named_parameters() if n in backbone]


# ---- evaluation ----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, meter: SegmentationMeter, device: torch.device, *,
             criterion: nn.Module | None = None, channels_last: bool = True, amp: bool = False,
             progress=None) -> tuple[SegmentationMetrics, float]:
    """Run `model` over `loader`; return (metrics reduced over all ranks, mean loss over the labelled pixels).

    Logits are computed at the model's input size and resized (bilinear) to each mask's own size before the argmax,
    so IoU is measured at the resolution of the labels, as a deployed model's output is used.
    """
    was_training = model.training
    model.eval()
    meter.reset()
    loss_sum, loss_n = 0.0, 0.0
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(images)
        logits = logits.float()
        masks_list = list(masks) if isinstance(masks, list) else None
        if masks_list is None and masks.shape[-2:] == logits.shape[-2:]:
            target = masks.to(device).long()
            meter.update(logits, target)
            if criterion is not None:
                loss_sum += float(criterion(logits, target)) * len(target)
                loss_n += len(target)
        else:
            for i, mask in enumerate(masks_list if masks_list is not None else masks):
                target = mask.to(device).long()[None]
                out = logits[i:i + 1]
                if out.shape[-2:] != target.shape[-2:]:
                    out = F.interpolate(out, size=target.shape[-2:], mode="bilinear", align_corners=False)
                meter.update(out, target)
                if criterion is not None:
                    loss_sum += float(criterion(out, target))
                    loss_n += 1
        if progress is not None:
            progress(len(images))
    meter.all_reduce()
    loss_sum, loss_n = all_reduce_sum([loss_sum, loss_n], device)
    model.train(was_training)
    return meter.compute(), (loss_sum / loss_n if loss_n else float("nan"))


# ---- the run folder ------------------------------------------------------------------------------------


def plot_curves(path: Path, history: list[dict[str, Any]]) -> bool:
    """Training loss and validation mIoU / pixel accuracy per epoch; False (and a note) without matplotlib."""
    plt = pyplot(path)
    if plt is None:
        return False
    epochs = [r["epoch"] for r in history]
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    if any(math.isfinite(r.get("val_loss", float("nan"))) for r in history):
        ax1.plot(epochs, [r.get("val_loss", float("nan")) for r in history], "s-", label="val loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.grid(True, alpha=0.3)
    ax1.legend()
    ax2.plot(epochs, [r.get("val_miou", float("nan")) for r in history], "o-", label="val mIoU")
    ax2.plot(epochs, [r.get("val_pixel_accuracy", float("nan")) for r in history], "s-", label="val pixel acc")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.grid(True, alpha=0.3)
    ax2.legend(loc="lower right")
    fig.suptitle(f"{path.parent.name}")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True


# ---- training ------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    epochs: int
    best_miou: float
    best_epoch: int
    final_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    images_per_s: float
    wall_s: float


def _open_sources(cfg: SegTrainConfig, info: DistInfo) -> tuple[SegmentationSource, SegmentationSource]:
    train_src = open_source(cfg.data, "train", seed=cfg.seed, synthetic_n=cfg.synthetic_n,
                            synthetic_val_n=cfg.synthetic_val_n, synthetic_size=cfg.imgsz)
    val_src = open_source(cfg.data, "val", seed=cfg.seed, synthetic_n=cfg.synthetic_n,
                          synthetic_val_n=cfg.synthetic_val_n, synthetic_size=cfg.imgsz)
    t0 = time.perf_counter()
    if isinstance(train_src, SyntheticSource):
        n = len(train_src) + len(val_src)
        with progress_bar(n, desc="render scenes", unit="scene", quiet=cfg.quiet or not info.is_main) as bar:
            for src in (train_src, val_src):
                src.pregenerate(workers=max(1, usable_cores() // info.local_world_size), progress=bar.update)
        if info.is_main:
            log.info("rendered %d training scenes and %d held-out scenes (seed %d) of %dx%d in %.1f s",
                     len(train_src), len(val_src), val_src.seed, *cfg.imgsz, time.perf_counter() - t0)
    else:
        if train_src.classes != val_src.classes:
            raise DataError(f"{cfg.data}: the train and val splits disagree on the classes")
        train_src.scan()
        val_src.scan()
        if info.is_main:
            log.info("checked %d training and %d validation pairs of %s in %.1f s (%d classes)", len(train_src),
                     len(val_src), cfg.data, time.perf_counter() - t0, train_src.classes.num_classes)
    return train_src, val_src


def train_segmentation(cfg: SegTrainConfig, *, resume: bool = False, exist_ok: bool = False,
                       on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult | None:
    """Train (or resume) a segmentation model; returns the result on rank 0 and None on the other ranks."""
    info = dist_info_from_env()
    cfg, ckpt, finished = prepare_run(cfg, resume=resume, exist_ok=exist_ok, overridable=RESUME_OVERRIDABLE,
                                      announce=info.is_main)
    if finished:
        return None
    if ckpt is None:
        get_entry(cfg.model)  # an unknown model name (or an unreadable hf: folder) fails before any data work

    device = resolve_device(cfg.device, info)
    with training_process(info, device, threads=cfg.threads, out=Path(cfg.out), quiet=cfg.quiet):
        return _SegmentationRun(cfg, info, device, ckpt).train(on_epoch_end)


class _SegmentationRun:
    """One training run, in the shape every edgepix trainer has: set-up (data, model, optimisation, restored
    state), then per epoch `train_one_epoch`, `validate` and a checkpoint."""

    def __init__(self, cfg: SegTrainConfig, info: DistInfo, device: torch.device, ckpt: dict[str, Any] | None):
        self.cfg, self.info, self.device, self.ckpt = cfg, info, device, ckpt
        self.main, self.out, self.wall0 = info.is_main, Path(cfg.out), time.perf_counter()
        if cfg.batch % info.world_size:
            raise EdgepixError(f"--batch {cfg.batch} must be divisible by the number of processes "
                               f"({info.world_size})")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic
        seed_everything(cfg.seed)
        train_src, val_src = _open_sources(cfg, info)
        self._model(train_src)
        self._data(train_src, val_src)
        self._optimisation()
        self._restore()

    # ---- set-up

    def _model(self, train_src: SegmentationSource) -> None:
        cfg, ckpt = self.cfg, self.ckpt
        if ckpt is not None:  # rebuilt from what the checkpoint recorded, so a pretrained model needs no folder now
            self.spec = ckpt["spec"]
            if self.spec.class_names != train_src.classes.names:
                raise DataError(f"{cfg.data}: classes {list(train_src.classes.names)} differ from the checkpoint's "
                                f"{list(self.spec.class_names)}; resume with the same data")
            self.arch, self.arch_kwargs = ckpt["arch"], ckpt["arch_kwargs"]
            model = create_model(self.arch, **self.arch_kwargs)
            model.load_state_dict(ckpt["model"])
        else:
            entry = get_entry(cfg.model)
            spec = make_spec(cfg.model, cfg.imgsz, train_src, model_fields=entry.spec_fields)
            kwargs = {**cfg.model_kwargs, "num_classes": spec.num_classes}
            if entry.takes_class_names:
                kwargs["class_names"] = spec.class_names
            model = create_model(cfg.model, **kwargs)
            self.arch, self.arch_kwargs = checkpoint_arch(model, cfg.model, kwargs)
            self.spec = spec.replace(output_stride=measure_output_stride(model, cfg.imgsz))
        self.frozen = _frozen_parameters(model, cfg)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(model, cfg.ema_decay) if cfg.ema else None
        if self.ema is not None and ckpt is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.updates = int(ckpt.get("ema_updates", 0))
        if self.info.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.net = self._wrap()
        torch.manual_seed(cfg.seed + 1000 * self.info.rank)  # dropout differs per rank; weights came from cfg.seed

    def _wrap(self) -> nn.Module:
        """The model as the training step calls it: DistributedDataParallel registers the parameters that need
        gradients, so it is made again when the backbone is frozen or unfrozen."""
        if not self.info.enabled:
            return self.model
        device = self.device
        return nn.parallel.DistributedDataParallel(self.model,
                                                   device_ids=[device.index] if device.type == "cuda" else None)

    def _data(self, train_src: SegmentationSource, val_src: SegmentationSource) -> None:
        cfg, info, spec = self.cfg, self.info, self.spec
        self.train_ds = SegmentationDataset(
            train_src, TrainTransform(cfg.imgsz, cfg.augment, ignore_index=spec.ignore_index,
                                      pad_value=spec.pad_value), spec, seed=cfg.seed)
        self.val_ds = SegmentationDataset(val_src, EvalTransform(cfg.imgsz), spec, seed=cfg.seed)
        self.per_rank_batch = cfg.batch // info.world_size
        if len(self.train_ds) < cfg.batch:
            raise DataError(f"{cfg.data}: {len(self.train_ds)} training samples is fewer than one batch "
                            f"({cfg.batch}); lower --batch or add data")
        self.sampler = DistributedSampler(self.train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
        self.workers = cfg.workers if cfg.workers is not None else default_workers(self.device, info)
        loader_kw = dict(num_workers=self.workers, collate_fn=collate, pin_memory=self.device.type == "cuda",
                         worker_init_fn=worker_init if self.workers else None)
        self.train_loader = DataLoader(self.train_ds, batch_size=self.per_rank_batch, sampler=self.sampler,
                                       drop_last=True, **loader_kw)
        val_part = Subset(self.val_ds, list(range(info.rank, len(self.val_ds), info.world_size)))
        self.val_loader = DataLoader(val_part, batch_size=max(1, self.per_rank_batch), shuffle=False, **loader_kw)
        self.iters_per_epoch = len(self.train_loader)

    def _optimisation(self) -> None:
        cfg, spec = self.cfg, self.spec
        groups = parameter_groups(self.model, cfg)
        if self.main and any(g["lr"] != cfg.lr for g in groups):
            at_lr = sum(p.numel() for g in groups if g["lr"] == cfg.lr for p in g["params"])
            frozen = sum(p.numel() for p in self.frozen)
            log.info("fine-tuning: the classifier's %d parameters at lr %g, the other %.2fM at lr x %g%s", at_lr,
                     cfg.lr, (sum(p.numel() for p in self.model.parameters()) - at_lr) / 1e6,
                     cfg.pretrained_lr_ratio,
                     f"; backbone ({frozen / 1e6:.2f}M) frozen for {cfg.freeze_epochs} epochs" if frozen else "")
        if cfg.optimizer is OptimizerKind.ADAMW:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
        total_iters = cfg.epochs * self.iters_per_epoch
        warmup_iters = min(int(round(cfg.warmup_epochs * self.iters_per_epoch)), total_iters // 2)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(
            it, total=total_iters, warmup=warmup_iters, schedule=cfg.schedule, warmup_start=cfg.warmup_start,
            min_ratio=cfg.min_lr_ratio))
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.criterion = SegmentationLoss(cfg.loss, ignore_index=spec.ignore_index, dice_weight=cfg.dice_weight)
        self.eval_criterion = SegmentationLoss(LossKind.CE, ignore_index=spec.ignore_index)
        self.meter = SegmentationMeter(spec.num_classes, ignore_index=spec.ignore_index, device=self.device)

    def _restore(self) -> None:
        """The resume state: optimizer, schedule, scaler, history, best so far and every rank's RNG."""
        self.start_epoch, self.history, self.best_miou, self.best_epoch = 0, [], -1.0, 0
        ckpt, info, device = self.ckpt, self.info, self.device
        if ckpt is None:
            return
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.use_amp and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"])
        self.history = list(ckpt.get("history", []))
        self.best_miou = float(ckpt.get("best_miou", -1.0))
        self.best_epoch = int(ckpt.get("best_epoch", 0))
        rng = ckpt.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"][info.rank] if info.rank < len(rng["torch"]) else rng["torch"][0])
        if device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][min(info.rank, len(rng["cuda"]) - 1)], device)

    def _announce(self) -> None:
        cfg, info, device = self.cfg, self.info, self.device
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("%s %s: %.2fM parameters, %d classes, input %dx%d; %d processes (%s), device %s, %d threads, "
                 "%d workers", "resuming" if self.ckpt else "training", cfg.model, n_params / 1e6,
                 self.spec.num_classes, *cfg.imgsz, info.world_size,
                 "gloo" if device.type == "cpu" else "nccl" if info.enabled else "-", device,
                 torch.get_num_threads(), self.workers)
        log.info("%d training samples, %d validation samples; batch %d (%d per process), %d iterations per epoch, "
                 "epochs %d-%d of %d", len(self.train_ds), len(self.val_ds), cfg.batch, self.per_rank_batch,
                 self.iters_per_epoch, self.start_epoch + 1, cfg.epochs, cfg.epochs)

    # ---- per epoch

    def _set_frozen(self, epoch: int) -> None:
        freeze = epoch < self.cfg.freeze_epochs
        if self.frozen and self.frozen[0].requires_grad == freeze:
            for p in self.frozen:
                p.requires_grad_(not freeze)
            self.net = self._wrap()
            if self.main:
                log.info("backbone %s from epoch %d", "frozen" if freeze else "unfrozen", epoch + 1)

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, device = self.cfg, self.device
        self._set_frozen(epoch)
        self.train_ds.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.net.train()
        loss_sum, loss_count, n_images = 0.0, 0, 0
        t0 = time.perf_counter()
        bar = progress_bar(self.iters_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
                           quiet=cfg.quiet or not self.main)
        with bar:
            for step, (images, masks) in enumerate(self.train_loader):
                images = images.to(device, non_blocking=True)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                masks = masks.to(device, non_blocking=True).long()
                loss = self._step(images, masks, epoch, step)
                loss_sum += float(loss.detach()) * len(images)
                loss_count += len(images)
                n_images += len(images) * self.info.world_size
                bar.update(1)
                if step % 5 == 0 or step == self.iters_per_epoch - 1:
                    rate = n_images / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"loss {loss_sum / loss_count:.4f} "
                                        f"lr {self.scheduler.get_last_lr()[0]:.2e} {rate:.1f} img/s")
        train_time = time.perf_counter() - t0
        loss_sum, loss_count = all_reduce_sum([loss_sum, float(loss_count)], device)
        return {"epoch": epoch + 1, "train_loss": loss_sum / max(loss_count, 1),
                "lr": self.optimizer.param_groups[0]["lr"], "train_images_per_s": n_images / max(train_time, 1e-9),
                "train_time_s": train_time, "train_images": n_images}

    def _step(self, images: torch.Tensor, masks: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        cfg = self.cfg
        with torch.autocast(self.device.type, enabled=self.use_amp):
            logits = self.net(images)
            loss = self.criterion(logits, masks)
        if not torch.isfinite(loss):
            raise EdgepixError(f"the loss became {loss.item()} at epoch {epoch + 1}, iteration {step + 1}; "
                               f"lower --lr (now {cfg.lr}) or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss

    def validate(self) -> tuple[SegmentationMetrics, dict[str, Any]]:
        """Metrics of the weights the checkpoint will hold (the EMA's when there is one), reduced over ranks."""
        t1 = time.perf_counter()
        if self.info.enabled:
            broadcast_buffers(self.model)
        eval_model = self.ema.module if self.ema is not None else self.model
        metrics, val_loss = evaluate(eval_model, self.val_loader, self.meter, self.device,
                                     criterion=self.eval_criterion, channels_last=self.cfg.channels_last,
                                     amp=self.use_amp)
        row = {"val_loss": val_loss, "val_miou": metrics.miou, "val_pixel_accuracy": metrics.pixel_accuracy,
               **{f"iou_{n}": v for n, v in zip(self.spec.class_names, metrics.iou)},
               "val_time_s": time.perf_counter() - t1}
        return metrics, row

    def _save(self, epoch: int, row: dict[str, Any], *, improved: bool, rng_states) -> None:
        state = self._checkpoint(epoch, row, rng_states)
        save_checkpoint(self.out / "last.pt", state)
        if improved:
            save_checkpoint(self.out / "best.pt", state)
        write_metrics_csv(self.out / "metrics.csv", self.history)
        plot_curves(self.out / "curves.png", self.history)

    def train(self, on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> TrainResult | None:
        cfg = self.cfg
        if self.main:
            self._announce()
        train_time_total, train_images_total = 0.0, 0
        metrics: SegmentationMetrics | None = None
        for epoch in range(self.start_epoch, cfg.epochs):
            row = self.train_one_epoch(epoch)
            train_time_total += row["train_time_s"]
            train_images_total += row.pop("train_images")
            validated = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
            if validated:
                metrics, val_row = self.validate()
                row.update(val_row)
            row["elapsed_s"] = time.perf_counter() - self.wall0
            # This process's CPU time: comparable between runs on a machine that other work shares.
            row["cpu_s"] = time.process_time()
            self.history.append(row)
            rng_states = gather_rng_states(self.info, self.device)
            improved = validated and metrics is not None and metrics.miou > self.best_miou
            if improved:
                self.best_miou, self.best_epoch = metrics.miou, epoch + 1
            if self.main:
                self._save(epoch + 1, row, improved=improved, rng_states=rng_states)
                log.info(_epoch_line(row, cfg.epochs, improved=improved))
            barrier()
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
        if not self.main:
            return None
        return self._summary(metrics, train_time_total, train_images_total)

    def _summary(self, metrics: SegmentationMetrics | None, train_time: float, train_images: int) -> TrainResult:
        cfg, out = self.cfg, self.out
        wall = time.perf_counter() - self.wall0
        throughput = train_images / max(train_time, 1e-9)
        if metrics is not None:
            per_class = "  ".join(f"{n} {v:.3f}" for n, v in zip(self.spec.class_names, metrics.iou))
            log.info("per-class IoU (epoch %d): %s", cfg.epochs, per_class)
        log.info("done: %d epochs in %.1f s (%.1f min); best val mIoU %.4f at epoch %d; training %.1f images/s; "
                 "checkpoints %s, %s", cfg.epochs, wall, wall / 60, self.best_miou, self.best_epoch, throughput,
                 out / "best.pt", out / "last.pt")
        final = self.history[-1] if self.history else {}
        return TrainResult(out, cfg.epochs, self.best_miou, self.best_epoch, final, self.history, throughput, wall)

    def _checkpoint(self, epoch: int, row: dict[str, Any], rng_states) -> dict[str, Any]:
        state = {
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "spec": self.spec,
            "model": cpu_state(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))},
            "best_miou": self.best_miou,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "train_config": self.cfg.to_dict(),
            "rng": rng_states,
            "world_size": self.info.world_size,
            "edgepix_version": __version__,
            "torch_version": str(torch.__version__),  # TorchVersion is not a plain str: weights_only refuses it
        }
        if self.ema is not None:
            state["ema"] = cpu_state(self.ema.module.state_dict())
            state["ema_updates"] = self.ema.updates
        if self.use_amp:
            state["scaler"] = self.scaler.state_dict()
        return state


def _epoch_line(row: dict[str, Any], epochs: int, *, improved: bool) -> str:
    line = (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  lr {row['lr']:.2e}  "
            f"{row['train_images_per_s']:.1f} img/s  ({row['train_time_s']:.0f} s)")
    if "val_miou" in row:
        line += (f"  val loss {row['val_loss']:.4f}  mIoU {row['val_miou']:.4f}  "
                 f"pixel acc {row['val_pixel_accuracy']:.4f}" + ("  *best*" if improved else ""))
    return line


# ---- evaluation of a checkpoint ------------------------------------------------------------------------


@dataclass
class EvalResult:
    checkpoint: str
    data: str
    split: str
    samples: int
    class_names: tuple[str, ...]
    metrics: SegmentationMetrics
    loss: float
    seconds: float


def evaluate_checkpoint(path: str | os.PathLike, data: str, *, split: str = "val", batch: int = 16,
                        device: str = "auto", workers: int = 0, synthetic_n: int = 200, quiet: bool = False,
                        prefer_ema: bool = True) -> EvalResult:
    """mIoU, per-class IoU and pixel accuracy of a checkpoint on a dataset ('synthetic': the held-out scenes)."""
    t0 = time.perf_counter()
    ckpt, model = load_source(path, use_ema=prefer_ema)
    spec: ModelSpec = ckpt["spec"]
    if spec.task is not Task.SEGMENTATION:
        raise ModelFormatError(f"{path}: a {spec.task.value} checkpoint; `val seg` needs a segmentation model")
    info = DistInfo()
    dev = resolve_device(device, info)
    with restored_threads():
        if dev.type == "cpu":
            torch.set_num_threads(usable_cores())
        return _evaluate_checkpoint(path, ckpt, model, spec, data, split, batch, dev, workers, synthetic_n, quiet, t0)


def _evaluate_checkpoint(path, ckpt, model, spec, data, split, batch, dev, workers, synthetic_n, quiet,
                         t0) -> EvalResult:
    if str(data) == "synthetic" and split == "train":
        seed = int(ckpt.get("train_config", {}).get("seed", 0))
        source: SegmentationSource = open_source("synthetic", "train", seed=seed, synthetic_n=synthetic_n,
                                                 synthetic_size=spec.input_size)
    else:
        source = open_source(data, split, synthetic_val_n=synthetic_n, synthetic_size=spec.input_size)
    if source.classes.names != spec.class_names:
        raise DataError(f"{data}: the dataset's classes {list(source.classes.names)} differ from the model's "
                        f"{list(spec.class_names)}")
    source.scan()
    model = model.to(dev).to(memory_format=torch.channels_last)
    dataset = SegmentationDataset(source, EvalTransform(spec.input_size), spec)
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate,
                        worker_init_fn=worker_init if workers else None)
    meter = SegmentationMeter(spec.num_classes, ignore_index=spec.ignore_index, device=dev)
    with progress_bar(len(dataset), desc="val", unit="img", quiet=quiet) as bar:
        metrics, loss = evaluate(model, loader, meter, dev, criterion=SegmentationLoss(ignore_index=spec.ignore_index),
                                 progress=bar.update)
    return EvalResult(str(path), str(data), split, len(dataset), spec.class_names, metrics, loss,
                      time.perf_counter() - t0)


def format_iou_table(result: EvalResult) -> str:
    m = result.metrics
    width = max(12, max(len(n) for n in result.class_names) + 2)
    lines = [f"{'class':<{width}}{'IoU':>8}{'pixels':>12}"]
    for name, iou, pixels in zip(result.class_names, m.iou, m.pixels):
        lines.append(f"{name:<{width}}{'n/a' if math.isnan(iou) else f'{iou:.4f}':>8}{pixels:>12}")
    lines.append(f"{'mIoU':<{width}}{m.miou:>8.4f}")
    lines.append(f"{'pixel acc':<{width}}{m.pixel_accuracy:>8.4f}")
    return "\n".join(lines)
