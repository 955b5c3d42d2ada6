"""GStreamer for real: edgepix in an environment of the system's Python and OpenCV (Debian's python3-opencv, built
with GStreamer), installed the way docs/install.md says for such systems (no opencv-python wheel).

`make setup` makes that environment once (SYSTEM_OPENCV_ENV, by default .venv-system in the checkout; this
file reads EDGEPIX_SYSTEM_OPENCV_ENV); the tests run the CLI and small scripts in it, against real GStreamer
pipelines: videotestsrc, a file through decodebin, H.264 over RTP/UDP on loopback from a gst-launch-1.0 sender that
is killed and restarted, the csi:// pipeline strings, newest-frame reading, and the rtp:// sink read back. They
skip, saying why, where python3-opencv, the environment or a GStreamer element is missing."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_stream_support import channel_model, free_port, write_scene_video

REPO = Path(__file__).resolve().parents[1]
ENV = Path(os.environ.get("EDGEPIX_SYSTEM_OPENCV_ENV", REPO / ".venv-system"))
ENV_PYTHON = ENV / "bin" / "python"
SYSTEM_PYTHON = "/usr/bin/python3"
RTP_CAPS = "application/x-rtp,media=video,encoding-name=H264,payload=96,clock-rate=90000"
# Every GStreamer element that the pipelines here, gst-launch-1.0's and the runtime's csi:// and rtp:// ones that these
# tests parse or run use, with the Debian package that has it: the one list. Every test that runs in the system env
# skips without any of them (sysenv); the Makefile's GSTREAMER_ELEMENTS checks the same names and make setup installs
# the packages; tests/test_setup.py fails when a pipeline here uses an element missing from this list or the Makefile.
GST_ELEMENTS = {
    "capsfilter": "libgstreamer1.0-0", "filesrc": "libgstreamer1.0-0",
    "appsink": "gstreamer1.0-plugins-base", "appsrc": "gstreamer1.0-plugins-base",
    "decodebin": "gstreamer1.0-plugins-base", "videoconvert": "gstreamer1.0-plugins-base",
    "videotestsrc": "gstreamer1.0-plugins-base",
    "rtph264depay": "gstreamer1.0-plugins-good", "rtph264pay": "gstreamer1.0-plugins-good",
    "udpsink": "gstreamer1.0-plugins-good", "udpsrc": "gstreamer1.0-plugins-good",
    "h264parse": "gstreamer1.0-plugins-bad",
    "x264enc": "gstreamer1.0-plugins-ugly",
    "avdec_h264": "gstreamer1.0-libav",
}
# JetPack's elements, absent here: the csi:// test registers stand-ins for them (_PARSE_CSI) and only parses.
JETSON_STAND_INS = ("nvarguscamerasrc", "nvvidconv", "nvv4l2h264enc")

_PROBE = """import json, cv2, edgepix.runtime
from edgepix.runtime.streams.sources import opencv_has_gstreamer
print(json.dumps({"cv2": cv2.__file__, "version": cv2.__version__, "runtime": edgepix.runtime.__file__,
                  "gstreamer": opencv_has_gstreamer()}))"""


def env_vars() -> dict[str, str]:
    """The environment for the system env's processes: nothing of this test process's virtual environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PYTHONUNBUFFERED": "1"}


@functools.cache
def system_env() -> dict | str:
    """The system env's facts, or why the tests cannot run here."""
    if not Path(SYSTEM_PYTHON).exists() or subprocess.run([SYSTEM_PYTHON, "-c", "import cv2"],
                                                          capture_output=True).returncode != 0:
        return "python3-opencv is not installed (apt-get install python3-opencv; make setup does it as root)"
    if not ENV_PYTHON.exists():
        return f"no system-OpenCV environment at {ENV}: make setup creates it"
    done = subprocess.run([str(ENV_PYTHON), "-c", _PROBE], capture_output=True, text=True, env=env_vars(),
                          timeout=60, cwd="/")
    if done.returncode != 0:
        return f"the environment at {ENV} does not import edgepix and cv2 (make setup): {done.stderr[-300:]}"
    facts = json.loads(done.stdout)
    if Path(facts["runtime"]).resolve() != REPO / "runtime" / "__init__.py":
        return f"the environment at {ENV} holds another edgepix ({facts['runtime']}); make setup installs this one"
    if not facts["gstreamer"]:
        return f"the system's OpenCV {facts['version']} has no GStreamer"
    return missing_elements() or facts


