"""`edgepix generate`: images from a noise generator (DCGAN) or an image-to-image generator (pix2pix).

    edgepix generate MODEL --num N --batch B --seed S --out DIR [--grid FILE]       # noise -> images
    edgepix generate MODEL --input DIR|IMAGE --out DIR                               # image -> image, files
    edgepix generate MODEL --input VIDEO|URI --sink URI [--sink URI ...]             # image -> image, streams

Torch-free (numpy, OpenCV, a runtime backend). Image i of a noise model depends only on (seed, i), so any batch
size gives the same images. A video or live input runs through the stream pipeline (runtime.streams.jobs.run_stream),
like `edgepix segment`: every source and sink, statistics, the HTTP page. Progress on stderr; the closing line
states images/s and the time per batch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from ..core.fileio import write_image
from ..core.formats import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from .segment import URI_EPILOG, UriHelpFormatter, add_stream_arguments, run_stream_command, source_uri, stream_job

MAX_SEED = 2**63 - 1  # numpy seeds the latents with non-negative integers; int64's range is plenty


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_SEED}, got {text[:40]!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_SEED}, got {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate images: noise -> image (--num) or image -> image (--input)",
        description="Run an exported generator. Noise models (DCGAN): --num images from latents seeded by --seed, "
                    "--batch per inference call, written to --out as PNGs and/or tiled into --grid. Image models "
                    "(pix2pix): every image of a folder or an image file into the --out folder (same names, .png); "
                    "a video or any live source (--input URI, as edgepix segment's --source) through the stream "
                    "pipeline into --sink URIs (--out FILE.mp4 or --out DIR/ work too).",
        epilog=URI_EPILOG, formatter_class=UriHelpFormatter)
    p.add_argument("model", type=Path, help="an exported generator (.onnx, or a TensorRT .engine)")
    p.add_argument("--num", "-n", type=int, help="noise models: number of images")
    p.add_argument("--batch", "-b", type=int, default=8, help="latents or images per inference call (default 8)")
    p.add_argument("--seed", type=_seed, default=0, help=f"noise models: latent seed, 0..{MAX_SEED} (default 0)")
    p.add_argument("--input", "-i", metavar="PATH|URI", type=source_uri,
                   help="image models: a folder of images, an image, a video file or a source URI")
    p.add_argument("--out", "-o", type=Path, help="output folder (or a video file for video input)")
    p.add_argument("--sink", action="append", default=[], metavar="URI",
                   help="image models, video or live input: where generated frames go (repeatable)")
    p.add_argument("--grid", type=Path, help="also tile the images into this PNG (noise models; at most 256)")
    p.add_argument("--grid-cols", type=int, default=None, help="grid columns (default: square)")
    p.add_argument("--frame-size", action="store_true", help="image models: resize outputs back to the input size")
    p.add_argument("--backend", default="auto",
                   help="inference backend (auto, ort-cpu, ort-cuda, ort-trt, opencv, openvino, tensorrt, litert)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches before timing (default 1)")
    add_stream_arguments(p)
    from .archive import add_engine_flags

    add_engine_flags(p.add_argument_group("clusters (noise models)"))
    p.set_defaults(func=cmd_generate, sigterm_interrupts=True)


def _backend_options(args: argparse.Namespace) -> dict:
    return {"threads": args.threads} if args.threads else {}


def cmd_generate(args: argparse.Namespace) -> int:
    from ..core.errors import InputError
    from ..description.spec import Task

    if args.batch < 1:
        raise InputError(f"--batch must be at least 1, got {args.batch}")
    from ..tasks.model import stored_spec

    spec = stored_spec(args.model)
    task = spec.task if spec is not None else (Task.GENERATION_NOISE if args.num is not None else Task.GENERATION_IMAGE)
    if task is Task.GENERATION_NOISE:
        if args.input is not None:
            raise InputError(f"{args.model.name} is a noise -> image model: give --num N, not --input")
        if args.num is None or args.num < 1:
            raise InputError("a noise -> image model needs --num N (N >= 1) images to generate")
        if args.out is None and args.grid is None:
            raise InputError("give --out DIR and/or --grid FILE: nowhere to put the images")
        out_is_new = args.out is not None and not args.out.exists()
        _check_outputs(args, out_is_video=False)
        try:
            if args.engine == "ray":  # index ranges on a Ray cluster's actors: the same files
                return generate_on_ray(args)
            return _generate_noise(args)
        except BaseException:
            if out_is_new:  # a run that failed early (no cluster, no model) leaves no empty folder behind
                with contextlib.suppress(OSError):
                    args.out.rmdir()  # only while empty: complete images stay
            raise
    if task is Task.GENERATION_IMAGE:
        if args.input is None:
            raise InputError(f"{args.model.name} is an image -> image model: give --input DIR|IMAGE|VIDEO|URI")
        if args.engine != "local":
            raise InputError("--engine ray runs noise models (--num); image -> image models run with --engine local")
        images = _image_files(args.input)
        if images is None:
            return _generate_stream(args)
        if args.sink:
            raise InputError("--sink takes the frames of a video or live --input; images go to --out DIR")
        if args.out is None:
            raise InputError("give --out DIR for the generated images")
        _check_outputs(args, out_is_video=False)
        return _generate_images(args, images)
    raise InputError(f"{args.model.name} is a {task.value} model; `edgepix generate` runs generators "
                     f"(use `edgepix segment` for segmentation)")


def _check_outputs(args: argparse.Namespace, *, out_is_video: bool) -> None:
    """Check every path the run will write before the model loads (a bad --grid must not cost the whole run)."""
    import cv2

    from ..core.errors import InputError, SinkError
    from ..core.fileio import check_writable, check_writable_folder

    if args.grid is not None:
        if not cv2.haveImageWriter(str(args.grid)):
            raise InputError(f"--grid {args.grid}: expected an image file name such as grid.png")
        check_writable(args.grid, "--grid", SinkError)
    if args.out is not None:
        if out_is_video:
            check_writable(args.out, "--out video", SinkError)
        else:
            check_writable_folder(args.out, "--out folder", SinkError)


def _closing_line(what: str, n: int, seconds: float, batch_ms: list[float], backend: str, batch: int) -> str:
    import numpy as np

    rate = n / seconds if seconds > 0 else float("inf")
    p50 = float(np.median(batch_ms)) if batch_ms else float("nan")
    return (f"{what} {n} images in {seconds:.2f} s: {rate:.1f} images/s (batch {batch}, {p50:.1f} ms per batch "
            f"p50, {backend})")


def _generate_noise(args: argparse.Namespace) -> int:
    import numpy as np

    from ..core.fileio import remove_stale_partials_under
    from ..core.progress import progress_bar
    from ..tasks.generator import NoiseGenerator, tile_grid

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        remove_stale_partials_under(args.out)  # once, rather than a scan of the folder for every image
    keep_for_grid = [] if args.grid is not None else None
    with NoiseGenerator.load(args.model, args.backend, **_backend_options(args)) as gen:
        batch = gen.static_batch or args.batch
        for _ in range(max(0, args.warmup)):
            gen.generate_from(gen.latents(batch, seed=args.seed))
        batch_ms: list[float] = []
        done = 0
        t0 = time.perf_counter()
        with progress_bar(args.num, desc="generate", unit="img", quiet=args.quiet) as bar:
            while done < args.num:
                k = min(batch, args.num - done)
                t1 = time.perf_counter()
                images = gen.generate_from(gen.latents(k, seed=args.seed, start=done))
                batch_ms.append((time.perf_counter() - t1) * 1e3)
                for j, image in enumerate(images):
                    if args.out is not None:
                        write_image(args.out / f"{done + j:05d}.png", image)
                    if keep_for_grid is not None and len(keep_for_grid) < 256:
                        keep_for_grid.append(image)
                done += k
                bar.update(k)
        seconds = time.perf_counter() - t0
        backend = gen.backend.name if hasattr(gen.backend, "name") else type(gen.backend).__name__
    if keep_for_grid:
        write_image(args.grid, tile_grid(keep_for_grid, cols=args.grid_cols))
    # Throughput of the generation itself (latents + inference + conversion), not of PNG encoding, is below.
    gen_s = float(np.sum(batch_ms)) / 1e3
    print(_closing_line("generated", done, gen_s, batch_ms, backend, batch)
          + (f"; with writing {done / seconds:.1f} images/s" if args.out is not None else ""))
    if args.grid is not None:
        print(f"grid: {args.grid}")
    return 0


def _image_files(text: str) -> list[Path] | None:
    """The images of `--input` (a folder or an image file), sorted; None for anything else (a video file or a
    source URI, which the stream pipeline reads)."""
    from ..core.errors import SourceError

    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(f"--input {path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if not path.is_file():
            raise SourceError(f"--input {text}: no such file")
        return [path]
    return None


def _generate_stream(args: argparse.Namespace) -> int:
    """A video or live input through the stream pipeline, into --sink URIs (and --out as a sink)."""
    from ..core.errors import InputError

    sinks = list(args.sink)
    if args.out is not None:  # a video file, or a folder of numbered PNGs as before
        sinks.append(str(args.out) if args.out.suffix.lower() in VIDEO_SUFFIXES else str(args.out / "%06d.png"))
    if not sinks:
        raise InputError("give --sink URI (a video file, a folder/, http://HOST:PORT, display://) or --out")
    job = stream_job(args, sources=[args.input], sinks=sinks, frame_size=args.frame_size)
    return run_stream_command("generate", job, args)


def _generate_images(args: argparse.Namespace, paths: list[Path]) -> int:
    """Image files -> generated PNGs of the same names in --out, --batch at a time."""
    import cv2

    from ..core.errors import SourceError
    from ..core.progress import progress_bar
    from ..tasks.generator import ImageGenerator

    batch_ms: list[float] = []
    with ImageGenerator.load(args.model, args.backend, max_batch=args.batch, to_frame_size=args.frame_size,
                             **_backend_options(args)) as gen:
        batch = gen.max_batch
        args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with progress_bar(len(paths), desc="generate", unit="img", quiet=args.quiet) as bar:
            for s in range(0, len(paths), batch):
                chunk = paths[s:s + batch]
                frames = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in chunk]
                for p, frame in zip(chunk, frames):
                    if frame is None:
                        raise SourceError(f"{p}: cannot read image")
                t1 = time.perf_counter()
                outputs = gen.generate_batch(frames)
                batch_ms.append((time.perf_counter() - t1) * 1e3)
                for p, out in zip(chunk, outputs):
                    write_image(args.out / (p.stem + ".png"), out)
                bar.update(len(chunk))
        seconds = time.perf_counter() - t0
        backend = gen.backend.name if hasattr(gen.backend, "name") else type(gen.backend).__name__
    n = len(paths)
    print(_closing_line("generated", n, sum(batch_ms) / 1e3, batch_ms, backend, batch) + f"; with reading and "
          f"writing {n / seconds:.1f} images/s -> {args.out}")
    return 0


def generate_on_ray(args: argparse.Namespace) -> int:
    """`edgepix generate MODEL --num N --out DIR --engine ray`: the same files as the local run."""
    import math

    from ..batch.cluster import ActorPool, FrameCounter, GenerateActor, actor_count, connected, import_ray, index_spans
    from ..core.errors import InputError
    from ..core.progress import progress_bar
    from .archive import cluster_options

    if args.out is None:
        raise InputError("--engine ray writes the images into --out DIR (a --grid alone runs with --engine local)")
    from ..core.fileio import remove_stale_partials_under

    ray = import_ray()
    options = cluster_options(args)
    model = str(Path(args.model).resolve())
    remove_stale_partials_under(args.out)  # once, rather than a scan of the folder for every image
    t0 = time.perf_counter()
    with connected(ray, options):
        counter = ray.remote(FrameCounter).options(num_cpus=0).remote()
        count = actor_count(ray, options, math.ceil(args.num / args.batch))
        pool = ActorPool(ray, GenerateActor, options, (model, args.backend, options.threads,
                                                       str(args.out.resolve()), args.seed, args.batch, counter), count)
        batch_ms: list[float] = []
        try:
            first = pool.wait_loaded()
            t1 = time.perf_counter()
            with progress_bar(args.num, desc="generate (ray)", unit="img", quiet=args.quiet) as bar:
                pool.run(index_spans(args.num, first["step"], count),
                         on_result=lambda span, value: batch_ms.extend(value["batch_ms"]),
                         on_given_up=_give_up_span, tick=lambda: bar.update(ray.get(counter.take.remote())))
                bar.update(ray.get(counter.take.remote()))
            seconds = time.perf_counter() - t1
        finally:
            pool.close()
    if args.grid is not None:
        _grid_from_files(args)
    _print_generate_line(args, count, options, first, batch_ms, seconds, time.perf_counter() - t0, pool.retries)
    return 0


def _give_up_span(span: tuple[int, int], reason: str, attempts: int) -> None:
    from ..core.errors import EdgepixError

    raise EdgepixError(f"images {span[0]}..{span[1] - 1}: {reason}")


def _grid_from_files(args: argparse.Namespace) -> None:
    """The grid of the local run (its first 256 images), read back from the lossless files."""
    import cv2

    from ..tasks.generator import tile_grid

    images = [cv2.imread(str(args.out / f"{i:05d}.png"), cv2.IMREAD_COLOR) for i in range(min(args.num, 256))]
    write_image(args.grid, tile_grid(images, cols=args.grid_cols))


def _print_generate_line(args, count: int, options, first: dict, batch_ms: list[float],
                         seconds: float, total: float, retries: int) -> None:
    import numpy as np

    p50 = float(np.median(batch_ms)) if batch_ms else float("nan")
    retried = f"; {retries} span(s) retried after an actor died" if retries else ""
    print(f"generated {args.num} images with {count} Ray actors x {options.cpus_per_actor:g} CPU in {seconds:.2f} s "
          f"after loading: {args.num / seconds:.1f} images/s with writing (batch {first['step']}, {p50:.1f} ms per "
          f"batch p50, {first['backend']}){retried}; {total:.1f} s in all -> {args.out}")
    if args.grid is not None:
        print(f"grid: {args.grid}")
    sys.stdout.flush()
