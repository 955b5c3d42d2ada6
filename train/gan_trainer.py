"""GAN training: DCGAN (noise -> image) and pix2pix (image -> image), built like the segmentation trainer.

`train_gan(config)` runs the whole job: open the data, build the generator and discriminator from the registry,
train them in alternation with Adam(2e-4, beta1 = 0.5) under one of the GAN objectives (vanilla, lsgan, hinge; for
pix2pix plus lambda * L1 with lambda = 100), optionally keep an EMA of the generator, and keep the run folder up to
date after every epoch: `last.pt` (and, for pix2pix, `best.pt` by validation L1), atomic, with the ModelSpec inside;
`samples/epoch_NNN.png` (a fixed-noise grid for DCGAN; rows of input | output | target for pix2pix), `metrics.csv`,
`curves.png` and `train.log`.

One iteration: the discriminator sees the fake batch and then the real batch, each back-propagated on its own (as
the DCGAN reference does, so that BatchNorm statistics are never mixed across real and fake), one Adam step; then
the generator's loss goes through the discriminator with the discriminator's parameters frozen, one Adam step, and
the EMA update. Every loss is checked before it is back-propagated: a NaN or Inf stops training with a message that
names the loss, the epoch and the iteration, and no weights are updated or written after it, so `last.pt` stays the
last good epoch. Weights are also checked before each checkpoint.

`--resume` reloads `last.pt` and continues with the same optimizers, EMA and RNG states; samples and their
augmentation are seeded by (seed, epoch, index), so the resumed run sees the batches the uninterrupted run would.
Under `torchrun --nproc_per_node N` both networks use DistributedDataParallel (gloo on CPU, NCCL on GPU) with a
distributed sampler; `batch` is global; only rank 0 logs and writes; the NaN decision and the time limit are
collective. The generator step calls the discriminator's inner module, so DDP synchronises the discriminator only
in its own step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from edgepix import __version__
from edgepix.plotting import pyplot, save_figure
from edgepix.runtime.core.cpuinfo import usable_cores
from edgepix.runtime.core.errors import DataError, EdgepixError
from edgepix.runtime.core.fileio import atomic_write_bytes
from edgepix.runtime.core.progress import progress_bar
from edgepix.runtime.data.metrics import psnr
from edgepix.runtime.description.spec import ChannelOrder, ModelSpec, OutputKind, Task
from edgepix.runtime.tasks.generator import tile_grid

from .checkpoint import prepare_run, save_checkpoint
from .config import GanKind, GANMode, GanTrainConfig
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_flag,
    dist_info_from_env,
)
from .gan_data import PairedDataset, UnconditionalDataset, open_image_source, open_pair_source, pregenerate
from .gan_losses import GANLoss, pix2pix_generator_loss
from .loop import (
    ModelEMA,
    cpu_state,
    gather_rng_states,
    resolve_device,
    seed_everything,
    training_process,
    worker_init,
    write_metrics_csv,
)
from .models.pix2pix import VARIANTS
from .registry import create_model, get_entry

log = logging.getLogger("edgepix.train")


class TrainingDiverged(EdgepixError):
    """A loss or a weight became NaN or Inf; the run folder keeps the last good checkpoint."""


# The options `--resume` may change; everything else comes from the checkpoint.
RESUME_OVERRIDABLE = ("device", "workers", "quiet", "out", "time_limit", "epochs")


# ---- models and specs ----------------------------------------------------------------------------------


def generator_kwargs(cfg: GanTrainConfig) -> dict[str, Any]:
    kw = dict(cfg.model_kwargs)
    if cfg.kind is GanKind.DCGAN:
        kw.setdefault("latent_size", cfg.latent_size)
        kw.setdefault("image_size", cfg.imgsz)
    elif cfg.model == "pix2pix":
        kw.setdefault("variant", "unet_128" if cfg.imgsz <= 128 else "unet_256")
    return kw


def discriminator_kwargs(cfg: GanTrainConfig) -> dict[str, Any]:
    kw = dict(cfg.discriminator_kwargs)
    if cfg.kind is GanKind.DCGAN and cfg.discriminator == "dcgan_d":
        kw.setdefault("image_size", cfg.imgsz)
    return kw


def check_models_fit(cfg: GanTrainConfig) -> None:
    """Fail in one line, before data is made or a model is trained, when --imgsz or the model arguments do not fit
    the models (otherwise the first forward pass ends in a convolution or BatchNorm traceback)."""
    g_kwargs = generator_kwargs(cfg)
    variant = g_kwargs.get("variant", "unet_256")
    if cfg.model == "pix2pix" and variant in VARIANTS:
        need = 2 ** VARIANTS[variant]  # each of the U-Net's stride-2 stages halves the image, down to 1x1
        if cfg.imgsz % need:
            hint = "128 or 256" if variant == "unet_128" else str(max(need, round(cfg.imgsz / need) * need))
            raise EdgepixError(
                f"--imgsz {cfg.imgsz} does not fit the pix2pix {variant} U-Net: it halves the image "
                f"{VARIANTS[variant]} times, so the size must be a multiple of {need} (at least {need}); "
                f"use --imgsz {hint}")
    # The constructors check their own arguments (dcgan: image_size in 32/64/128); on the meta device building
    # the models costs no memory and no time.
    for role, name, kwargs in (("generator", cfg.model, g_kwargs),
                               ("discriminator", cfg.discriminator, discriminator_kwargs(cfg))):
        try:
            with torch.device("meta"):
                create_model(name, **kwargs)
        except (ValueError, TypeError) as e:
            raise EdgepixError(f"the {role} {name!r} cannot be built with --imgsz {cfg.imgsz} and "
                               f"{kwargs}: {e}") from e


def make_gan_spec(cfg: GanTrainConfig, arch_kwargs: dict[str, Any], classes=None) -> ModelSpec:
    """The spec of the generator: RGB, scale 1/255, mean = std = 0.5 (so [-1, 1]), output tanh in [-1, 1]."""
    common = dict(model_name=cfg.model, input_size=(cfg.imgsz, cfg.imgsz), channel_order=ChannelOrder.RGB,
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), output_range=(-1.0, 1.0), output_kind=OutputKind.IMAGE)
    if cfg.kind is GanKind.DCGAN:
        return ModelSpec(task=Task.GENERATION_NOISE, input_name="noise", output_name="images",
                         latent_size=int(arch_kwargs.get("latent_size", cfg.latent_size)), **common)
    n_downs = VARIANTS.get(arch_kwargs.get("variant", ""), 0)
    extra: dict[str, Any] = {}
    if classes is not None:  # mask -> image: the input is a palette-coloured mask of these classes
        extra = dict(class_names=classes.names, palette=classes.palette, ignore_index=classes.ignore_index)
    return ModelSpec(task=Task.GENERATION_IMAGE, input_name="images", output_name="images_out",
                     size_divisor=2**n_downs if n_downs else 32, **common, **extra)


def set_requires_grad(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def weights_finite(*models: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for m in models for t in m.state_dict().values()
               if t.dtype.is_floating_point)


def to_uint8_bgr(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) RGB in [-1, 1] -> (N, H, W, 3) BGR uint8 (the runtime's rounding)."""
    y = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5 + 0.5).to(torch.uint8)
    return np.ascontiguousarray(y.permute(0, 2, 3, 1).numpy()[..., ::-1])


