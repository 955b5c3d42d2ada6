"""Verbs `train` and `val`. Imports nothing heavy at the top: torch loads inside the handlers.

    edgepix train seg --data DIR|synthetic --model fastscnn --imgsz 256 --epochs N --batch B --out runs/NAME
    edgepix val seg CKPT --data DIR|synthetic
    edgepix train gan --data DIR|synthetic --model dcgan [--imgsz 64] [--epochs N] [--batch B] [--out runs/gan]
    edgepix train pix2pix --data DIR|synthetic [--imgsz 256] [--model-arg ngf=32] [--out runs/pix2pix]
    edgepix val gen CKPT --data DIR|synthetic [--seg SEG_CKPT] [--n N]

`train` and `val` take a task sub-verb, so each task keeps its own options.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

TRAIN_SEG_DEFAULTS_NOTE = ("The defaults are tuned so that `--data synthetic` reaches val mIoU >= 0.85 in under "
                           "10 minutes on 2 CPU cores")


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a model (seg: segmentation)")
    train_tasks = train.add_subparsers(dest="task", metavar="TASK")
    train_tasks.required = True
    add_train_seg(train_tasks)
    add_train_gan(train_tasks)
    add_train_pix2pix(train_tasks)

    val = subparsers.add_parser("val", help="evaluate a checkpoint on a dataset (seg: per-class IoU)")
    val_tasks = val.add_subparsers(dest="task", metavar="TASK")
    val_tasks.required = True
    add_val_seg(val_tasks)
    add_val_gen(val_tasks)


def _imgsz(values: list[int]) -> tuple[int, int]:
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"--imgsz takes SIZE or H W, got {len(values)} values")


def _model_arg(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON (numbers, lists, true/false), else kept as a string. Never eval."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{key!r} is not a valid argument name")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_train_seg(tasks) -> None:
    from edgepix.runtime.cli.flags import add_config_flags

    from .config import SegTrainConfig

    p = tasks.add_parser(
        "seg", help="train a segmentation model",
        description="Train a segmentation model on a dataset folder (images/ + masks/ + classes.json), a Pascal VOC "
                    "folder, or synthetic scenes. Under `torchrun --nproc_per_node N -m edgepix train seg ...` it "
                    "trains with DistributedDataParallel; --batch is then the global batch. "
                    + TRAIN_SEG_DEFAULTS_NOTE + ".",
    )
    p.add_argument("--data", required=True, help="dataset folder, Pascal VOC folder, or 'synthetic'")
    add_config_flags(p, SegTrainConfig, ["model"])
    p.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, default=[],
                   metavar="KEY=VALUE", help="architecture keyword, e.g. base_channels=32 (repeatable)")
    h, w = SegTrainConfig.imgsz
    p.add_argument("--imgsz", type=int, nargs="+", default=None, metavar="SIZE",
                   help=f"model input size: SIZE or H W, multiples of 32 (default: {h} {w})")
    add_config_flags(p, SegTrainConfig, ["epochs", "batch", "out", "device"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--exist-ok", action="store_true", help="overwrite a finished or abandoned run in --out")
    add_config_flags(p, SegTrainConfig, [
        "lr", "pretrained_lr_ratio", "freeze_epochs", "optimizer", "schedule", "warmup_epochs", "weight_decay",
        "grad_clip", "loss", "dice_weight", "amp", "ema", "workers", "threads", "seed", "deterministic", "synthetic_n",
        "val_every"])
    p.set_defaults(func=cmd_train_seg)


def add_val_seg(tasks) -> None:
    p = tasks.add_parser("seg", help="per-class IoU, mIoU and pixel accuracy of a segmentation checkpoint")
    p.add_argument("checkpoint", type=Path,
                   help="an edgepix checkpoint (best.pt / last.pt) or a Hugging Face save_pretrained folder")
    p.add_argument("--data", required=True, help="dataset folder, Pascal VOC folder, or 'synthetic' (held-out scenes)")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--synthetic-n", type=int, default=200, help="held-out synthetic scenes (default 200)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights even if the checkpoint has EMA")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_val_seg)


def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

    Must run before torch is imported. Measured on 2 cores (Fast-SCNN training step, 256x256, batch 16): when other
    processes shared the cores, spinning threads (OpenMP's default) ran at 2.1-4.2 img/s and passive ones at
    11-17 img/s; on an idle machine passive waiting costs about 20% (25 vs 28-33 img/s). Set OMP_WAIT_POLICY=ACTIVE
    for a dedicated machine.
    """
    import os
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cmd_train_seg(args: argparse.Namespace) -> int:
    import logging

    _passive_openmp()
    from edgepix.runtime.cli.flags import config_values
    from edgepix.runtime.core.errors import require

    require("torch", extra="train", purpose="Training")
    from edgepix.train.segmentation import RESUME_OVERRIDABLE, SegTrainConfig, train_segmentation

    given = config_values(args, SegTrainConfig)
    if args.imgsz is not None:
        try:
            given["imgsz"] = _imgsz(args.imgsz)
        except argparse.ArgumentTypeError as e:
            from edgepix.runtime.core.errors import EdgepixError

            raise EdgepixError(str(e)) from None
    if args.model_args:
        given["model_kwargs"] = dict(args.model_args)
    config = SegTrainConfig(data=str(args.data), quiet=args.quiet, **given)
    if args.resume:
        ignored = sorted(k for k in given if k not in RESUME_OVERRIDABLE)
        if ignored:
            logging.getLogger("edgepix.train").warning(
                "--resume continues with the run's saved settings; ignoring %s", ", ".join(ignored))
    train_segmentation(config, resume=args.resume, exist_ok=args.exist_ok)
    return 0


def cmd_val_seg(args: argparse.Namespace) -> int:
    _passive_openmp()
    from edgepix.runtime.core.errors import require

    require("torch", extra="train", purpose="Evaluating checkpoints")
    from edgepix.train.segmentation import evaluate_checkpoint, format_iou_table

    result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, batch=args.batch, device=args.device,
                                 workers=args.workers, synthetic_n=args.synthetic_n, quiet=args.quiet or args.json,
                                 prefer_ema=not args.no_ema)
    if args.json:
        m = result.metrics
        print(json.dumps({
            "checkpoint": result.checkpoint, "data": result.data, "split": result.split, "samples": result.samples,
            "miou": m.miou, "pixel_accuracy": m.pixel_accuracy, "loss": result.loss,
            "iou": {n: (None if v != v else v) for n, v in zip(result.class_names, m.iou)},
            "pixels": dict(zip(result.class_names, m.pixels)),
        }, indent=2))
        return 0
    print(f"{result.checkpoint} on {result.data} [{result.split}]: {result.samples} images in {result.seconds:.1f} s")
    print(format_iou_table(result))
    return 0


# ---- generation: train gan, train pix2pix, val gen -------------------------------------------------------------


def _add_train_parser(tasks, kind: str, help: str, description: str, own: list[str]) -> None:
    """A `train gan|pix2pix` parser: the kind's `own` GanTrainConfig flags, then the common ones, with the kind's
    defaults (GanTrainConfig.for_kind) in the help."""
    from edgepix.runtime.cli.flags import add_config_flags

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
    from edgepix.runtime.cli.flags import config_values
    from edgepix.runtime.core.errors import require

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
    from edgepix.runtime.core.errors import require

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
