"""What defines a training run: the segmentation and GAN configurations and the enums of their options.

Plain dataclasses, free of torch: `edgepix train ...` builds its flags from these fields (runtime/core/fields.py
declares them, runtime/cli/flags.py parses them), so the command line starts without loading PyTorch and an install
without it still answers `--help`. A field that is a flag declares its help here and nowhere else; the help states
the field's default. The trainers
(train/segmentation.py, train/gan_trainer.py) take these configs and save them in every checkpoint as `train_config`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any

from edgepix.runtime.core.errors import EdgepixError
from edgepix.runtime.core.fields import flag
from edgepix.runtime.data.synthetic import APPEARANCES

from .transforms import AugmentConfig


class OptimizerKind(str, enum.Enum):
    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(str, enum.Enum):
    COSINE = "cosine"
    POLY = "poly"


class LossKind(str, enum.Enum):
    CE = "ce"
    OHEM = "ohem"


class GanKind(str, enum.Enum):
    DCGAN = "dcgan"  # unconditional: noise -> image
    PIX2PIX = "pix2pix"  # conditional: image A -> image B


class GANMode(str, enum.Enum):
    VANILLA = "vanilla"
    LSGAN = "lsgan"
    HINGE = "hinge"


DEFAULT_LAMBDA_L1 = 100.0
DIRECTIONS = ("AtoB", "BtoA")  # pix2pix: A -> B or B -> A

WORKERS_HELP = "data-loading processes per training process"


@dataclass
class SegTrainConfig:
    """Everything that defines a segmentation run. Saved in every checkpoint as `train_config`."""

    data: str = "synthetic"
    out: str = field(default="runs/seg", metadata=flag("run folder"))
    model: str = field(default="fastscnn", metadata=flag(
        "architecture: fastscnn, lraspp or unet, or hf:PATH for a pretrained Hugging Face model saved with "
        "save_pretrained (its classifier is replaced when the data's classes differ)"))
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    imgsz: tuple[int, int] = (256, 256)  # (H, W), the model's input size
    # tuned for --data synthetic (6000 augmented scenes)
    epochs: int = field(default=3, metadata=flag("the default is tuned for --data synthetic; real datasets want more"))
    batch: int = field(default=16, metadata=flag("global batch size, split over the processes of a torchrun job"))
    lr: float = field(default=4e-3, metadata=flag("peak learning rate"))
    # Pretrained models (--model hf:PATH): every layer but the classifier trains at lr x this ratio, and the
    # backbone (encoder) stays frozen for the first `freeze_epochs` epochs.
    pretrained_lr_ratio: float = field(default=0.1, metadata=flag(
        "hf: models: every layer but the classifier trains at lr x this"))
    freeze_epochs: int = field(default=0, metadata=flag(
        "hf: models: keep the pretrained backbone frozen for the first N epochs"))
    optimizer: OptimizerKind = field(default=OptimizerKind.ADAMW, metadata=flag())
    weight_decay: float = field(default=1e-4, metadata=flag())
    momentum: float = 0.9  # SGD only
    schedule: Schedule = field(default=Schedule.COSINE, metadata=flag("after warm-up"))
    warmup_epochs: float = field(default=0.3, metadata=flag("linear warm-up length"))
    warmup_start: float = 0.05  # the first iteration's lr as a fraction of `lr`
    min_lr_ratio: float = 0.01  # the final lr as a fraction of `lr`
    grad_clip: float = field(default=5.0, metadata=flag("max gradient norm, 0 = off"))
    loss: LossKind = field(default=LossKind.CE, metadata=flag("cross-entropy or OHEM cross-entropy"))
    dice_weight: float = field(default=0.0, metadata=flag("add this times a soft Dice loss"))
    amp: bool = field(default=True, metadata=flag("mixed precision on CUDA; ignored on CPU"))
    ema: bool = field(default=False, metadata=flag("keep an EMA of the weights, validate and export it"))
    ema_decay: float = 0.999
    seed: int = field(default=0, metadata=flag())
    deterministic: bool = field(default=False, metadata=flag("deterministic algorithms; slower on CUDA"))
    workers: int | None = field(default=None, metadata=flag(WORKERS_HELP, default="by device and cores"))
    threads: int | None = field(default=None, metadata=flag("PyTorch CPU threads per process",
                                                            default="CPU cores / processes"))
    device: str = field(default="auto", metadata=flag("cpu, cuda or auto"))
    synthetic_n: int = field(default=2000, metadata=flag("synthetic training scenes"))
    synthetic_val_n: int = 200  # held-out scenes (a fixed seed no training run uses)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_every: int = field(default=1, metadata=flag("validate every N epochs"))
    channels_last: bool = True
    quiet: bool = False

    def __post_init__(self) -> None:
        self.imgsz = tuple(int(v) for v in self.imgsz)  # type: ignore[assignment]
        self.optimizer = OptimizerKind(self.optimizer)
        self.schedule = Schedule(self.schedule)
        self.loss = LossKind(self.loss)
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.augment.items()})
        checks = [
            (len(self.imgsz) == 2 and all(v >= 32 and v % 32 == 0 for v in self.imgsz),
             f"imgsz must be one or two multiples of 32 (>= 32), got {self.imgsz}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch >= 1, f"batch must be at least 1, got {self.batch}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (0 < self.pretrained_lr_ratio <= 1,
             f"pretrained lr ratio must be in (0, 1], got {self.pretrained_lr_ratio}"),
            (0 <= self.freeze_epochs < self.epochs,
             f"freeze epochs must be in 0..epochs-1 ({self.epochs - 1}), got {self.freeze_epochs}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup epochs must be >= 0, got {self.warmup_epochs}"),
            (0 < self.warmup_start <= 1, f"warmup start must be in (0, 1], got {self.warmup_start}"),
            (0 <= self.min_lr_ratio <= 1, f"min lr ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.grad_clip >= 0, f"grad clip must be >= 0, got {self.grad_clip}"),
            (self.dice_weight >= 0, f"dice weight must be >= 0, got {self.dice_weight}"),
            (0 < self.ema_decay < 1, f"EMA decay must be in (0, 1), got {self.ema_decay}"),
            (self.synthetic_n >= 1 and self.synthetic_val_n >= 1, "synthetic set sizes must be at least 1"),
            (self.val_every >= 1, f"val_every must be at least 1, got {self.val_every}"),
            (self.workers is None or self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise EdgepixError(message)

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, enum.Enum):
                return v.value
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Per-kind defaults; the CLI leaves unset options to these, and its help shows them.
DEFAULTS: dict[GanKind, dict[str, Any]] = {
    GanKind.DCGAN: dict(model="dcgan", discriminator="dcgan_d", imgsz=64, batch=64, epochs=20, out="runs/gan",
                        sample_n=64),
    GanKind.PIX2PIX: dict(model="pix2pix", discriminator="patchgan", imgsz=256, batch=1, epochs=200,
                          out="runs/pix2pix", sample_n=6, scenes="lit"),
}


@dataclass
class GanTrainConfig:
    """Everything that defines a GAN run. Saved in every checkpoint as `train_config`."""

    kind: GanKind = GanKind.DCGAN
    data: str = "synthetic"
    out: str = field(default="runs/gan", metadata=flag("run folder"))
    model: str = field(default="dcgan", metadata=flag("generator architecture from the registry"))
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    discriminator: str = field(default="dcgan_d", metadata=flag("discriminator architecture from the registry"))
    discriminator_kwargs: dict[str, Any] = field(default_factory=dict)
    # square images: the generator's output (DCGAN) or input and output (pix2pix)
    imgsz: int = field(default=64, metadata=flag("square image size"))
    latent_size: int = field(default=100, metadata=flag("noise dimension"))  # DCGAN
    epochs: int = field(default=20, metadata=flag("training epochs"))
    batch: int = field(default=64, metadata=flag("global batch size, split over the processes of a torchrun job"))
    lr: float = field(default=2e-4, metadata=flag("Adam learning rate"))
    lr_d: float | None = field(default=None, metadata=flag("the discriminator's learning rate", default="--lr"))
    beta1: float = field(default=0.5, metadata=flag("Adam beta1"))
    beta2: float = 0.999
    gan_mode: GANMode = field(default=GANMode.VANILLA, metadata=flag())
    lambda_l1: float = field(default=DEFAULT_LAMBDA_L1, metadata=flag("weight of the L1 term"))  # pix2pix
    # pix2pix jitter: resize to this, random-crop imgsz (the paper: 286 for 256)
    load_size: int | None = field(default=None, metadata=flag(
        "random jitter: resize to this size, then crop --imgsz; the paper uses 286 for 256", default="no jitter"))
    flip: bool = True
    ema: bool = field(default=False, metadata=flag(
        "keep an EMA of the generator weights; samples, evaluation and export use it"))
    ema_decay: float = field(default=0.999, metadata=flag())
    seed: int = field(default=0, metadata=flag())
    deterministic: bool = field(default=False, metadata=flag("deterministic algorithms; slower on CUDA"))
    workers: int | None = field(default=None, metadata=flag(WORKERS_HELP, default="0 on CPU, 4 on CUDA"))
    device: str = field(default="auto", metadata=flag("cpu, cuda or auto"))
    synthetic_n: int = field(default=2000, metadata=flag("synthetic training scenes"))
    synthetic_val_n: int = 200
    scenes: str = field(default="varied", metadata=flag(
        "--data synthetic: scene appearance; lit scenes are rendered from their layout (light, shading, shadows) "
        "so a mask predicts the image", choices=APPEARANCES))
    direction: str = field(default="AtoB", metadata=flag("pix2pix: which side of the pair is the input",
                                                         choices=DIRECTIONS))
    # minutes of training (excluding data preparation); stops mid-epoch
    time_limit: float | None = field(default=None, metadata=flag(
        "stop training after this many minutes (validates and saves as at an epoch's end)", metavar="MIN",
        default="no limit"))
    sample_n: int = field(default=64, metadata=flag("images (DCGAN) or rows (pix2pix) in the sample grid"))
    val_n: int = field(default=64, metadata=flag("pix2pix: validation pairs scored (L1, PSNR) after every epoch"))
    quiet: bool = False

    def __post_init__(self) -> None:
        self.kind = GanKind(self.kind)
        self.gan_mode = GANMode(self.gan_mode)
        checks = [
            (self.imgsz >= 16, f"imgsz must be at least 16, got {self.imgsz}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch >= 1, f"batch must be at least 1, got {self.batch}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (self.lr_d is None or (self.lr_d > 0 and math.isfinite(self.lr_d)),
             f"lr-d must be a positive number, got {self.lr_d}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"Adam betas must be in [0, 1), got {self.beta1}, "
                                                          f"{self.beta2}"),
            (self.lambda_l1 >= 0, f"lambda-l1 must be >= 0, got {self.lambda_l1}"),
            (self.latent_size >= 1, f"latent size must be at least 1, got {self.latent_size}"),
            (0 < self.ema_decay < 1, f"EMA decay must be in (0, 1), got {self.ema_decay}"),
            (self.load_size is None or self.load_size >= self.imgsz,
             f"load-size must be >= imgsz ({self.imgsz}), got {self.load_size}"),
            (self.time_limit is None or self.time_limit > 0, f"time limit must be positive, got {self.time_limit}"),
            (self.sample_n >= 1 and self.val_n >= 1, "sample-n and val-n must be at least 1"),
            (self.workers is None or self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.direction in DIRECTIONS, f"direction must be AtoB or BtoA, got {self.direction!r}"),
            (self.scenes in APPEARANCES, f"scenes must be one of {', '.join(APPEARANCES)}, got {self.scenes!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise EdgepixError(message)

    @classmethod
    def for_kind(cls, kind: GanKind | str, **given: Any) -> GanTrainConfig:
        kind = GanKind(kind)
        return cls(kind=kind, **{**DEFAULTS[kind], **given})

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GanTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
