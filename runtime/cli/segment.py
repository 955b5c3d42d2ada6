"""Runtime verbs: `edgepix segment` (the stream pipeline). Nothing heavy is imported until a handler runs, so
the command starts fast."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

VIS_MODES = ("overlay", "mask", "side")
#: the epilog of verbs that read sources and write sinks: replaced by the URI rows when help is shown
URI_EPILOG = "(the URIs of every source and sink kind)"


class UriHelpFormatter(argparse.HelpFormatter):
    """Help that ends with the source and sink URIs, read from each kind's `URI_HELP` rows (the same rows
    docs/streams.md shows). The sources and sinks import OpenCV, so this happens only when help is printed."""

    def add_text(self, text: str | None) -> None:
        if text != URI_EPILOG:
            super().add_text(text)
            return
        from ..streams.sinks import URI_HELP as SINK_URIS
        from ..streams.sources import URI_HELP as SOURCE_URIS

        width = max(40, self._width - 6)
        lines = []
        for title, rows in (("source URIs (--source):", SOURCE_URIS), ("sink URIs (--sink):", SINK_URIS)):
            lines.append(title)
            for uri, what in rows:
                lines.append("  " + uri.replace("`", ""))
                lines.extend(textwrap.wrap(what.replace("`", ""), width, initial_indent="      ",
                                           subsequent_indent="      "))
        self._add_item(lambda: "\n".join(lines) + "\n", [])


def _size(text: str) -> tuple[int, int]:
    from ..streams.sources import parse_size

    try:
        return parse_size(text)
    except Exception as e:  # argparse turns this into a usage error (exit 2)
        raise argparse.ArgumentTypeError(str(e)) from None


def source_uri(text: str) -> str:
    """--source (and generate's --input): an empty value would otherwise read as no source at all, which the
    runtime takes for the synthetic scenes: a usage error instead."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a source URI (a camera number, a file, a folder, a glob, "
                                         "rtsp://..., synthetic://), got an empty string")
    return text