def missing_elements() -> str | None:
    """Why the GStreamer tools or an element of GST_ELEMENTS are missing, or None."""
    inspect = shutil.which("gst-inspect-1.0")
    if inspect is None or shutil.which("gst-launch-1.0") is None:
        return "gst-launch-1.0 is not installed (apt-get install gstreamer1.0-tools; make setup does it)"
    missing = {name: package for name, package in GST_ELEMENTS.items()
               if subprocess.run([inspect, "--exists", name], capture_output=True).returncode != 0}
    if missing:
        return (f"GStreamer elements {', '.join(missing)} are not installed (apt-get install "
                f"{' '.join(sorted(set(missing.values())))}; make setup installs them)")
    return None


@pytest.fixture(scope="module")
def sysenv() -> dict:
    facts = system_env()
    if isinstance(facts, str):
        pytest.skip(facts)
    return facts


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return channel_model(tmp_path_factory.mktemp("gst_model") / "channels.onnx")


def env_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENV_PYTHON), "-c", code, *args], capture_output=True, text=True, env=env_vars(),
                          timeout=timeout, cwd="/")


def segment(model: Path, source: str, tmp_path: Path, *args: str, timeout: float = 120) -> tuple[int, dict, str]:
    """`edgepix segment` in the system env: (exit code, statistics, stderr)."""
    stats = tmp_path / "stats.json"
    done = subprocess.run([str(ENV_PYTHON), "-m", "edgepix", "segment", str(model), "--source", source,
                           "--stats", str(stats), *args], capture_output=True, text=True, env=env_vars(),
                          timeout=timeout, cwd="/")
    return done.returncode, json.loads(stats.read_text()) if stats.exists() else {}, done.stderr


# ---- the install ------------------------------------------------------------------------------------------


def test_the_documented_install_keeps_the_system_opencv_and_doctor_says_so(sysenv):
    assert sysenv["cv2"].startswith("/usr/lib/"), sysenv  # the system's cv2, not a wheel
    listed = env_python("import importlib.metadata as m; print([d.metadata['Name'] for d in m.distributions()])")
    assert "opencv" not in listed.stdout.lower(), listed.stdout
    doctor = subprocess.run([str(ENV_PYTHON), "-m", "edgepix", "doctor"], capture_output=True, text=True,
                            env=env_vars(), timeout=120, cwd="/")
    lines = {line.split()[0]: line for line in doctor.stdout.splitlines() if line.strip()}
    assert doctor.returncode == 0, doctor.stderr
    assert f"{sysenv['version']} at {Path(sysenv['cv2']).parent} (system package)" in lines["opencv"]
    assert "GStreamer yes" in lines["opencv"] and "FFmpeg yes" in lines["opencv"]
    assert "gstreamer" not in lines and "opencv-version" not in lines


def test_a_pip_opencv_in_front_of_the_system_one_is_named_with_the_fix(sysenv, tmp_path):
    """A stand-in for `pip install opencv-python` in that environment: this test process's own opencv-python
    wheel (no GStreamer), placed first on the path with its pip metadata, as pip would have placed it."""
    import cv2

    from edgepix.runtime.streams.sources import opencv_has_gstreamer

    wheel_dir = Path(cv2.__file__).parent.parent
    dist_info = sorted(wheel_dir.glob("opencv_python-*.dist-info"))
    if not dist_info or opencv_has_gstreamer():
        pytest.skip("this test process's OpenCV is not the opencv-python wheel without GStreamer")
    for item in [wheel_dir / "cv2", dist_info[0], *wheel_dir.glob("opencv_python.libs")]:
        (tmp_path / item.name).symlink_to(item)
    doctor = subprocess.run([str(ENV_PYTHON), "-m", "edgepix", "doctor"], capture_output=True, text=True,
                            env={**env_vars(), "PYTHONPATH": str(tmp_path)}, timeout=120, cwd="/")
    lines = {line.split()[0]: line for line in doctor.stdout.splitlines() if line.strip()}
    assert f"(pip: opencv-python {cv2.__version__}" in lines["opencv"] and "GStreamer no" in lines["opencv"]
    assert lines["gstreamer"].split()[1] == "shadowed", lines["gstreamer"]
    assert f"system's OpenCV {sysenv['version']}" in lines["gstreamer"]
    assert f"{ENV_PYTHON.parent}/python" in lines["gstreamer"] and "-m pip uninstall -y opencv-python" in lines[
        "gstreamer"]
    assert "1 to fix" in doctor.stdout


