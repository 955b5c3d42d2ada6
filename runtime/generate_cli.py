"""`edgepix generate`: images from a noise generator (DCGAN) or an image-to-image generator (pix2pix).

    edgepix generate MODEL --num N --batch B --seed S --out DIR [--grid FILE]       # noise -> images
    edgepix generate MODEL --input DIR|VIDEO|IMAGE --out DIR|FILE                    # image -> image

Torch-free (numpy, OpenCV, a runtime backend). Image i of a noise model depends only on (seed, i), so any batch
size gives the same images. Progress on stderr; the closing line states images/s and the time per batch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .formats import IMAGE_SUFFIXES, VIDEO_SUFFIXES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate images: noise -> image (--num) or image -> image (--input)",
        description="Run an exported generator. Noise models (DCGAN): --num images from latents seeded by --seed, "
                    "--batch per inference call, written to --out as PNGs and/or tiled into --grid. Image models "
                    "(pix2pix): every image of a folder, an image file or every frame of a video through the model; "
                    "--out is a folder, or a video file for video input.")
    p.add_argument("model", type=Path, help="an exported generator (.onnx, or a TensorRT .engine)")
    p.add_argument("--num", "-n", type=int, help="noise models: number of images")
    p.add_argument("--batch", "-b", type=int, default=8, help="latents or images per inference call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="noise models: latent seed (default 0)")
    p.add_argument("--input", "-i", help="image models: a folder of images, an image, or a video file")
    p.add_argument("--out", "-o", type=Path, help="output folder (or a video file for video input)")
    p.add_argument("--grid", type=Path, help="also tile the images into this PNG (noise models; at most 256)")
    p.add_argument("--grid-cols", type=int, default=None, help="grid columns (default: square)")
    p.add_argument("--frame-size", action="store_true", help="image models: resize outputs back to the input size")
    p.add_argument("--backend", default="auto",
                   help="inference backend (auto, ort-cpu, ort-cuda, ort-trt, opencv, tensorrt)")
    p.add_argument("--threads", type=int, help="threads per inference call (CPU backends)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches before timing (default 1)")
    p.set_defaults(func=cmd_generate)


def _backend_options(args: argparse.Namespace) -> dict:
    return {"threads": args.threads} if args.threads else {}


def cmd_generate(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .spec import Task

    if args.batch < 1:
        raise InputError(f"--batch must be at least 1, got {args.batch}")
    spec = _read_spec(args.model)
    task = spec.task if spec is not None else (Task.GENERATION_NOISE if args.num is not None else Task.GENERATION_IMAGE)
    if task is Task.GENERATION_NOISE:
        if args.input is not None:
            raise InputError(f"{args.model.name} is a noise -> image model: give --num N, not --input")
        if args.num is None or args.num < 1:
            raise InputError("a noise -> image model needs --num N (N >= 1) images to generate")
        if args.out is None and args.grid is None:
            raise InputError("give --out DIR and/or --grid FILE: nowhere to put the images")
        _check_outputs(args, out_is_video=False)
        return _generate_noise(args)
    if task is Task.GENERATION_IMAGE:
        if args.input is None:
            raise InputError(f"{args.model.name} is an image -> image model: give --input DIR|IMAGE|VIDEO")
        if args.out is None:
            raise InputError("give --out DIR (or --out FILE.mp4 for a video input)")
        _check_outputs(args, out_is_video=args.out.suffix.lower() in VIDEO_SUFFIXES)
        return _generate_images(args)
    raise InputError(f"{args.model.name} is a {task.value} model; `edgepix generate` runs generators "
                     f"(use `edgepix segment` for segmentation)")


def _read_spec(path: Path):
    from .errors import ModelFormatError
    from .spec import ModelSpec

    if not path.exists():
        raise ModelFormatError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        return ModelSpec.from_onnx(path)
    manifest = path.with_name(path.name + ".json")
    return ModelSpec.load_json(manifest) if manifest.exists() else None


def _check_outputs(args: argparse.Namespace, *, out_is_video: bool) -> None:
    """Check every path the run will write before the model loads (a bad --grid must not cost the whole run)."""
    import cv2

    from .errors import InputError, SinkError
    from .fileio import check_writable, check_writable_folder

    if args.grid is not None:
        if not cv2.haveImageWriter(str(args.grid)):
            raise InputError(f"--grid {args.grid}: expected an image file name such as grid.png")
        check_writable(args.grid, "--grid", SinkError)
    if args.out is not None:
        if out_is_video:
            check_writable(args.out, "--out video", SinkError)
        else:
            check_writable_folder(args.out, "--out folder", SinkError)


def _write(path: Path, image) -> None:
    import cv2

    from .errors import SinkError

    if not cv2.imwrite(str(path), image):
        raise SinkError(f"cannot write {path} (disk full or not writable?)")


def _write_atomic(path: Path, image) -> None:
    """An image that appears complete or not at all (the partial name keeps the extension cv2 needs)."""
    from .errors import SinkError
    from .fileio import atomic_output

    try:
        with atomic_output(path) as tmp:
            _write(tmp, image)
    except OSError as e:
        raise SinkError(f"cannot write {path}: {e.strerror or e}") from None


def _closing_line(what: str, n: int, seconds: float, batch_ms: list[float], backend: str, batch: int) -> str:
    import numpy as np

    rate = n / seconds if seconds > 0 else float("inf")
    p50 = float(np.median(batch_ms)) if batch_ms else float("nan")
    return (f"{what} {n} images in {seconds:.2f} s: {rate:.1f} images/s (batch {batch}, {p50:.1f} ms per batch "
            f"p50, {backend})")


def _generate_noise(args: argparse.Namespace) -> int:
    import numpy as np

    from .generator import NoiseGenerator, tile_grid
    from .progress import progress_bar

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
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
                        _write(args.out / f"{done + j:05d}.png", image)
                    if keep_for_grid is not None and len(keep_for_grid) < 256:
                        keep_for_grid.append(image)
                done += k
                bar.update(k)
        seconds = time.perf_counter() - t0
        backend = gen.backend.name if hasattr(gen.backend, "name") else type(gen.backend).__name__
    if keep_for_grid:
        _write_atomic(args.grid, tile_grid(keep_for_grid, cols=args.grid_cols))
    # Throughput of the generation itself (latents + inference + conversion), not of PNG encoding, is below.
    gen_s = float(np.sum(batch_ms)) / 1e3
    print(_closing_line("generated", done, gen_s, batch_ms, backend, batch)
          + (f"; with writing {done / seconds:.1f} images/s" if args.out is not None else ""))
    if args.grid is not None:
        print(f"grid: {args.grid}")
    return 0


def _image_inputs(text: str):
    """(kind, items): 'video' with a path, or 'images' with a sorted list of paths."""
    from .errors import SourceError

    path = Path(text)
    if not path.exists():
        raise SourceError(f"--input {text}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(f"--input {path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return "images", files
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "images", [path]
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return "video", path
    raise SourceError(f"--input {path}: expected a folder, an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a "
                      f"video ({', '.join(sorted(VIDEO_SUFFIXES))})")


def _generate_images(args: argparse.Namespace) -> int:
    import cv2

    from .errors import InputError, SourceError
    from .generator import ImageGenerator
    from .progress import progress_bar
    from .sinks import VIDEO_CODECS, VideoFileWriter

    kind, items = _image_inputs(args.input)
    to_video = args.out.suffix.lower() in VIDEO_SUFFIXES
    if to_video and kind != "video":
        raise InputError(f"--out {args.out} is a video file; image inputs are written to a folder")
    batch_ms: list[float] = []
    n = 0
    with ImageGenerator.load(args.model, args.backend, **_backend_options(args)) as gen:
        batch = gen.static_batch or args.batch
        backend = gen.backend.name if hasattr(gen.backend, "name") else type(gen.backend).__name__
        t0 = time.perf_counter()
        if kind == "images":
            args.out.mkdir(parents=True, exist_ok=True)
            with progress_bar(len(items), desc="generate", unit="img", quiet=args.quiet) as bar:
                for s in range(0, len(items), batch):
                    paths = items[s:s + batch]
                    frames = []
                    for p in paths:
                        frame = cv2.imread(str(p), cv2.IMREAD_COLOR)
                        if frame is None:
                            raise SourceError(f"{p}: cannot read image")
                        frames.append(frame)
                    t1 = time.perf_counter()
                    outputs = gen.generate_batch(frames, to_frame_size=args.frame_size)
                    batch_ms.append((time.perf_counter() - t1) * 1e3)
                    for p, out in zip(paths, outputs):
                        _write(args.out / (p.stem + ".png"), out)
                    n += len(paths)
                    bar.update(len(paths))
        else:
            cap = cv2.VideoCapture(str(items))
            if not cap.isOpened():
                raise SourceError(f"--input {items}: cannot open the video")
            total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
            fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
            writer = None
            if not to_video:
                args.out.mkdir(parents=True, exist_ok=True)
            try:
                with progress_bar(total, desc="generate", unit="frame", quiet=args.quiet) as bar:
                    while True:
                        frames = []
                        while len(frames) < batch:
                            ok, frame = cap.read()
                            if not ok:
                                break
                            frames.append(frame)
                        if not frames:
                            break
                        t1 = time.perf_counter()
                        outputs = gen.generate_batch(frames, to_frame_size=args.frame_size)
                        batch_ms.append((time.perf_counter() - t1) * 1e3)
                        for out in outputs:
                            if to_video:
                                if writer is None:
                                    # The stream sink's writer: every write checked, the file verified and
                                    # renamed into place only when complete.
                                    writer = VideoFileWriter(args.out, fps, False,
                                                             VIDEO_CODECS[args.out.suffix.lower()])
                                writer.write(out, 0.0)
                            else:
                                _write(args.out / f"{n:06d}.png", out)
                            n += 1
                        bar.update(len(frames))
                if writer is not None:
                    writer.close()  # a SinkError if the finished file is incomplete
                    writer = None
            finally:
                cap.release()
                if writer is not None:  # an error above: no half-written video at --out
                    writer.abandon()
        seconds = time.perf_counter() - t0
    if n == 0:
        raise SourceError(f"--input {args.input}: no frames")
    gen_s = sum(batch_ms) / 1e3
    print(_closing_line("generated", n, gen_s, batch_ms, backend, batch) + f"; with reading and writing "
          f"{n / seconds:.1f} images/s -> {args.out}")
    return 0