def _class_key(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every verb that runs the stream pipeline (`segment`, `generate --input VIDEO|URI`); read back
    by `stream_job`. Most are StreamJob's and SourceOptions' own (their fields declare them)."""
    from ..streams.jobs import StreamJob
    from ..streams.sources import SourceOptions
    from .flags import add_config_flags

    add_config_flags(p, SourceOptions, ["realtime", "loop"])
    add_config_flags(p, StreamJob, ["stats", "duration", "max_frames"])
    p.add_argument("--no-hud", action="store_true", help="display:// without the FPS and timing overlay")
    add_config_flags(p.add_argument_group("inference"), StreamJob,
                     ["workers", "threads", "batch_timeout_ms", "max_batch", "triton_url", "triton_retries"])
    g = p.add_argument_group("sources")
    g.add_argument("--input-size", type=_size, metavar="WxH", help="requested camera mode, e.g. 1280x720")
    add_config_flags(g, SourceOptions, ["fps"])
    g.add_argument("--input-codec", metavar="FOURCC", help="requested camera pixel format, e.g. MJPG")
    add_config_flags(g, SourceOptions, ["open_timeout", "read_timeout", "rtsp_transport", "reconnect_attempts",
                                        "backoff_max"])


def stream_job(args: argparse.Namespace, *, sources: list[str], sinks: list[str], **fields):
    """The StreamJob (streams/jobs.py) that `add_stream_arguments`' flags describe, plus the verb's own `fields`."""
    from ..streams.jobs import StreamJob
    from ..streams.sources import SourceOptions
    from .flags import config_values

    source_options = SourceOptions(**config_values(args, SourceOptions), size=args.input_size,
                                   codec=args.input_codec.upper() if args.input_codec else None)
    return StreamJob(**config_values(args, StreamJob), model=args.model, sources=sources, sinks=sinks,
                     backend=args.backend, source_options=source_options, hud=not args.no_hud,
                     status_interval=1.0 if sys.stderr.isatty() else 5.0, **fields)


def run_stream_command(verb: str, job, args: argparse.Namespace) -> int:
    """Run a StreamJob with a status line on stderr; print the summary; exit 1 if a stream failed."""
    import logging

    from ..streams.jobs import run_stream
    from ..streams.pipeline import summary_line

    if not args.verbose:  # --verbose keeps FFmpeg's and OpenCV's own logs
        from ..streams.sources import quiet_decoder_logs

        quiet_decoder_logs()
    log = logging.getLogger(f"edgepix.{verb}")
    stats = run_stream(job, status=None if args.quiet else _status,
                       describe=None if args.quiet else (lambda line: log.info("%s", line)))
    if not args.quiet:
        print(summary_line(stats), file=sys.stderr)
    failed = [s for s in stats["streams"] if s.get("error")]
    for s in failed:  # a stream that could not be read or gave up reconnecting fails the run (after the files)
        print(f"edgepix {verb}: error: stream {s['stream_id']} ({s['uri']}): {s['error']}", file=sys.stderr)
    return 1 if failed else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="segment live streams, videos or images in real time (sources -> model -> sinks)",
        description="Segment frames from one or more sources and send the rendered results to sinks, with "
                    "capture, inference, rendering and encoding in parallel threads. Sources: a camera number, "
                    "/dev/videoN, v4l2://, csi://N, rtsp://, rtmp://, http(s)://, gst://PIPELINE, a video, an image, "
                    "a folder, a glob, synthetic:// (the default). Sinks: display:// (the default when there is a "
                    "screen), a video file (.mp4 .avi .mkv .webm), a folder/, http://HOST:PORT (MJPEG + page; "
                    "127.0.0.1 unless told otherwise), null://. Ctrl-C or SIGTERM stops cleanly and finishes files.",
        epilog=URI_EPILOG, formatter_class=UriHelpFormatter)
    p.add_argument("model", type=Path,
                   help="an exported .onnx file (or a TensorRT .engine, or a LiteRT .tflite); with --backend triton, "
                        "the model's name on the server")
    p.add_argument("--source", "-s", action="append", default=[], metavar="URI", type=source_uri,
                   help="where frames come from (repeat for several streams, batched together)")
    p.add_argument("--sink", "-o", action="append", default=[], metavar="URI",
                   help="where rendered frames go (repeatable; URI?stream=N for one stream only)")
    p.add_argument("--backend", default="auto",
                   help="inference backend (auto, ort-cpu, ort-cuda, ort-trt, opencv, openvino, tensorrt, triton, "
                        "litert)")
    p.add_argument("--vis", choices=VIS_MODES, default="overlay", help="how to draw the classes")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours in the overlay (0..1)")
    p.add_argument("--classes", nargs="+", type=_class_key, metavar="CLASS",
                   help="draw only these classes (names or indices)")
    p.add_argument("--hide", nargs="+", type=_class_key, default=(), metavar="CLASS", help="never draw these classes")
    p.add_argument("--legend", action="store_true", help="draw a legend of the classes")
    p.add_argument("--then", type=Path, metavar="MODEL",
                   help="a chain: paint each class map with this mask -> image generator's palette and run it (a "
                        "pix2pix model trained on masks); the sinks get its pictures")
    p.add_argument("--show", choices=("side", "generated"), default="side",
                   help="with --then: the frame and the picture side by side (default), or the picture alone")
    from ..streams.jobs import StreamJob
    from .flags import add_config_flags

    add_config_flags(p, StreamJob, ["upsample", "temporal", "temporal_alpha"])
    add_stream_arguments(p)
    from .archive import add_archive_flags

    add_archive_flags(p)
    p.set_defaults(func=cmd_segment, sigterm_interrupts=True)  # outside a stream run too (loading, archives)


def cmd_segment(args: argparse.Namespace) -> int:
    """The flags as a StreamJob (runtime.streams.jobs), then the summary and the exit code; an archive run (--archive,
    --engine ray: one output per input file) is runtime.batch.archive's."""
    if args.archive or args.engine != "local":
        from .archive import cmd_archive

        return cmd_archive(args)
    if args.overwrite:
        from ..core.errors import InputError

        raise InputError("--overwrite applies to archive runs (--archive): a stream's outputs are always new")
    from ..tasks.render import RenderOptions

    job = stream_job(args, sources=args.source or ["synthetic://"], sinks=args.sink, then=args.then,
                     show=args.show,
                     render=RenderOptions(mode=args.vis, alpha=args.alpha, hide=tuple(args.hide), legend=args.legend,
                                          show=tuple(args.classes) if args.classes else None))
    return run_stream_command("segment", job, args)


_last_len = [0]


def _status(line: str) -> None:
    """A status line: rewritten in place on a terminal, one line per update in a log."""
    if sys.stderr.isatty():
        text = line.rstrip("\n")
        pad = max(0, _last_len[0] - len(text))
        sys.stderr.write("\r" + text + " " * pad + ("\n" if line.endswith("\n") else ""))
        _last_len[0] = 0 if line.endswith("\n") else len(text)
    else:
        sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()