# ---- sources ----------------------------------------------------------------------------------------------


def test_videotestsrc_segments_every_frame(sysenv, model, tmp_path):
    source = "gst://videotestsrc num-buffers=300 ! video/x-raw,width=640,height=480 ! videoconvert ! appsink"
    code, stats, stderr = segment(model, source, tmp_path, "--sink", "null://")
    assert code == 0, stderr[-2000:]
    s = stats["streams"][0]
    assert (s["frames_read"], s["frames_processed"], s["dropped"], stats["frames"]) == (300, 300, 0, 300), s
    assert (s["size"], s["live"], s["state"], s["error"], s["reconnects"]) == ([640, 480], False, "ended", None, 0)
    assert "segmented 300 frames" in stderr and "Traceback" not in stderr


def test_a_file_through_decodebin_gives_every_frame(sysenv, model, tmp_path):
    video = write_scene_video(tmp_path / "scene.mp4", n=48, size=(320, 240), fps=24)
    source = f"gst://filesrc location={video} ! decodebin ! videoconvert ! appsink sync=false"
    code, stats, stderr = segment(model, source, tmp_path, "--sink", "null://")
    assert code == 0, stderr[-2000:]
    s = stats["streams"][0]
    assert (s["frames_read"], s["frames_processed"], s["dropped"], s["size"]) == (48, 48, 0, [320, 240]), s
    assert s["fps_nominal"] == pytest.approx(24) and s["state"] == "ended" and s["error"] is None


@pytest.mark.parametrize("pipeline, finite", [
    ("videotestsrc num-buffers=300 ! videoconvert ! appsink", True),
    ("filesrc location=/data/udpsrc.mp4 ! decodebin ! videoconvert ! appsink", True),  # a value, not an element
    ("uridecodebin uri=file:///data/a.mp4 ! videoconvert ! appsink", True),
    ("videotestsrc is-live=true ! videoconvert ! appsink", False),
    ("uridecodebin uri=rtsp://camera/stream ! videoconvert ! appsink", False),
    (f'udpsrc port=5000 caps="{RTP_CAPS}" ! rtph264depay ! avdec_h264 ! videoconvert ! appsink', False),
    ("v4l2src device=/dev/video0 ! videoconvert ! appsink", False),
    ("nvarguscamerasrc sensor-id=0 ! nvvidconv ! appsink", False),
    ("filesrc location=a.mp4 ! decodebin ! videoconvert ! appsink  videotestsrc is-live=1 ! fakesink", False),
])
def test_which_gst_pipelines_are_read_like_files(pipeline, finite):
    """Non-live sources only (no GStreamer needed to decide): every frame, and the end of stream ends the run."""
    from edgepix.runtime.streams.sources import CaptureReader, parse_source
    from edgepix.runtime.streams.sources.capture import gst_pipeline_is_finite

    assert gst_pipeline_is_finite(pipeline) is finite
    reader = CaptureReader(parse_source(f"gst://{pipeline}"))
    assert (reader.finite_pipeline, reader.live) == (finite, not finite)


