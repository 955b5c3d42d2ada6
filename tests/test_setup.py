"""`make setup` installs what the tests use: every GStreamer element in a pipeline that a test hands to GStreamer is
in tests/test_gstreamer.py's GST_ELEMENTS (the skip guard of the tests that run in the system env), which the
Makefile's GSTREAMER_CHECK checks and whose packages it installs. A new element in a pipeline, not added there, fails
here instead of failing (or being skipped) on a fresh machine."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from test_gstreamer import GST_ELEMENTS, JETSON_STAND_INS

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# A test that hands pipelines to GStreamer runs in the system env, so it asks for this fixture, which skips without
# an element of GST_ELEMENTS; the pipelines of a test without it are only parsed by edgepix, never by GStreamer.
SYSTEM_ENV_FIXTURE = "sysenv"


def gst_elements(pipeline: str) -> set[str]:
    """The element names in a gst-launch pipeline description ('gst://' in front is dropped): the first word of
    each '!'-separated part, and any later word that is not a property (key=value) nor a pad reference (name.);
    caps (video/x-raw, ...) are a capsfilter. '{}' stands for an f-string's value and is skipped."""
    pipeline = pipeline.strip().removeprefix("gst://")
    names = set()
    for part in re.split(r"(?:^|\s)!(?=\s|$)", pipeline):
        try:
            words = shlex.split(part)
        except ValueError:  # an unbalanced quote
            words = part.split()
        if words and "/" in words[0].split(",")[0].split("(")[0]:
            names.add("capsfilter")
            continue
        names.update(w for w in words if "=" not in w and not w.endswith(".") and w != "{}")
    return names


