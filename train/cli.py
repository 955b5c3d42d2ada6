"""Verbs `train` and `val`. Imports nothing heavy at the top: torch loads inside the handlers.

    edgepix train seg --data DIR|synthetic --model fastscnn --imgsz 256 --epochs N --batch B --out runs/NAME
    edgepix val seg CKPT --data DIR|synthetic

`train` and `val` take a task sub-verb (`seg` here; generation tasks add theirs), so each task keeps its own options.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_SEG_DEFAULTS_NOTE = ("The defaults are tuned so that `--data synthetic` reaches val mIoU >= 0.85 in under "
                           "10 minutes on 2 CPU cores")


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a model (seg: segmentation)")
    train_tasks = train.add_subparsers(dest="task", metavar="TASK")
    train_tasks.required = True
    add_train_seg(train_tasks)
    from .gan_cli import add_train_gan, add_train_pix2pix, add_val_gen  # generation sub-verbs

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
    p = tasks.add_parser(
        "seg", help="train a segmentation model",
        description="Train a segmentation model on a dataset folder (images/ + masks/ + classes.json), a Pascal VOC "
                    "folder, or synthetic scenes. Under `torchrun --nproc_per_node N -m edgepix train seg ...` it "
                    "trains with DistributedDataParallel; --batch is then the global batch. "
                    + TRAIN_SEG_DEFAULTS_NOTE + ".",
    )
    p.add_argument("--data", required=True, help="dataset folder, Pascal VOC folder, or 'synthetic'")
    p.add_argument("--model", default=None,
                   help="architecture: fastscnn (default), lraspp or unet, or hf:PATH for a pretrained Hugging Face "
                        "model saved with save_pretrained (its classifier is replaced when the data's classes differ)")
    p.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, default=[],
                   metavar="KEY=VALUE", help="architecture keyword, e.g. base_channels=32 (repeatable)")
    p.add_argument("--imgsz", type=int, nargs="+", default=None, metavar="SIZE",
                   help="model input size: SIZE or H W, multiples of 32 (default 256)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (default 3, tuned for --data synthetic; real datasets want more)")
    p.add_argument("--batch", type=int, default=None, help="global batch size (default 16)")
    p.add_argument("--out", type=Path, default=Path("runs/seg"), help="run folder (default runs/seg)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--exist-ok", action="store_true", help="overwrite a finished or abandoned run in --out")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 4e-3 AdamW)")
    p.add_argument("--pretrained-lr-ratio", type=float, default=None,
                   help="hf: models: every layer but the classifier trains at lr x this (default 0.1)")
    p.add_argument("--freeze-epochs", type=int, default=None,
                   help="hf: models: keep the pretrained backbone frozen for the first N epochs (default 0)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=None, help="default adamw")
    p.add_argument("--schedule", choices=["cosine", "poly"], default=None, help="after warm-up (default cosine)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up length (default 0.3)")
    p.add_argument("--weight-decay", type=float, default=None, help="default 1e-4")
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm, 0 = off (default 5)")
    p.add_argument("--loss", choices=["ce", "ohem"], default=None, help="cross-entropy or OHEM cross-entropy")
    p.add_argument("--dice-weight", type=float, default=None, help="add this times a soft Dice loss (default 0)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision on CUDA (default on)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="keep an EMA of the weights, validate and export it (default off)")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes per training process")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch CPU threads per process (default: CPU cores / processes)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on CUDA)")
    p.add_argument("--synthetic-n", type=int, default=None, help="synthetic training scenes (default 2000)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N epochs (default 1)")
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


_CONFIG_FIELDS = {  # CLI attribute -> SegTrainConfig field
    "model": "model", "epochs": "epochs", "batch": "batch", "lr": "lr", "optimizer": "optimizer",
    "schedule": "schedule", "warmup_epochs": "warmup_epochs", "weight_decay": "weight_decay",
    "grad_clip": "grad_clip", "loss": "loss", "dice_weight": "dice_weight", "amp": "amp", "ema": "ema",
    "seed": "seed", "synthetic_n": "synthetic_n", "val_every": "val_every",
    "pretrained_lr_ratio": "pretrained_lr_ratio", "freeze_epochs": "freeze_epochs",
}


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
    from edgepix.runtime.errors import require

    require("torch", extra="train", purpose="Training")
    from edgepix.train.segmentation import RESUME_OVERRIDABLE, SegTrainConfig, train_segmentation

    given = {field: getattr(args, attr) for attr, field in _CONFIG_FIELDS.items() if getattr(args, attr) is not None}
    if args.imgsz is not None:
        try:
            given["imgsz"] = _imgsz(args.imgsz)
        except argparse.ArgumentTypeError as e:
            from edgepix.runtime.errors import EdgepixError

            raise EdgepixError(str(e)) from None
    if args.model_args:
        given["model_kwargs"] = dict(args.model_args)
    if args.deterministic:
        given["deterministic"] = True
    config = SegTrainConfig(data=str(args.data), out=str(args.out), device=args.device, workers=args.workers,
                            threads=args.threads, quiet=args.quiet, **given)
    if args.resume:
        ignored = sorted(k for k in given if k not in RESUME_OVERRIDABLE)
        if ignored:
            logging.getLogger("edgepix.train").warning(
                "--resume continues with the run's saved settings; ignoring %s", ", ".join(ignored))
    train_segmentation(config, resume=args.resume, exist_ok=args.exist_ok)
    return 0


def cmd_val_seg(args: argparse.Namespace) -> int:
    _passive_openmp()
    from edgepix.runtime.errors import require

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