def write_png(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise EdgepixError(f"cannot encode {path}")
    atomic_write_bytes(path, data.tobytes())


def plot_gan_curves(path: Path, history: list[dict[str, Any]], kind: GanKind) -> bool:
    """Discriminator and generator losses per epoch (and validation L1 / PSNR for pix2pix)."""
    plt = pyplot(path)
    if plt is None:
        return False
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["loss_d"] for r in history], "o-", label="D loss")
    ax1.plot(epochs, [r["loss_g_gan"] for r in history], "s-", label="G adversarial loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.grid(True, alpha=0.3)
    ax1.legend()
    if kind is GanKind.PIX2PIX:
        ax2.plot(epochs, [r["loss_l1"] for r in history], "o-", label="train L1 ([-1, 1] units)")
        ax2.plot(epochs, [r.get("val_l1", float("nan")) for r in history], "s-", label="val L1 ([-1, 1] units)")
        ax2.set_ylabel("L1")
        ax3 = ax2.twinx()
        ax3.plot(epochs, [r.get("val_psnr", float("nan")) for r in history], "^-", color="tab:green",
                 label="val PSNR (dB)")
        ax3.set_ylabel("PSNR (dB)")
        ax3.legend(loc="upper right")
        ax2.legend(loc="upper left")
    else:
        ax2.plot(epochs, [r["d_real"] for r in history], "o-", label="D(real)")
        ax2.plot(epochs, [r["d_fake"] for r in history], "s-", label="D(G(z))")
        ax2.set_ylabel("discriminator output (probability for vanilla, score otherwise)")
        ax2.legend()
    ax2.set_xlabel("epoch")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(path.parent.name)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True


# ---- the run -------------------------------------------------------------------------------------------


@dataclass
class GanTrainResult:
    out: Path
    epochs: int
    final_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    images_per_s: float
    wall_s: float
    stopped_early: bool


def train_gan(cfg: GanTrainConfig, *, resume: bool = False, exist_ok: bool = False,
              on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> GanTrainResult | None:
    """Train (or resume) a GAN; returns the result on rank 0 and None on the other ranks."""
    info = dist_info_from_env()
    cfg, ckpt, finished = prepare_run(cfg, resume=resume, exist_ok=exist_ok, overridable=RESUME_OVERRIDABLE,
                                      kind=cfg.kind.value, announce=info.is_main)
    if finished:
        return None
    for name, task in ((cfg.model, cfg.kind is GanKind.DCGAN and "generation-noise" or "generation-image"),
                       (cfg.discriminator, "discriminator")):
        entry = get_entry(name)
        if entry.task != task:
            raise EdgepixError(f"{name} is a {entry.task} model; {cfg.kind.value} needs a {task} model here")
    check_models_fit(cfg)

    device = resolve_device(cfg.device, info)
    with training_process(info, device, threads=None, out=Path(cfg.out), quiet=cfg.quiet):
        return _Run(cfg, info, device, ckpt).train(on_epoch_end)


class _Run:
    def __init__(self, cfg: GanTrainConfig, info: DistInfo, device: torch.device, ckpt: dict[str, Any] | None):
        self.cfg, self.info, self.device, self.ckpt = cfg, info, device, ckpt
        self.main = info.is_main
        self.out = Path(cfg.out)
        self.wall0 = time.perf_counter()
        if cfg.batch % info.world_size:
            raise EdgepixError(f"--batch {cfg.batch} must be divisible by the number of processes ({info.world_size})")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)
        self._data()
        self._models()

    # ---- setup

    def _data(self) -> None:
        cfg, info = self.cfg, self.info
        size = (cfg.imgsz, cfg.imgsz)
        t0 = time.perf_counter()
        workers = max(1, usable_cores() // info.local_world_size)
        self.classes = None
        if cfg.kind is GanKind.DCGAN:
            train_src = open_image_source(cfg.data, "train", seed=cfg.seed, synthetic_n=cfg.synthetic_n,
                                          synthetic_val_n=cfg.synthetic_val_n, size=size, appearance=cfg.scenes)
            pregenerate(train_src, workers=workers)
            self.val_src = None
        else:
            train_src = open_pair_source(cfg.data, "train", seed=cfg.seed, synthetic_n=cfg.synthetic_n,
                                         synthetic_val_n=cfg.synthetic_val_n, size=size, direction=cfg.direction,
                                         appearance=cfg.scenes)
            self.val_src = open_pair_source(cfg.data, "val", seed=cfg.seed, synthetic_n=cfg.synthetic_n,
                                            synthetic_val_n=min(cfg.synthetic_val_n, cfg.val_n), size=size,
                                            direction=cfg.direction, appearance=cfg.scenes)
            pregenerate(train_src, workers=workers)
            pregenerate(self.val_src, workers=workers)
            self.classes = train_src.classes if train_src.a_is_label else None
        self.train_src = train_src
        if len(train_src) < cfg.batch:
            raise DataError(f"{cfg.data}: {len(train_src)} training samples is fewer than one batch ({cfg.batch}); "
                            "lower --batch or add data")
        if self.main:
            log.info("data: %s, %d training samples%s (%.1f s)", train_src.description, len(train_src),
                     f", {len(self.val_src)} validation pairs" if self.val_src is not None else "",
                     time.perf_counter() - t0)

    def _models(self) -> None:
        cfg, info, device, ckpt = self.cfg, self.info, self.device, self.ckpt
        self.g_kwargs = generator_kwargs(cfg)
        self.d_kwargs = discriminator_kwargs(cfg)
        self.spec = make_gan_spec(cfg, self.g_kwargs, self.classes)
        self.G = create_model(cfg.model, **self.g_kwargs)
        self.D = create_model(cfg.discriminator, **self.d_kwargs)
        if ckpt is not None:
            self.G.load_state_dict(ckpt["model"])
            self.D.load_state_dict(ckpt["discriminator"]["model"])
        self.G.to(device)
        self.D.to(device)
        self.ema = ModelEMA(self.G, cfg.ema_decay) if cfg.ema else None
        if self.ema is not None and ckpt is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.updates = int(ckpt.get("ema_updates", 0))
        if info.enabled and device.type == "cuda":
            self.G = nn.SyncBatchNorm.convert_sync_batchnorm(self.G)
            self.D = nn.SyncBatchNorm.convert_sync_batchnorm(self.D)
        ids = [device.index] if device.type == "cuda" else None
        self.g_net = nn.parallel.DistributedDataParallel(self.G, device_ids=ids) if info.enabled else self.G
        self.d_net = nn.parallel.DistributedDataParallel(self.D, device_ids=ids) if info.enabled else self.D
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d or cfg.lr, betas=betas)
        self.gan = GANLoss(cfg.gan_mode)
        self.d_scale = 0.5 if cfg.kind is GanKind.PIX2PIX else 1.0
        self.start_epoch, self.history, self.best_val_l1 = 0, [], float("inf")
        torch.manual_seed(cfg.seed + 1000 * info.rank)  # noise and dropout differ per rank
        if ckpt is not None:
            self.opt_g.load_state_dict(ckpt["optimizer"]["generator"])
            self.opt_d.load_state_dict(ckpt["optimizer"]["discriminator"])
            self.start_epoch = int(ckpt["epoch"])
            self.history = list(ckpt.get("history", []))
            self.best_val_l1 = float(ckpt.get("best_val_l1", float("inf")))
            rng = ckpt.get("rng", {})
            if "torch" in rng:
                torch.set_rng_state(rng["torch"][info.rank] if info.rank < len(rng["torch"]) else rng["torch"][0])
            if device.type == "cuda" and rng.get("cuda"):
                torch.cuda.set_rng_state(rng["cuda"][min(info.rank, len(rng["cuda"]) - 1)], device)

    def _loader(self):
        cfg, info, device = self.cfg, self.info, self.device
        if cfg.kind is GanKind.DCGAN:
            dataset = UnconditionalDataset(self.train_src, self.spec, flip=cfg.flip, seed=cfg.seed)
        else:
            dataset = PairedDataset(self.train_src, self.spec, train=True, load_size=cfg.load_size, flip=cfg.flip,
                                    seed=cfg.seed)
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
        workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 0)
        loader = DataLoader(dataset, batch_size=cfg.batch // info.world_size, sampler=sampler, drop_last=True,
                            num_workers=workers, pin_memory=device.type == "cuda",
                            worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0)
        return dataset, sampler, loader

    # ---- checks

    def _check(self, name: str, loss: torch.Tensor, epoch: int, step: int) -> None:
        bad = 0.0 if bool(torch.isfinite(loss.detach())) else 1.0
        if self.info.enabled:
            bad = all_reduce_sum([bad], self.device)[0]
        if bad:
            raise TrainingDiverged(self._diverged_message(f"{name} became {float(loss.detach())}", epoch, step))

    def _diverged_message(self, what: str, epoch: int, step: int | None) -> str:
        where = f"epoch {epoch + 1}" + (f", iteration {step + 1}" if step is not None else "")
        last = self.out / "last.pt"
        kept = (f"the last good checkpoint {last} (epoch {self.history[-1]['epoch']}) is kept"
                if self.history and last.exists() else "no checkpoint was written (no epoch had finished)")
        return (f"{what} at {where}; training stopped before updating the weights with it, and {kept}. Lower --lr "
                f"(now {self.cfg.lr:g}), try --gan-mode lsgan or hinge, or check the data")

    # ---- one iteration

    def _step(self, batch, epoch: int, step: int) -> dict[str, float]:
        cfg, device = self.cfg, self.device
        gan, D = self.gan, self.d_net
        conditional = cfg.kind is GanKind.PIX2PIX
        if conditional:
            real_a, real_b = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            fake_b = self.g_net(real_a)
            real_in, fake_in = torch.cat([real_a, real_b], 1), torch.cat([real_a, fake_b], 1)
        else:
            real_b = batch.to(device, non_blocking=True)
            z = torch.randn(real_b.shape[0], self.spec.latent_size, device=device)
            fake_b = self.g_net(z)
            real_in, fake_in = real_b, fake_b

        # discriminator: fake then real, each back-propagated on its own
        set_requires_grad(self.D, True)
        self.opt_d.zero_grad(set_to_none=True)
        pred_fake = D(fake_in.detach())
        loss_d_fake = gan.d_fake(pred_fake) * self.d_scale
        self._check("the discriminator's loss on fake images", loss_d_fake, epoch, step)
        loss_d_fake.backward()
        pred_real = D(real_in)
        loss_d_real = gan.d_real(pred_real) * self.d_scale
        self._check("the discriminator's loss on real images", loss_d_real, epoch, step)
        loss_d_real.backward()
        self.opt_d.step()

        # generator, through the discriminator's inner module with its parameters frozen
        set_requires_grad(self.D, False)
        self.opt_g.zero_grad(set_to_none=True)
        pred = self.D(fake_in)
        if conditional:
            loss_g, loss_g_gan, loss_l1 = pix2pix_generator_loss(gan, pred, fake_b, real_b, lambda_l1=cfg.lambda_l1)
        else:
            loss_g = loss_g_gan = gan.g_loss(pred)
            loss_l1 = torch.zeros(())
        self._check("the generator's loss", loss_g, epoch, step)
        loss_g.backward()
        self.opt_g.step()
        set_requires_grad(self.D, True)
        if self.ema is not None:
            self.ema.update(self.G)

        link = torch.sigmoid if cfg.gan_mode is GANMode.VANILLA else (lambda t: t)
        return {"loss_d": float(loss_d_fake.detach() + loss_d_real.detach()), "loss_g": float(loss_g.detach()),
                "loss_g_gan": float(loss_g_gan.detach()), "loss_l1": float(loss_l1.detach()),
                "d_real": float(link(pred_real.detach().float()).mean()),
                "d_fake": float(link(pred_fake.detach().float()).mean())}

    # ---- the loop

    def train(self, on_epoch_end) -> GanTrainResult | None:
        cfg, info, main = self.cfg, self.info, self.main
        dataset, sampler, loader = self._loader()
        iters = len(loader)
        if main:
            n_g = sum(p.numel() for p in self.G.parameters())
            n_d = sum(p.numel() for p in self.D.parameters())
            log.info("%s %s %s(%s) %.2fM + %s %.2fM parameters, %s loss%s, %dx%d; %d processes, device %s, "
                     "%d threads; batch %d, %d iterations per epoch, epochs %d-%d of %d",
                     "resuming" if self.ckpt else "training", cfg.kind.value, cfg.model,
                     ", ".join(f"{k}={v}" for k, v in self.g_kwargs.items()), n_g / 1e6, cfg.discriminator, n_d / 1e6,
                     cfg.gan_mode.value, f" + {cfg.lambda_l1:g} L1" if cfg.kind is GanKind.PIX2PIX else "",
                     cfg.imgsz, cfg.imgsz, info.world_size, self.device, torch.get_num_threads(), cfg.batch, iters,
                     self.start_epoch + 1, cfg.epochs, cfg.epochs)
        self.train_t0 = time.perf_counter()
        train_time_total, images_total, stopped = 0.0, 0, False
        for epoch in range(self.start_epoch, cfg.epochs):
            row, stopped = self.train_one_epoch(epoch, dataset, sampler, loader)
            train_time_total += row["train_time_s"]
            images_total += row.pop("train_images")
            train_time = row["train_time_s"]
            improved = False
            if main:
                row.update(self.validate(epoch))
                if "val_l1" in row and row["val_l1"] < self.best_val_l1:
                    self.best_val_l1, improved = row["val_l1"], True
            row["elapsed_s"] = time.perf_counter() - self.wall0
            self.history.append(row)
            rng_states = gather_rng_states(info, self.device)
            if main:
                state = self._checkpoint(epoch + 1, row, rng_states)
                save_checkpoint(self.out / "last.pt", state)
                if improved:
                    save_checkpoint(self.out / "best.pt", state)
                write_metrics_csv(self.out / "metrics.csv", self.history)
                plot_gan_curves(self.out / "curves.png", self.history, cfg.kind)
                message = (f"epoch {epoch + 1}/{cfg.epochs}  D {row['loss_d']:.4f}  G {row['loss_g']:.4f} "
                           f"(adv {row['loss_g_gan']:.4f})  D(real) {row['d_real']:.3f}  D(fake) {row['d_fake']:.3f}  "
                           f"{row['train_images_per_s']:.1f} img/s ({train_time:.0f} s)")
                if "val_l1" in row:
                    message += (f"  val L1 {row['val_l1']:.4f}  PSNR {row['val_psnr']:.2f} dB"
                                + ("  *best*" if improved else ""))
                if stopped:
                    message += f"  [time limit {cfg.time_limit:g} min reached]"
                log.info(message)
            barrier()
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
            if stopped:
                break
        if not main:
            return None
        wall = time.perf_counter() - self.wall0
        throughput = images_total / max(train_time_total, 1e-9)
        last = self.history[-1] if self.history else {}
        log.info("done: %d epochs in %.1f s (%.1f min)%s; training %.1f images/s; checkpoint %s",
                 int(last.get("epoch", 0)), wall, wall / 60, " (stopped by --time-limit)" if stopped else "",
                 throughput, self.out / "last.pt")
        return GanTrainResult(self.out, int(last.get("epoch", 0)), last, self.history, throughput, wall, stopped)

    # ---- per epoch: training, samples and validation, checkpoint

    def train_one_epoch(self, epoch: int, dataset, sampler, loader) -> tuple[dict[str, Any], bool]:
        """One pass over the data: the epoch's row (mean losses, speed) and whether --time-limit stopped it."""
        cfg = self.cfg
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        self.g_net.train()
        self.d_net.train()
        sums: dict[str, float] = {}
        n_steps, n_images, stopped = 0, 0, False
        iters = len(loader)
        t0 = time.perf_counter()
        with progress_bar(iters, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
                          quiet=cfg.quiet or not self.main) as bar:
            for step, batch in enumerate(loader):
                values = self._step(batch, epoch, step)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_steps += 1
                n_images += cfg.batch
                bar.update(1)
                if step % 5 == 0 or step == iters - 1:
                    rate = n_images / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"D {sums['loss_d'] / n_steps:.3f} G {sums['loss_g'] / n_steps:.3f} "
                                        f"{rate:.1f} img/s")
                if cfg.time_limit is not None:
                    over = (time.perf_counter() - self.train_t0) / 60.0 >= cfg.time_limit
                    if broadcast_flag(over, self.device):
                        stopped = True
                        break
        train_time = time.perf_counter() - t0
        keys = sorted(sums)
        reduced = all_reduce_sum([sums[k] for k in keys] + [float(n_steps)], self.device)
        means = {k: reduced[i] / max(reduced[-1], 1) for i, k in enumerate(keys)}
        if not weights_finite(self.G, self.D):
            raise TrainingDiverged(self._diverged_message("a weight became NaN or Inf", epoch, None))
        row: dict[str, Any] = {"epoch": epoch + 1, **means, "iterations": n_steps,
                               "train_images_per_s": n_images / max(train_time, 1e-9), "train_time_s": train_time,
                               "train_images": n_images}
        if stopped:
            row["stopped_early"] = 1
        return row, stopped

    def _sample_model(self) -> nn.Module:
        return (self.ema.module if self.ema is not None else self.G).eval()

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, Any]:
        """Samples of the epoch (a grid PNG) and, for pix2pix, L1 and PSNR on the validation pairs."""
        cfg, device = self.cfg, self.device
        model = self._sample_model()
        row: dict[str, Any] = {}
        try:
            if cfg.kind is GanKind.DCGAN:
                g = torch.Generator().manual_seed(cfg.seed)
                z = torch.randn(cfg.sample_n, self.spec.latent_size, generator=g).to(device)
                images = to_uint8_bgr(model(z))
                grid = tile_grid(list(images), cols=max(1, int(math.ceil(math.sqrt(len(images))))))
            else:
                ds = PairedDataset(self.val_src, self.spec, train=False)
                n = min(cfg.val_n, len(ds))
                l1_sum, psnr_sum, rows = 0.0, 0.0, []
                for start in range(0, n, 16):
                    items = [ds[i] for i in range(start, min(n, start + 16))]
                    a = torch.stack([t[0] for t in items]).to(device)
                    b = torch.stack([t[1] for t in items]).to(device)
                    fake = model(a)
                    l1_sum += float((fake - b).abs().mean(dim=(1, 2, 3)).sum())
                    fake_u8, b_u8 = to_uint8_bgr(fake), to_uint8_bgr(b)
                    psnr_sum += sum(psnr(f, r) for f, r in zip(fake_u8, b_u8))
                    if len(rows) < cfg.sample_n:
                        for ai, fi, bi in zip(to_uint8_bgr(a), fake_u8, b_u8):
                            if len(rows) < cfg.sample_n:
                                rows += [ai, fi, bi]
                row.update({"val_l1": l1_sum / n, "val_psnr": psnr_sum / n})
                grid = tile_grid(rows, cols=3)
            write_png(self.out / "samples" / f"epoch_{epoch + 1:03d}.png", grid)
        finally:
            self.G.train()
        return row

    def _checkpoint(self, epoch: int, row: dict[str, Any], rng_states) -> dict[str, Any]:
        cfg = self.cfg
        state: dict[str, Any] = {
            "arch": cfg.model,
            "arch_kwargs": self.g_kwargs,
            "spec": self.spec,
            "model": cpu_state(self.G.state_dict()),
            "discriminator": {"arch": cfg.discriminator, "arch_kwargs": self.d_kwargs,
                              "model": cpu_state(self.D.state_dict())},
            "optimizer": {"generator": self.opt_g.state_dict(), "discriminator": self.opt_d.state_dict()},
            "epoch": epoch,
            "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))},
            "best_val_l1": self.best_val_l1,
            "history": self.history,
            "train_config": cfg.to_dict(),
            "rng": rng_states,
            "world_size": self.info.world_size,
            "edgepix_version": __version__,
            "torch_version": str(torch.__version__),
        }
        if self.ema is not None:
            state["ema"] = cpu_state(self.ema.module.state_dict())
            state["ema_updates"] = self.ema.updates
        return state