def _text(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with '{}' for each value."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _is_pipeline(text: str) -> bool:
    return text.lstrip().startswith("gst://") or re.search(r"(?:^|\s)!(?:\s|$)", text) is not None


def pipelines_in(path: Path) -> list[str]:
    """The pipeline strings in a test file that GStreamer may be given: string literals (and lists of words, as
    gst-launch-1.0's command line) with a '!' between elements or a gst:// in front, except docstrings and those in
    test functions that do not ask for SYSTEM_ENV_FIXTURE."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and _text(node.value) is not None:  # a docstring
            skipped.add(id(node.value))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            arguments = [a.arg for a in node.args.args + node.args.kwonlyargs]
            if SYSTEM_ENV_FIXTURE not in arguments:
                skipped.update(id(inner) for inner in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, (ast.List, ast.Tuple)):
            words = [_text(item) for item in node.elts]
            if len(words) > 1 and all(w is not None for w in words) and "!" in words:
                while words and (words[0] == "gst-launch-1.0" or words[0].startswith("-")):
                    words.pop(0)  # the command and its options
                found.append(" ".join(words))  # as gst-launch-1.0 joins its arguments
                skipped.update(id(item) for item in node.elts)
        text = _text(node)
        if text is not None and id(node) not in skipped and _is_pipeline(text):
            found.append(text)
            skipped.update(id(inner) for inner in ast.walk(node))  # not the f-string's parts again
    return found


def runtime_pipelines() -> list[str]:
    """The runtime's own pipelines that the GStreamer tests parse (csi://, rtp:// with each encoder: the Jetson
    ones among stand-ins) and run (rtp:// with x264enc)."""
    from edgepix.runtime.streams.sinks import rtp_pipeline
    from edgepix.runtime.streams.sinks.rtp import H264_ENCODERS
    from edgepix.runtime.streams.sources import SourceOptions, csi_pipeline

    return [csi_pipeline(0, SourceOptions()),
            *(rtp_pipeline(encoder, "127.0.0.1", 5000, fps=30, bitrate_kbits=4000) for encoder, _ in H264_ENCODERS)]


def used_elements() -> dict[str, set[str]]:
    """Element name -> where it is used (a test file, or 'runtime')."""
    used: dict[str, set[str]] = {}
    sources = [(path.name, pipeline) for path in sorted(TESTS.glob("test_*.py")) for pipeline in pipelines_in(path)]
    for where, pipeline in sources + [("runtime", p) for p in runtime_pipelines()]:
        for name in gst_elements(pipeline):
            used.setdefault(name, set()).add(where)
    return used


def make_variable(name: str) -> str:
    """A variable of the Makefile as make expands it."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    done = subprocess.run([make, "-s", "--no-print-directory", "-C", str(REPO), "--eval",
                           "print-%: ; @:$(info $($*))", f"print-{name}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# ---- the element finder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline, elements", [
    ("gst://videotestsrc num-buffers=300 ! video/x-raw,width=640,height=480 ! videoconvert ! appsink",
     {"videotestsrc", "capsfilter", "videoconvert", "appsink"}),
    ('udpsrc port={} caps="application/x-rtp, media=video" ! rtph264depay ! avdec_h264 ! appsink sync=false',
     {"udpsrc", "rtph264depay", "avdec_h264", "appsink"}),
    ("nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM), width=1280, format=NV12 ! nvvidconv flip-method=0",
     {"nvarguscamerasrc", "capsfilter", "nvvidconv"}),
    ("filesrc location=/data/udpsrc.mp4 ! decodebin name=d  d. ! queue ! fakesink  videotestsrc is-live=1 ! appsink",
     {"filesrc", "decodebin", "queue", "fakesink", "videotestsrc", "appsink"}),
    ("! video/x-raw,framerate=60/1 ! videoconvert ! appsink", {"capsfilter", "videoconvert", "appsink"}),
])
def test_the_element_names_of_a_pipeline_are_found(pipeline, elements):
    assert gst_elements(pipeline) == elements


def test_pipelines_are_found_in_literals_f_strings_and_gst_launch_command_lines(tmp_path):
    source = tmp_path / "test_example.py"
    source.write_text('''"""A docstring that mentions videotestsrc ! fakesink."""
SENDER = ["gst-launch-1.0", "-q", "videotestsrc", "is-live=true", "!", "x264enc", "!", "udpsink", f"port={1}"]
PATTERN = "! video/x-raw,width=160 ! videoconvert ! appsink"

def helper(port):
    return f"udpsrc port={port} ! rtph264depay ! " "appsink"

def test_runs_in_the_system_env(sysenv, port):
    live = f"gst://videotestsrc is-live=true {PATTERN}"

@pytest.mark.parametrize("pipeline", ["v4l2src ! appsink"])
def test_only_parses(pipeline):
    assert parse("gst://nvarguscamerasrc ! appsink")
''', encoding="utf-8")
    found = pipelines_in(source)
    assert sorted(found) == sorted([
        "videotestsrc is-live=true ! x264enc ! udpsink port={}",
        "! video/x-raw,width=160 ! videoconvert ! appsink",
        "udpsrc port={} ! rtph264depay ! appsink",
        "gst://videotestsrc is-live=true {}"]), found
    assert set().union(*map(gst_elements, found)) == {"videotestsrc", "x264enc", "udpsink", "capsfilter",
                                                     "videoconvert", "appsink", "udpsrc", "rtph264depay"}


# ---- the tests' elements, the skip guard and the Makefile ---------------------------------------------------------


def test_every_element_the_gstreamer_tests_use_is_checked_before_they_run():
    used = used_elements()
    # The runtime's rtp:// pipeline on a Jetson has h264parse, an element that is not on every machine (-bad).
    assert {"h264parse", "x264enc", "rtph264pay", "udpsrc", "avdec_h264", "appsink"} <= set(used), used
    unchecked = {name: sorted(where) for name, where in used.items()
                 if name not in GST_ELEMENTS and name not in JETSON_STAND_INS}
    assert not unchecked, (f"GStreamer elements used but not in tests/test_gstreamer.py's GST_ELEMENTS (nor the "
                           f"Makefile's GSTREAMER_ELEMENTS): {unchecked}")
    unused = set(GST_ELEMENTS) - set(used)
    assert not unused, f"GST_ELEMENTS lists elements that no pipeline uses any more: {sorted(unused)}"


def test_the_jetson_stand_ins_are_registered_by_the_csi_test():
    from test_gstreamer import _PARSE_CSI

    registered = re.findall(r'\("(\w+)", (?:StandIn|stand_in_transform)', _PARSE_CSI)
    assert sorted(registered) == sorted(JETSON_STAND_INS)


def test_make_setup_installs_the_package_of_every_element():
    elements, listed = set(make_variable("GSTREAMER_ELEMENTS").split()), set(GST_ELEMENTS)
    assert elements == listed, (f"the Makefile's GSTREAMER_ELEMENTS lacks {sorted(listed - elements)} and has "
                                f"{sorted(elements - listed)} besides GST_ELEMENTS")
    packages = set(make_variable("GSTREAMER_PACKAGES").split())
    assert set(GST_ELEMENTS.values()) <= packages, sorted(set(GST_ELEMENTS.values()) - packages)


def run_check(tmp_path: Path, absent: str | None) -> tuple[int, list[str]]:
    """The Makefile's GSTREAMER_CHECK with a gst-inspect-1.0 that has every element but `absent`: (exit code,
    the elements it was asked about)."""
    asked = tmp_path / "asked"
    fake = tmp_path / "bin" / "gst-inspect-1.0"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f'#!/bin/sh\n[ "$1" = --exists ] || exit 2\necho "$2" >> {asked}\n[ "$2" != "{absent}" ]\n')
    fake.chmod(0o755)
    asked.write_text("")
    done = subprocess.run(["sh", "-c", make_variable("GSTREAMER_CHECK")], capture_output=True, text=True,
                          env={"PATH": f"{fake.parent}:/usr/bin:/bin"}, timeout=60)
    return done.returncode, asked.read_text().split()


def test_make_setups_check_asks_for_every_element_and_fails_without_one(tmp_path):
    code, asked = run_check(tmp_path, absent=None)
    if code != 0 and not asked:
        pytest.skip("the check stops at the system python3's cv2/gi/ensurepip (python3-opencv, python3-gst-1.0, "
                    "python3-venv: make setup installs them) before it asks for elements")
    assert code == 0 and sorted(asked) == sorted(GST_ELEMENTS), (code, asked)
    code, asked = run_check(tmp_path, absent="h264parse")
    assert code != 0 and asked[-1] == "h264parse", (code, asked)  # so make setup installs the packages
