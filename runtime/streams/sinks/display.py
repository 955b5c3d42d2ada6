"""display://: an OpenCV window per stream, with a HUD of the live statistics."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import cv2
import numpy as np

from ...core.errors import SinkError
from .base import Output, Sink, SinkContext

log = logging.getLogger(__name__)


#: URIs of this sink and what it does (shown by the `--sink` help and docs/streams.md)
URI_HELP = (
    ('`display://`',
     'an OpenCV window per stream with a HUD (FPS, frame, drops, decode/pre/infer/post/render p50 ms, '
     'outages; `--no-hud` hides it); `q`, Esc or closing it stops. Without a screen: an error that '
     'suggests the HTTP sink'),
)


# ---- display --------------------------------------------------------------------------------------------------


def draw_hud(image: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """A copy of `image` with text lines on a dark band, top-left."""
    out = image.copy()
    scale = max(0.4, min(0.8, image.shape[0] / 900))
    thickness = 1
    line_h = int(28 * scale) + 4
    width = max((cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] for s in lines), default=0)
    h, w = min(out.shape[0], line_h * len(lines) + 8), min(out.shape[1], width + 12)
    region = out[:h, :w]
    region[:] = (region * 0.35).astype(np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(out, text, (6, 4 + line_h * (i + 1) - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)
    return out


def hud_lines(stats: dict, stream_id: int) -> list[str]:
    stages = stats.get("stages", {})

    def ms(name: str) -> str:
        s = stages.get(name)
        return f"{s['p50']:.1f}" if s else "-"

    stream = next((s for s in stats.get("streams", []) if s.get("stream_id") == stream_id), {})
    lines = [f"{stats.get('fps_now', 0.0):.1f} FPS  frame {stream.get('frames_processed', 0)}  "
             f"drops {stream.get('dropped', 0)}",
             f"decode {ms('decode')}  pre {ms('preprocess')}  infer {ms('infer')}  post {ms('postprocess')}  "
             f"render {ms('render')} ms"]
    if stream.get("state") not in (None, "up"):
        lines.append(f"source {stream.get('state_text', stream.get('state'))}")
    return lines


def display_available() -> str | None:
    """None if a window can open here, else why not."""
    if os.name == "posix" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no screen (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    info = cv2.getBuildInformation()
    m = re.search(r"GUI:\s+(\S+)", info)
    if m and m.group(1).upper() == "NONE":
        return f"this OpenCV {cv2.__version__} has no GUI (opencv-python-headless?)"
    return None


class DisplaySink(Sink):
    lossless = False

    def __init__(self, uri: str, streams: frozenset[int] | None = None, *, hud: bool = True) -> None:
        super().__init__(uri, streams)
        self.hud = hud
        self.windows: dict[int, str] = {}

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        reason = display_available()
        if reason is not None:
            raise SinkError(f"display:// cannot open a window: {reason}; on a headless device watch in a browser "
                            "with --sink http://0.0.0.0:8080, or write a file with --sink out.mp4")

    def write(self, out: Output) -> None:
        name = self.windows.get(out.stream_id)
        if name is None:
            label = self.ctx.streams[out.stream_id].label
            name = self.windows[out.stream_id] = f"{self.ctx.title} [{out.stream_id}] {label}"
            cv2.namedWindow(name, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO)
            cv2.resizeWindow(name, out.image.shape[1], out.image.shape[0])
        image = draw_hud(out.image, hud_lines(self.ctx.stats(), out.stream_id)) if self.hud else out.image
        cv2.imshow(name, image)
        key = cv2.waitKey(1) & 0xFF
        closed = cv2.getWindowProperty(name, cv2.WND_PROP_VISIBLE) < 1
        if key in (ord("q"), 27) or closed:
            self.ctx.request_stop()
        self.frames_written += 1

    def close(self) -> None:
        for name in self.windows.values():
            try:
                cv2.destroyWindow(name)
                cv2.waitKey(1)  # let the GUI toolkit process the close in this (the window's) thread
            except cv2.error:
                pass
        self.windows.clear()