def wait_for_udp_listener(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    """Until a socket is bound to UDP `port` (binding it ourselves, without SO_REUSEADDR, then fails)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on UDP port {port} (exit code {process.poll()})")


def rtp_sender(port: int) -> subprocess.Popen:
    """gst-launch-1.0 sending a live 320x240 test pattern as H.264 over RTP to 127.0.0.1:port at 30 fps."""
    return subprocess.Popen(
        ["gst-launch-1.0", "-q", "videotestsrc", "is-live=true", "pattern=ball", "!",
         "video/x-raw,width=320,height=240,framerate=30/1", "!", "x264enc", "tune=zerolatency", "key-int-max=15",
         "!", "rtph264pay", "config-interval=-1", "pt=96", "!", "udpsink", "host=127.0.0.1", f"port={port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_an_rtp_udp_stream_is_segmented_and_its_sender_restart_is_a_recorded_reconnect(sysenv, model, tmp_path):
    port = free_port()
    source = (f'gst://udpsrc port={port} caps="{RTP_CAPS}" ! rtph264depay ! avdec_h264 ! videoconvert ! '
              "appsink")
    out = tmp_path / "frames"
    stats_path = tmp_path / "stats.json"
    # A live GStreamer pipeline opens at its first frame: edgepix waits for the sender.
    receiver = subprocess.Popen(
        [str(ENV_PYTHON), "-m", "edgepix", "segment", str(model), "--source", source, "--sink", f"{out}/",
         "--read-timeout", "1", "--stats", str(stats_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=env_vars(), cwd="/")
    senders = []
    try:
        wait_for_udp_listener(port, receiver)
        senders.append(rtp_sender(port))
        time.sleep(3.0)
        senders[0].kill()  # the camera dies: no more packets, no end of stream
        senders[0].wait()
        time.sleep(3.5)  # silent for longer than the stall timeout (2 x --read-timeout)
        before = len(list(out.glob("*.jpg")))
        senders.append(rtp_sender(port))  # ... and comes back
        deadline = time.monotonic() + 30
        while len(list(out.glob("*.jpg"))) < before + 150 and time.monotonic() < deadline:
            time.sleep(0.1)
        # Ctrl-C while packets still arrive: they reach the abandoned pipeline's socket once the current one closes,
        # and the exit must still be clean.
        receiver.send_signal(signal.SIGINT)
        _, stderr = receiver.communicate(timeout=30)
    finally:
        for process in (receiver, *senders):
            process.kill()
            process.wait()
    assert receiver.returncode == 0, stderr[-2000:]
    stats = json.loads(stats_path.read_text())
    s = stats["streams"][0]
    assert s["reconnects"] >= 1 and s["outages"][0]["reopened_s"] is not None, (s, stderr[-2000:])
    assert "no frame for" in s["outages"][0]["reason"]
    assert s["size"] == [320, 240] and s["live"] is True
    indices = sorted(int(p.stem) for p in out.glob("*.jpg"))
    # Every frame read was segmented except those that arrived while the model loaded (newest-frame, by design)
    # and, at most, one read as the run stopped:
    assert len(indices) == s["frames_processed"] and 0 <= s["frames_read"] - s["dropped"] - len(indices) <= 1, s
    # ... which is at the start: later, a frame is dropped only when the machine cannot keep up for a moment (on
    # a quiet one, none is), so at most a few.
    missing_later = sum(b - a - 1 for a, b in zip(indices, indices[1:]) if a >= 40)
    assert missing_later <= 0.05 * len(indices), (missing_later, indices)
    assert len(indices) - before >= 150 and before >= 10, (before, len(indices))  # frames before and after


_NEWEST_FRAME = """import json, sys, time
from edgepix.runtime.streams.sources import open_source
indices, ages = [], []
with open_source(sys.argv[1]) as source:
    for frame in source:
        ages.append((time.monotonic() - frame.timestamp) * 1000)
        indices.append(frame.index)
        if len(indices) == 8:
            break
        time.sleep(0.2)  # a consumer far slower than the camera
    print(json.dumps({"indices": indices, "ages_ms": ages, "dropped": source.dropped, "live": source.live}))"""


def test_a_live_gstreamer_source_hands_over_the_newest_frame_and_a_finite_one_every_frame(sysenv):
    pattern = "! video/x-raw,width=160,height=120,framerate=60/1 ! videoconvert ! appsink"
    live = env_python(_NEWEST_FRAME, f"gst://videotestsrc is-live=true {pattern}")
    finite = env_python(_NEWEST_FRAME, f"gst://videotestsrc {pattern}")
    assert live.returncode == 0 and finite.returncode == 0, live.stderr[-1000:] + finite.stderr[-1000:]
    live, finite = json.loads(live.stdout), json.loads(finite.stdout)
    steps = [b - a for a, b in zip(live["indices"], live["indices"][1:])]
    # 0.2 s between takes at 60 fps: about 12 frames each time, all but the newest dropped
    assert live["live"] and min(steps) >= 6 and live["dropped"] >= 6 * 7, live
    assert max(live["ages_ms"][1:]) < 100, live  # a fresh frame, not one that waited in a queue
    assert not finite["live"] and finite["indices"] == list(range(8)) and finite["dropped"] == 0, finite


# ---- csi:// pipeline strings ------------------------------------------------------------------------------

# Stand-ins for JetPack's nvarguscamerasrc and nvvidconv (absent here), with their real property names and ranges,
# so that Gst.parse_launch checks the csi:// string: element order, property names and values, caps, appsink
# options. Also for nvv4l2h264enc, the rtp:// sink's encoder on a Jetson.
_PARSE_CSI = r"""import json, sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstBase", "1.0")
from gi.repository import GObject, Gst, GstBase
from edgepix.runtime.streams.sinks import rtp_pipeline
from edgepix.runtime.streams.sources import SourceOptions, csi_pipeline
Gst.init(None)
ANY = Gst.Caps.new_any()

class StandInArgusSrc(GstBase.BaseSrc):
    __gstmetadata__ = ("nvarguscamerasrc stand-in", "Source/Video", "stand-in", "edgepix tests")
    __gsttemplates__ = Gst.PadTemplate.new("src", Gst.PadDirection.SRC, Gst.PadPresence.ALWAYS, ANY)
    __gproperties__ = {"sensor-id": (int, "sensor-id", "sensor", 0, 255, 0, GObject.ParamFlags.READWRITE)}
    def do_set_property(self, prop, value): self.sensor = value
    def do_get_property(self, prop): return self.sensor

def stand_in_transform(name, props, flags=()):
    def set_property(self, prop, value): self.values[prop.name] = value
    def get_property(self, prop): return self.values.get(prop.name)
    def init(self): GstBase.BaseTransform.__init__(self); self.values = {}
    def transform_caps(self, direction, caps, filter):  # a converter: anything in, anything out
        return filter if filter is not None else ANY
    pads = [Gst.PadTemplate.new(n, d, Gst.PadPresence.ALWAYS, ANY) for n, d in (("sink", Gst.PadDirection.SINK),
                                                                                ("src", Gst.PadDirection.SRC))]
    return type(name, (GstBase.BaseTransform,), {
        "__gstmetadata__": (name, "Filter/Converter/Video", "stand-in", "edgepix tests"),
        "__gsttemplates__": tuple(pads),
        "__gproperties__": {**{p: (int, p, p, low, high, low, GObject.ParamFlags.READWRITE) for p, low, high in props},
                            **{p: (bool, p, p, False, GObject.ParamFlags.READWRITE) for p in flags}},
        "__init__": init, "do_set_property": set_property, "do_get_property": get_property,
        "do_transform_caps": transform_caps})

for element, cls in (("nvarguscamerasrc", StandInArgusSrc),
                     ("nvvidconv", stand_in_transform("StandInNvvidconv", [("flip-method", 0, 7)])),
                     ("nvv4l2h264enc", stand_in_transform("StandInNvEnc", [("bitrate", 0, 2**31 - 1),
                      ("iframeinterval", 0, 2**31 - 1), ("idrinterval", 0, 2**31 - 1)], ["insert-sps-pps"]))):
    GObject.type_register(cls)
    assert Gst.Element.register(None, element, Gst.Rank.NONE, cls)

def caps_of(pipeline):
    found = []
    it = pipeline.iterate_sorted()
    while True:
        ok, element = it.next()
        if ok != Gst.IteratorResult.OK:
            return found[::-1]
        if element.get_factory().get_name() == "capsfilter":
            found.append(element.get_property("caps").to_string())

results = []
for (w, h, fps) in json.loads(sys.argv[1]):
    for flip in range(8):
        text = csi_pipeline(1, SourceOptions(size=(w, h), fps=fps, flip=flip))
        pipeline = Gst.parse_launch(text)
        names = {e.get_factory().get_name(): e for e in pipeline.iterate_elements()}
        sink = names["appsink"]
        results.append({"text": text, "caps": caps_of(pipeline), "sensor": names["nvarguscamerasrc"].sensor,
                        "flip": names["nvvidconv"].values["flip-method"],
                        "appsink": [sink.get_property("drop"), sink.get_property("max-buffers"),
                                    sink.get_property("sync")]})
encoder = Gst.parse_launch(rtp_pipeline("nvv4l2h264enc", "127.0.0.1", 5000, fps=30, bitrate_kbits=4000))
enc = {e.get_factory().get_name(): e for e in encoder.iterate_elements()}["nvv4l2h264enc"]
print(json.dumps({"csi": results, "nvenc": enc.values}))"""

# The IMX219's sensor modes on a Jetson (width, height, fps), the camera of the Nano and NX developer kits.
SENSOR_MODES = [(3280, 2464, 21), (3280, 1848, 28), (1920, 1080, 30), (1640, 1232, 30), (1280, 720, 60)]


def test_csi_pipeline_strings_parse_for_every_sensor_mode_and_flip_method(sysenv):
    done = env_python(_PARSE_CSI, json.dumps(SENSOR_MODES))
    if done.returncode != 0 and "No module named 'gi'" in done.stderr:
        pytest.skip("GStreamer's Python bindings are not installed (apt-get install python3-gst-1.0)")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert len(report["csi"]) == len(SENSOR_MODES) * 8
    cases = [(mode, flip) for mode in SENSOR_MODES for flip in range(8)]  # the order the script parses them in
    for ((w, h, fps), flip), r in zip(cases, report["csi"]):
        assert (r["sensor"], r["flip"], r["appsink"]) == (1, flip, [True, 1, False]), r
        nvmm, bgrx, bgr = r["caps"]
        assert nvmm == f"video/x-raw(memory:NVMM), width=(int){w}, height=(int){h}, framerate=(fraction){fps}/1, " \
                       "format=(string)NV12", r
        assert (bgrx, bgr) == ("video/x-raw, format=(string)BGRx", "video/x-raw, format=(string)BGR"), r
    assert report["nvenc"] == {"bitrate": 4_000_000, "iframeinterval": 30, "idrinterval": 30, "insert-sps-pps": True}


# ---- the rtp:// sink --------------------------------------------------------------------------------------

_RECEIVE = """import json, os, sys, threading, time
import cv2
frames, sizes, last = 0, set(), [time.monotonic()]
def read():
    global frames
    cap = cv2.VideoCapture(sys.argv[1], cv2.CAP_GSTREAMER)  # returns at the first frame
    while True:
        ok, image = cap.read()
        if ok:
            frames += 1
            sizes.add(image.shape[:2][::-1])
            last[0] = time.monotonic()
threading.Thread(target=read, daemon=True).start()
print("listening", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline and not (frames and time.monotonic() - last[0] > 2.0):
    time.sleep(0.1)
print(json.dumps({"frames": frames, "sizes": sorted(sizes)}), flush=True)
os._exit(0)  # the reading thread blocks in a read that no more packets will end"""


def test_the_rtp_sink_read_back_on_loopback_has_the_size_and_the_frames_sent(sysenv, model, tmp_path):
    port = free_port()
    source = f'udpsrc port={port} caps="{RTP_CAPS}" ! rtph264depay ! avdec_h264 ! videoconvert ! appsink'
    receiver = subprocess.Popen([str(ENV_PYTHON), "-c", _RECEIVE, source, "60"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env_vars(), cwd="/")
    try:
        assert receiver.stdout.readline().strip() == "listening"
        wait_for_udp_listener(port, receiver)
        code, stats, stderr = segment(model, "synthetic://?size=319x240&fps=30&frames=150", tmp_path,
                                      "--sink", f"rtp://127.0.0.1:{port}")
        out, err = receiver.communicate(timeout=60)
    finally:
        receiver.kill()
    assert code == 0, stderr[-2000:]
    sink = stats["sinks"][0]
    received = json.loads(out.strip().splitlines()[-1])
    # An odd width is sent at the next even one (4:2:0 H.264)
    assert sink["encoder"] == "x264enc" and sink["size"] == [320, 240] and sink["port"] == port, sink
    assert received["sizes"] == [[320, 240]], (received, err[-1000:])
    assert sink["frames_written"] >= 140 and received["frames"] >= 0.9 * sink["frames_written"], (sink, received)

