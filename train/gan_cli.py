"""Sub-verbs `train gan`, `train pix2pix` and `val gen` (registered by `edgepix.train.cli`).

    edgepix train gan --data DIR|synthetic --model dcgan [--imgsz 64] [--epochs N] [--batch B] [--out runs/gan]
    edgepix train pix2pix --data DIR|synthetic [--imgsz 256] [--model-arg ngf=32] [--out runs/pix2pix]
    edgepix val gen CKPT --data DIR|synthetic [--seg SEG_CKPT] [--n N]

Imports nothing heavy at the top: torch loads inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .cli import _model_arg


def _add_train_parser(tasks, kind: str, help: str, description: str, own: list[str]) -> None:
    """A `train gan|pix2pix` parser: the kind's `own` GanTrainConfig flags, then the common ones, with the kind's
    defaults (GanTrainConfig.for_kind) in the help."""
    from edgepix.runtime.configflags import add_config_flags

    from .config import DEFAULTS, GanKind, GanTrainConfig

    defaults = DEFAULTS[GanKind.DCGAN if kind == "gan" else GanKind.PIX2PIX]
    p = tasks.add_parser(kind, help=help, description=description)
    add_config_flags(p, GanTrainConfig, own, defaults=defaults)
    p.add_argument("--data", required=True, help="data folder or 'synthetic'")
    example = {"gan": "ngf=32", "pix2pix": "variant=unet_128|unet_256"}[kind]
    p.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, default=[],
                   metavar="KEY=VALUE", help=f"generator keyword, e.g. {example} (repeatable)")
    p.add_argument("--disc-arg", dest="disc_args", action="append", type=_model_arg, default=[],
                   metavar="KEY=VALUE", help="discriminator keyword, e.g. ndf=32 (repeatable)")
    add_config_flags(p, GanTrainConfig, [
        "discriminator", "imgsz", "epochs", "batch", "out", "lr", "lr_d", "beta1", "gan_mode", "ema", "ema_decay",
        "time_limit", "sample_n", "synthetic_n", "scenes", "device", "workers", "seed", "deterministic"],
        defaults=defaults)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--exist-ok", action="store_true", help="overwrite a run in --out")
    p.set_defaults(func=cmd_train_gan, kind=kind)


def add_train_gan(tasks) -> None:
    _add_train_parser(
        tasks, "gan", help="train an unconditional GAN (DCGAN: noise -> image)",
        description="Train a DCGAN on a folder of images or on synthetic scenes. Under `torchrun --nproc_per_node N "
                    "-m edgepix train gan ...` both networks train with DistributedDataParallel; --batch is global. "
                    "Writes last.pt, samples/epoch_NNN.png, metrics.csv, curves.png and train.log into --out.",
        own=["model", "latent_size"])


def add_train_pix2pix(tasks) -> None:
    _add_train_parser(
        tasks, "pix2pix", help="train an image-to-image GAN (pix2pix: U-Net + PatchGAN, L_GAN + 100 L1)",
        description="Train pix2pix on A/ + B/ folders, side-by-side AB images, a segmentation dataset or synthetic "
                    "scenes (mask -> scene: A is the palette-coloured mask, B the image). Writes last.pt, best.pt "
                    "(lowest validation L1), samples/epoch_NNN.png (input | output | target), metrics.csv, "
                    "curves.png and train.log into --out.",
        own=["model", "lambda_l1", "load_size", "direction", "val_n"])


def add_val_gen(tasks) -> None:
    p = tasks.add_parser(
        "gen", help="score a generator: pix2pix L1/PSNR/SSIM + segmentation consistency; DCGAN sample diversity")
    p.add_argument("checkpoint", type=Path, help="a generator checkpoint (last.pt / best.pt)")
    p.add_argument("--data", required=True, help="data folder or 'synthetic' (held-out scenes)")
    p.add_argument("--seg", type=Path, default=None,
                   help="pix2pix mask -> image: a segmentation checkpoint whose mIoU on the generated images against "
                        "the input masks is the consistency score")
    p.add_argument("--n", type=int, default=200, help="validation pairs (pix2pix) or samples (DCGAN); default 200")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="DCGAN sampling seed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-mode", action="store_true",
                   help="pix2pix: normalise with each image's own statistics, as a --train-mode export does")
    p.add_argument("--no-ema", action="store_true", help="score the raw weights even when the checkpoint has EMA")
    p.add_argument("--scenes", choices=["varied", "lit"], default=None,
                   help="--data synthetic: the scene appearance (default: the one the checkpoint trained on)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_val_gen)


def cmd_train_gan(args: argparse.Namespace) -> int:
    from edgepix.runtime.configflags import config_values
    from edgepix.runtime.errors import require

    require("torch", extra="train", purpose="Training")
    from edgepix.train.gan_trainer import RESUME_OVERRIDABLE, GanKind, GanTrainConfig, train_gan

    kind = GanKind.DCGAN if args.kind == "gan" else GanKind.PIX2PIX
    given = config_values(args, GanTrainConfig)
    if args.model_args:
        given["model_kwargs"] = dict(args.model_args)
    if args.disc_args:
        given["discriminator_kwargs"] = dict(args.disc_args)
    config = GanTrainConfig.for_kind(kind, data=str(args.data), quiet=args.quiet, **given)
    if args.resume:
        ignored = sorted(k for k in given if k not in RESUME_OVERRIDABLE)
        if ignored:
            logging.getLogger("edgepix.train").warning(
                "--resume continues with the run's saved settings; ignoring %s", ", ".join(ignored))
    train_gan(config, resume=args.resume, exist_ok=args.exist_ok)
    return 0


def cmd_val_gen(args: argparse.Namespace) -> int:
    from edgepix.runtime.errors import require

    require("torch", extra="train", purpose="Evaluating generators")
    from edgepix.train.checkpoint import load_checkpoint
    from edgepix.train.gan_eval import evaluate_dcgan, evaluate_pix2pix

    task = load_checkpoint(args.checkpoint)["spec"].task.value
    if task == "generation-noise":
        report = evaluate_dcgan(args.checkpoint, str(args.data), n=args.n, seed=args.seed, device=args.device,
                                use_ema=not args.no_ema, scenes=args.scenes)
    else:
        report = evaluate_pix2pix(args.checkpoint, str(args.data), seg=args.seg, n=args.n, batch=args.batch,
                                  device=args.device, use_ema=not args.no_ema, train_mode=args.train_mode,
                                  quiet=args.quiet or args.json, scenes=args.scenes)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    return 0
