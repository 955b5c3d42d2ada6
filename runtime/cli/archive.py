"""`edgepix segment --archive` and `--engine ray`: the flags, the ArchiveJob they make, the closing line.
The flags are registered without importing the archive machinery, so the command line starts fast."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..batch.cluster import DEFAULT_CHUNK, ClusterOptions
from ..core.errors import InputError
from ..tasks.render import RenderOptions

log = logging.getLogger("edgepix.archive")

def cmd_archive(args: argparse.Namespace) -> int:
    """`edgepix segment ... --archive` or `--engine ray`: the flags as an ArchiveJob, a closing line, failures."""
    for flag, value in (("--realtime", args.realtime), ("--loop", args.loop), ("--duration", args.duration),
                        ("--max-frames", args.max_frames), ("--then", getattr(args, "then", None))):
        if value:
            raise InputError(f"{flag} applies to streams; an archive run (--archive, --engine ray) reads every "
                             "input to its end")
    if len(args.sink) != 1:
        raise InputError(f"an archive run writes into one folder: give one --sink DIR/ (got {len(args.sink)})")
    if not args.source:
        raise InputError("an archive run needs --source: files, a folder or a glob such as 'archive/**/*.mp4'")
    from ..batch.archive import ArchiveJob, WorkersAbandoned, run_archive

    job = ArchiveJob(
        model=args.model, sources=args.source, sink=args.sink[0], backend=args.backend,
        render=RenderOptions(mode=args.vis, alpha=args.alpha, show=tuple(args.classes) if args.classes else None,
                             hide=tuple(args.hide), legend=args.legend),
        upsample=args.upsample, batch=args.max_batch or 1, chunk=args.chunk, engine=args.engine, workers=args.workers,
        threads=args.threads, cluster=cluster_options(args), stats=args.stats, triton_url=args.triton_url,
        quiet=args.quiet, decoder_logs=args.verbose, overwrite=args.overwrite)
    try:
        summary = run_archive(job)  # SIGTERM stops it as Ctrl-C does (the verb's sigterm_interrupts)
    except WorkersAbandoned as e:
        # Ctrl-C twice: the workers are still inside ONNX Runtime or OpenCV. The interpreter's normal exit would
        # destroy C++ objects under their running threads and abort ("terminate called without an active
        # exception"), so the process ends here, right away, after one line. Nothing half-written is at an output
        # path: outputs appear only by rename when complete.
        from ..streams.sinks.video import keep_stderr_for_last_words

        keep_stderr_for_last_words()  # a worker abandoning its video may have silenced FFmpeg's (and our) stderr
        print(f"edgepix segment: interrupted again: {e}", file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    if not args.quiet:
        print(closing_line(summary), file=sys.stderr)
    for f in summary["failures"]:
        print(f"edgepix segment: error: {f['input']}: {f['reason']}", file=sys.stderr)
    return 1 if summary["failures"] else 0


def closing_line(summary: dict) -> str:
    from ..batch.worker import STATE_FOLDER

    fps = f"{summary['fps']:.1f} frames/s" if summary["fps"] else "no frames"
    engine = summary["engine"]
    if engine == "ray" and "actors" in summary:
        engine += f": {summary['actors']} actors x {summary['cpus_per_actor']:g} CPU"
    elif "local_workers" in summary:
        engine += f": {summary['local_workers']} workers x {summary['threads_per_worker'] or 'default'} threads"
    retried = f", {summary['task_retries']} task(s) retried after a worker died" if summary["task_retries"] else ""
    return (f"segmented {summary['done']} of {summary['inputs']} inputs ({summary['frames']} frames) in "
            f"{summary['processing_seconds']:.1f} s after loading: {fps} ({engine}); {summary['skipped']} skipped as "
            f"complete, {summary['failed']} failed{retried}; {summary['seconds']:.1f} s in all; summary: "
            f"{Path(summary['sink']) / STATE_FOLDER / 'summary.json'}")


def add_engine_flags(group) -> None:
    """`--engine` and the cluster's flags, shared by `edgepix segment` and `edgepix generate`."""
    group.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: this process (default); ray: actors on a Ray cluster "
                            "(pip install 'edgepix[scale]')")
    group.add_argument("--address", metavar="auto|HOST:PORT",
                       help="--engine ray: the cluster to join (auto: the one `ray start` runs here; default: "
                            "RAY_ADDRESS, else a private one-node cluster for this run)")
    group.add_argument("--actors", type=int, metavar="N",
                       help="--engine ray: actors, each loading the model once (default: as many as the cluster's "
                            "CPUs, or GPUs, hold)")
    group.add_argument("--cpus-per-actor", type=float, default=1.0, metavar="C",
                       help="--engine ray: CPUs reserved per actor = its inference threads (default 1)")
    group.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G",
                       help="--engine ray: GPUs per actor (0.5 lets two actors share one; default 0)")


def add_archive_flags(p: argparse.ArgumentParser) -> None:
    """`edgepix segment`'s archive flags and the engine's (registered without importing batch.archive, so that the
    command line starts without importing OpenCV)."""
    g = p.add_argument_group("archives (one output per input file) and clusters")
    g.add_argument("--archive", action="store_true",
                   help="segment each file of the sources into its own output under the --sink folder (same "
                        "relative path; videos stay videos, images become PNG), resumable, with a JSON summary in "
                        "SINK/.edgepix/; implied by --engine ray")
    g.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, metavar="N",
                   help=f"archives: images per task (default {DEFAULT_CHUNK}; each video is one task)")
    g.add_argument("--overwrite", action="store_true",
                   help="archives: redo the outputs that were made with another model or other --vis/--alpha/"
                        "--classes/--hide/--legend (without it such a run is refused)")
    add_engine_flags(g)


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    if args.engine != "ray":
        given = [f for f, v in (("--address", args.address), ("--actors", args.actors)) if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} apply to --engine ray")
    return ClusterOptions(address=args.address, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                          gpus_per_actor=args.gpus_per_actor)
