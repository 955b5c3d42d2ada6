"""`edgepix spec MODEL [--set KEY=VALUE ...] [--out NEW.onnx]`: show the spec a model carries (or the one the
runtime would assume), or write a copy of the model with a validated one; for a .tflite, `--out NAME.spec.json`
writes the spec file the runtime reads beside NAME.tflite."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "spec", help="show an ONNX file's spec (or what the runtime would assume), or write a copy with a new one",
        description="Without --set/--from-hf/--palette: print the spec MODEL carries, or, for a model exported by "
                    "another tool, the one the runtime would assume. With them: write --out, a copy of MODEL whose "
                    "metadata holds the validated spec; the graph and weights are copied unchanged. Settable: "
                    "classes, model_name, ignore_index, scale, mean, std, channel_order, resize, pad_value, "
                    "input_size, size_divisor, output_stride, output_range, output_layout (NCHW|NHWC), output_kind "
                    "(logits|probabilities|binary_probability|binary_logit|class_map), threshold, upsample "
                    "(scores|classes) (lists comma-separated or JSON). Every value is checked against the graph. "
                    "A .tflite keeps its spec in a file beside it: --out NAME.spec.json for NAME.tflite.")
    p.add_argument("model", type=Path, help="an .onnx file, or a .tflite file")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="spec fields, e.g. classes=road,car,person mean=0.5,0.5,0.5 std=0.5,0.5,0.5")
    p.add_argument("--from-hf", type=Path, metavar="DIR",
                   help="class names, normalisation and size from a Hugging Face save_pretrained folder "
                        "(config.json id2label, preprocessor_config.json); --set wins over it")
    p.add_argument("--palette", type=Path, metavar="FILE",
                   help='class colours: a JSON list of [r, g, b], or {"names": [...], "palette": [...]}')
    p.add_argument("--task", choices=("segmentation", "generation-noise", "generation-image"),
                   default="segmentation", help="what a model without a spec is (default segmentation)")
    p.add_argument("--out", type=Path, metavar="NEW.onnx", help="where the copy goes (may be MODEL itself)")
    p.add_argument("--json", action="store_true", help="print the spec as JSON")
    p.set_defaults(func=cmd_spec)


def cmd_spec(args: argparse.Namespace) -> int:
    from ..core.errors import EdgepixError, SinkError
    from ..core.fileio import check_writable
    from ..core.formats import TFLITE_SUFFIXES
    from ..description.hfconfig import read_hf_folder, spec_fields
    from ..description.specfile import palette_from_file, parse_settings, read_spec, write_spec

    sidecar = args.model.suffix.lower() in TFLITE_SUFFIXES  # its spec is a file of its own
    given: dict = {}
    preferred_size = None
    if args.from_hf:
        folder = read_hf_folder(args.from_hf)
        given.update(spec_fields(folder), model_name=folder.path.resolve().name or folder.model_type)
        preferred_size = given.pop("input_size", None)
    if args.palette:
        given.update(palette_from_file(args.palette))
    given.update(parse_settings(args.set))
    if given and args.out is None:
        hint = f" (for a .tflite: --out {args.model.with_suffix('.spec.json').name})" if sidecar else ""
        raise EdgepixError(f"--set, --from-hf and --palette write a copy of the model: give --out NEW.onnx{hint}")
    reading = read_spec(args.model, task=args.task, given=given, preferred_size=preferred_size)
    spec = reading.spec
    if args.out is not None:
        check_writable(args.out, "--out", SinkError)  # a folder, a read-only place: one line, nothing written
        spec = write_spec(args.model, args.out, spec)
    if args.json:
        print(spec.to_json(indent=2))
    else:
        origin = "embedded" if reading.embedded or args.out else "not embedded: what the runtime would assume"
        if sidecar and (reading.embedded or args.out):
            from ..description.tflite import sidecar_path

            beside = args.out is not None or sidecar_path(args.model).is_file()
            origin = "the spec file beside the model" if beside else "embedded"
        print(f"spec of {args.out or args.model} ({origin})")
        for key, value in spec.to_dict().items():
            print(f"  {key:<15} {value}")
    if args.out is not None and sidecar:
        what = (f"{spec.num_classes} classes, {spec.output_kind.value} {spec.output_layout.value}"
                if spec.task.value == "segmentation" else f"{spec.task.value}, {spec.output_kind.value}")
        print(f"wrote {args.out}: the spec of {args.model.name} ({what}), read by the runtime beside the model",
              file=sys.stderr)
    elif args.out is not None:
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): graph and weights unchanged, spec "
              f"with {spec.num_classes} classes embedded", file=sys.stderr)
    return 0
