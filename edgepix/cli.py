"""The `edgepix` command: one program, one verb per job.

Verbs register themselves from the package that owns them (`register(subparsers)` in each `cli` module); those
modules import nothing heavy at the top, so `edgepix --help` and `edgepix segment` start fast. Errors that users
can cause (`EdgepixError`) print as one line and exit 1; bad usage prints one line and exits 2; `--verbose` shows
tracebacks. A verb that sets `sigterm_interrupts=True` (export, segment, generate) is stopped by SIGTERM as by
Ctrl-C, so its cleanup (temporary folders, partial files) runs; either ends in one line and exit 130. A reader
that closes the pipe early (`edgepix info MODEL | head -3`) ends the command quietly.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import NoReturn

from edgepix import __version__

# Packages that contribute verbs, in the order their verbs appear in --help. A module that does not exist yet is
# simply not listed here; every listed one must import.
VERB_MODULES = ("edgepix.commands", "edgepix.runtime.cli.spec", "edgepix.runtime.cli.data", "edgepix.train.cli",
                "edgepix.export.cli", "edgepix.runtime.cli.segment", "edgepix.runtime.cli.generate",
                "edgepix.benchmarks.cli")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Optional packages and the pyproject extra that installs each.
EXTRA_OF_PACKAGE = {"torch": "train", "onnx": "train", "onnxscript": "train", "onnxslim": "train", "tqdm": "train",
                    "transformers": "hub", "safetensors": "hub", "tritonclient": "triton", "openvino": "openvino",
                    "matplotlib": "plot", "onnxruntime": "cpu", "tensorrt": "gpu", "cuda": "gpu",
                    "ray": "scale", "cv2": "cpu"}
# OpenCV is not a base dependency (a system's own OpenCV, with GStreamer, must not be shadowed by the wheel).
INSTALL_NOTE = {"cv2": " (OpenCV), or use the system's OpenCV: apt-get install python3-opencv, in a virtual "
                       "environment made with --system-site-packages (docs/install.md)"}


class OneLineUsageParser(argparse.ArgumentParser):
    """argparse's parser with its usage errors in one line, pointing at --help instead of printing the usage block
    (subparsers are made of the same class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineUsageParser(
        prog="edgepix",
        description="Train, export, verify and run segmentation and generation models on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgepix {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or informational output")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    subparsers.required = True
    for name in VERB_MODULES:
        importlib.import_module(name).register(subparsers)
    # Verbs registered as two words ("bench stream") have their own parser; join_compound_verb routes to them.
    parser.set_defaults(_compound_verbs=frozenset(n for n in subparsers.choices if " " in n))
    return parser


def join_compound_verb(argv: Sequence[str], compound: frozenset[str]) -> list[str]:
    """`edgepix [-v] bench stream ...` -> `edgepix [-v] 'bench stream' ...` when 'bench stream' is a verb of its
    own, so that a verb whose first positional takes any word (`bench MODEL ...`) can still have a sub-form. The
    global options before the verb take no values, so the verb is the first word not starting with '-'."""
    argv = list(argv)
    for i, word in enumerate(argv):
        if word.startswith("-"):
            continue
        if i + 1 < len(argv) and f"{word} {argv[i + 1]}" in compound:
            argv[i:i + 2] = [f"{word} {argv[i + 1]}"]
        break
    return argv


def missing_package(package: str, extra: str) -> str:
    return (f"this needs the Python package '{package}', which is not installed here; install it with: "
            f"pip install 'edgepix[{extra}]'{INSTALL_NOTE.get(package, '')}")


def opencv_problem() -> str | None:
    """Why OpenCV does not import, in one line, or None. Building the verbs' flags imports the runtime, which
    needs it; a system OpenCV (built for numpy 1.x) under a numpy 2 that pip installed beside it is the usual case."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # numpy prints a page about the mismatch; one line follows
            import cv2  # noqa: F401
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "cv2":
            raise
        return missing_package("cv2", EXTRA_OF_PACKAGE["cv2"])
    except ImportError as e:
        import numpy

        if int(numpy.__version__.split(".")[0]) < 2:
            return f"OpenCV does not import: {e}"
        return (f"OpenCV does not import with numpy {numpy.__version__} ({e}): an OpenCV built for numpy 1.x "
                "(JetPack's, Debian's python3-opencv) needs: pip install 'numpy<2'")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    problem = opencv_problem()
    if problem is not None:
        print(f"edgepix: error: {problem}", file=sys.stderr)
        return EXIT_FAILURE
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(join_compound_verb(argv, parser.get_default("_compound_verbs")))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    try:
        code = run_verb(args)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's flush at exit
    except BrokenPipeError:
        # The reader closed the pipe (`edgepix info MODEL | head -3`). As Python's documentation of SIGPIPE
        # recommends: point stdout at devnull, so that the flush at exit cannot fail again, and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    return code


def run_verb(args: argparse.Namespace) -> int:
    from edgepix.runtime.core.errors import EdgepixError

    try:
        with sigterm_interrupts(enabled=getattr(args, "sigterm_interrupts", False)):
            code = args.func(args)
    except EdgepixError as e:
        if args.verbose:
            raise
        print(f"edgepix {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"edgepix {args.verb}: interrupted", file=sys.stderr, flush=True)
        if threading.current_thread() is threading.main_thread():
            exit_quietly_on_signals()
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as e:
        # A device gets the runtime only (`edgepix[cpu]`): a verb that needs the training side says which extra
        # to install, in one line, wherever in the verb the import happens.
        package = (e.name or "").split(".")[0]
        extra = EXTRA_OF_PACKAGE.get(package)
        if extra is None or args.verbose:
            raise
        print(f"edgepix {args.verb}: error: {missing_package(package, extra)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if code is None else int(code)


def exit_quietly_on_signals() -> None:
    """After an interrupt, another Ctrl-C or SIGTERM must not change how the process ends: it would end it by the
    signal (exit status -2 instead of 130), or abort it while C++ threads (ONNX Runtime's, OpenCV's) still run.
    Until the interpreter's teardown, such a signal ends the process at once with 130; the teardown itself (which
    puts the default handlers back, after the atexit calls) ignores them: it takes a fraction of a second."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_interrupted)
    atexit.register(_ignore_signals)


def _exit_interrupted(signum, frame) -> NoReturn:  # noqa: ARG001 - the signal module's signature
    os._exit(EXIT_INTERRUPTED)


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def sigterm_interrupts(*, enabled: bool) -> Iterator[None]:
    """While a verb that asks for it runs, SIGTERM raises KeyboardInterrupt as Ctrl-C does, so that its `with` and
    `finally` blocks run (temporary folders removed, partial files abandoned) instead of the process vanishing
    mid-write. Signal handlers belong to the main thread; elsewhere (a test calling main) nothing changes."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
