"""`edgepix data synth --out DIR --n N`: write synthetic scenes in the training folder format."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="datasets: make synthetic scenes")
    data_verbs = p.add_subparsers(dest="data_verb", metavar="ACTION")
    data_verbs.required = True
    s = data_verbs.add_parser("synth", help="write synthetic scenes in the training folder format")
    s.add_argument("--out", type=Path, required=True, help="output folder (created)")
    s.add_argument("--n", type=int, required=True, help="number of scenes")
    s.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(256, 256))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--val-fraction", type=float, default=0.2, help="share of scenes listed in val.txt")
    s.add_argument("--appearance", choices=["varied", "lit"], default="varied",
                   help="varied: colours independent of the layout (segmentation); lit: rendered from the layout "
                        "with light, shading and shadows (mask -> image training)")
    s.set_defaults(func=cmd_data_synth)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from ..core.progress import progress_bar
    from ..data.synthetic import CLASS_NAMES, write_dataset

    start = time.perf_counter()
    with progress_bar(args.n, desc="synth", unit="scene", quiet=args.quiet) as bar:
        write_dataset(args.out, args.n, size=tuple(args.size), seed=args.seed, val_fraction=args.val_fraction,
                      appearance=args.appearance, progress=bar.update)
    elapsed = time.perf_counter() - start
    if not args.quiet:
        print(f"wrote {args.n} {args.appearance} scenes of {args.size[0]}x{args.size[1]} ({len(CLASS_NAMES)} classes) "
              f"to {args.out} "
              f"in {elapsed:.1f} s ({args.n / elapsed:.0f} scenes/s)")
    return 0
