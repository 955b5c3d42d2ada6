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

_CONFIG_FIELDS = {  # CLI attribute -> GanTrainConfig field
    "model": "model", "discriminator": "discriminator", "imgsz": "imgsz", "latent_size": "latent_size",
    "epochs": "epochs", "batch": "batch", "lr": "lr", "lr_d": "lr_d", "beta1": "beta1", "gan_mode": "gan_mode",
    "lambda_l1": "lambda_l1", "load_size": "load_size", "ema": "ema", "ema_decay": "ema_decay", "seed": "seed",
    "synthetic_n": "synthetic_n", "direction": "direction", "time_limit": "time_limit", "sample_n": "sample_n",
    "val_n": "val_n", "workers": "workers", "scenes": "scenes",
}


def _common_train_args(p: argparse.ArgumentParser, kind: str) -> None:
    from_defaults = {"gan": "dcgan 64x64, batch 64, 20 epochs", "pix2pix": "unet_256, batch 1, 200 epochs"}[kind]
    p.add_argument("--data", required=True, help="data folder or 'synthetic'")
    p.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, default=[],
                   metavar="KEY=VALUE", help="generator keyword, e.g. ngf=32 (repeatable)")
    p.add_argument("--disc-arg", dest="disc_args", action="append", type=_model_arg, default=[],
                   metavar="KEY=VALUE", help="discriminator keyword, e.g. ndf=32 (repeatable)")
    p.add_argument("--discriminator", default=None, help="discriminator architecture from the registry")
    p.add_argument("--imgsz", type=int, default=None, help="square image size")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="global batch size")
    p.add_argument("--out", type=Path, default=None, help=f"run folder (default runs/{kind})")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4)")
    p.add_argument("--lr-d", type=float, default=None, help="the discriminator's learning rate (default --lr)")
    p.add_argument("--beta1", type=float, default=None, help="Adam beta1 (default 0.5)")
    p.add_argument("--gan-mode", choices=["vanilla", "lsgan", "hinge"], default=None, help="default vanilla")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="keep an EMA of the generator weights; samples, evaluation and export use it (default off)")
    p.add_argument("--ema-decay", type=float, default=None, help="default 0.999")
    p.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="stop training after this many minutes (validates and saves as at an epoch's end)")
    p.add_argument("--sample-n", type=int, default=None, help="images (DCGAN) or rows (pix2pix) in the sample grid")
    p.add_argument("--synthetic-n", type=int, default=None, help="synthetic training scenes (default 2000)")
    p.add_argument("--scenes", choices=["varied", "lit"], default=None,
                   help="--data synthetic: scene appearance; lit scenes are rendered from their layout (light, "
                        "shading, shadows) so a mask predicts the image (default: lit for pix2pix, varied for gan)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes per training process")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--exist-ok", action="store_true", help="overwrite a run in --out")
    p.set_defaults(kind=kind, defaults_note=from_defaults)


def add_train_gan(tasks) -> None:
    p = tasks.add_parser(
        "gan", help="train an unconditional GAN (DCGAN: noise -> image)",
        description="Train a DCGAN on a folder of images or on synthetic scenes. Under `torchrun --nproc_per_node N "
                    "-m edgepix train gan ...` both networks train with DistributedDataParallel; --batch is global. "
                    "Writes last.pt, samples/epoch_NNN.png, metrics.csv, curves.png and train.log into --out.")
    p.add_argument("--model", default=None, help="generator architecture (default dcgan)")
    p.add_argument("--latent-size", type=int, default=None, help="noise dimension (default 100)")
    _common_train_args(p, "gan")
    p.set_defaults(func=cmd_train_gan, lambda_l1=None, load_size=None, direction=None, val_n=None)


def add_train_pix2pix(tasks) -> None:
    p = tasks.add_parser(
        "pix2pix", help="train an image-to-image GAN (pix2pix: U-Net + PatchGAN, L_GAN + 100 L1)",
        description="Train pix2pix on A/ + B/ folders, side-by-side AB images, a segmentation dataset or synthetic "
                    "scenes (mask -> scene: A is the palette-coloured mask, B the image). Writes last.pt, best.pt "
                    "(lowest validation L1), samples/epoch_NNN.png (input | output | target), metrics.csv, "
                    "curves.png and train.log into --out.")
    p.add_argument("--model", default=None, help="generator architecture (default pix2pix; "
                                                 "--model-arg variant=unet_128|unet_256)")
    p.add_argument("--lambda-l1", type=float, default=None, help="weight of the L1 term (default 100)")
    p.add_argument("--load-size", type=int, default=None,
                   help="random jitter: resize to this size, then crop --imgsz (the paper: 286 for 256)")
    p.add_argument("--direction", choices=["AtoB", "BtoA"], default=None, help="which side is the input")
    p.add_argument("--val-n", type=int, default=None, help="validation pairs scored after every epoch (default 64)")
    _common_train_args(p, "pix2pix")
    p.set_defaults(func=cmd_train_gan, latent_size=None)


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
    from edgepix.runtime.errors import require

    require("torch", extra="train", purpose="Training")
    from edgepix.train.gan_trainer import RESUME_OVERRIDABLE, GanKind, GanTrainConfig, train_gan

    kind = GanKind.DCGAN if args.kind == "gan" else GanKind.PIX2PIX
    given = {f: getattr(args, a) for a, f in _CONFIG_FIELDS.items() if getattr(args, a, None) is not None}
    if args.model_args:
        given["model_kwargs"] = dict(args.model_args)
    if args.disc_args:
        given["discriminator_kwargs"] = dict(args.disc_args)
    if args.deterministic:
        given["deterministic"] = True
    if args.out is not None:
        given["out"] = str(args.out)
    config = GanTrainConfig.for_kind(kind, data=str(args.data), device=args.device, quiet=args.quiet, **given)
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
