"""http://HOST:PORT: an MJPEG stream, an HTML page with the live view and statistics, and /stats.json, served to
browsers that may be slow, silent or hostile."""

from __future__ import annotations

import contextlib
import html
import io
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

from ...core.errors import SinkError
from .base import Output, Sink, SinkContext

log = logging.getLogger(__name__)


#: URIs of this sink and what it does (shown by the `--sink` help and docs/streams.md)
URI_HELP = (
    ('`http://127.0.0.1:8080`',
     'a threaded HTTP server: `/` a page with the live view(s) and a statistics table refreshed every '
     'second, `/stream.mjpg` and `/stream/N.mjpg` (multipart MJPEG), `/frame.jpg`, `/stats.json`. '
     '`http://:8080` and `localhost` bind 127.0.0.1; `http://0.0.0.0:8080` all interfaces. JPEG is encoded '
     'once per frame and only while someone watches; each client gets the newest frame when it is ready, '
     'so a slow client gets fewer frames and one that stops reading is dropped after 10 s; neither touches '
     'the pipeline'),
)


# ---- HTTP: MJPEG stream, page, statistics ---------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #111; color: #ddd; margin: 1em; }}
.views {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} img {{ max-width: 100%; background: #000; display: block; }}
table {{ border-collapse: collapse; margin-top: 1em; font-size: 0.9em; }}
td, th {{ border-bottom: 1px solid #333; padding: 2px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
</style></head>
<body><h3>{title}</h3>
<div class="views">{views}</div>
<div id="summary"></div>
<table id="stages"></table>
<table id="streams"></table>
<script>
async function refresh() {{
  try {{
    const s = await (await fetch("stats.json", {{cache: "no-store"}})).json();
    document.getElementById("summary").textContent =
      `${{s.fps_now.toFixed(1)}} FPS now, ${{s.fps.toFixed(1)}} average, ${{s.frames}} frames in ${{s.elapsed_s.toFixed(0)}} s`;
    let rows = "<tr><th>stage (ms)</th><th>p50</th><th>p90</th><th>p99</th><th>n</th></tr>";
    for (const [name, v] of Object.entries(s.stages))
      rows += `<tr><td>${{name}}</td><td>${{v.p50.toFixed(1)}}</td><td>${{v.p90.toFixed(1)}}</td><td>${{v.p99.toFixed(1)}}</td><td>${{v.n}}</td></tr>`;
    document.getElementById("stages").innerHTML = rows;
    rows = "<tr><th>stream</th><th>state</th><th>frames</th><th>drops</th><th>reconnects</th></tr>";
    for (const v of s.streams)
      rows += `<tr><td>${{v.uri}}</td><td>${{v.state_text}}</td><td>${{v.frames_processed}}</td><td>${{v.dropped}}</td><td>${{v.reconnects}}</td></tr>`;
    document.getElementById("streams").innerHTML = rows;
  }} catch (e) {{}}
}}
setInterval(refresh, 1000); refresh();
</script></body></html>
"""

BOUNDARY = "edgepixframe"


class _Latest:
    """The newest frame of one stream, JPEG-encoded on demand (once per frame, only while someone watches)."""

    def __init__(self) -> None:
        self.seq = 0
        self.image: np.ndarray | None = None
        self.jpeg: bytes | None = None
        self.jpeg_seq = -1


class HttpSink(Sink):
    """MJPEG over HTTP. Routes: `/` page, `/stream.mjpg` (stream 0) and `/stream/N.mjpg`, `/frame.jpg` and
    `/frame/N.jpg` (one JPEG), `/stats.json`. Every client waits for the newest frame on its own, so a slow or
    vanished client holds up only itself; a send that blocks longer than `client_timeout` drops the client.

    Bad clients cannot starve the server: a connection must deliver its whole request head within
    `request_timeout` seconds (a silent connection, or one that stops mid-header, is closed with a 408), at most
    `max_connections` connections are served at once (more get a 503 at once, without a thread), and at most
    `max_clients` of them may watch a stream (more get a 503 that says so; the page and /stats.json still work)."""

    lossless = False

    def __init__(self, uri: str, host: str, port: int, streams: frozenset[int] | None = None, *, quality: int = 80,
                 client_timeout: float = 10.0, request_timeout: float = 5.0, max_clients: int = 16,
                 max_connections: int = 128) -> None:
        super().__init__(uri, streams)
        if max_clients < 1 or max_connections < max_clients:
            raise SinkError(f"{uri}: expected 1 <= max_clients <= max_connections, got {max_clients} and "
                            f"{max_connections}")
        if not 0 < request_timeout <= 60 or not 0 < client_timeout <= 600:
            raise SinkError(f"{uri}: expected timeouts of 0..60 s (request) and 0..600 s (client), got "
                            f"{request_timeout} and {client_timeout}")
        self.host, self.port = host, port
        self.quality = quality
        self.client_timeout = client_timeout
        self.request_timeout = request_timeout
        self.max_clients = max_clients
        self.max_connections = max_connections
        self.cond = threading.Condition()
        self.latest: dict[int, _Latest] = {}
        self.closed = False
        self.clients = 0
        self.clients_total = 0
        self.clients_timed_out = 0
        self.frames_sent = 0
        self.connections = 0  # open connections (each has a thread)
        self.requests_timed_out = 0  # connections closed because their request head did not arrive in time
        self.refused_busy = 0  # connections and viewers turned away with a 503
        self.server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}/"

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        for s in ctx.streams:
            if self.accepts(s.stream_id):
                self.latest[s.stream_id] = _Latest()
        sink = self

        class Handler(_Handler):
            pass

        Handler.sink = sink
        try:
            server = _Server((self.host, self.port), Handler, sink)
        except OSError as e:
            raise SinkError(f"{self.uri}: cannot listen on {self.host}:{self.port}: {e.strerror or e}; pick another "
                            "port (or :0 for any free one)") from e
        self.server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http-sink", daemon=True)
        self._thread.start()
        if self.host in ("", "0.0.0.0", "::"):
            log.info("MJPEG server on all interfaces, port %d: http://<this device's address>:%d/ (here %s)",
                     self.port, self.port, self.url)
        else:
            log.info("watch the stream at %s", self.url)

    def write(self, out: Output) -> None:
        slot = self.latest.get(out.stream_id)
        if slot is None:
            return
        with self.cond:
            slot.image = out.image
            slot.seq += 1
            self.cond.notify_all()
        self.frames_written += 1

    def jpeg(self, stream_id: int) -> tuple[int, bytes | None]:
        """(sequence number, JPEG) of the stream's newest frame; encoded once per frame, by the first asker."""
        slot = self.latest[stream_id]
        with self.cond:
            seq, image = slot.seq, slot.image
            if slot.jpeg_seq == seq:
                return seq, slot.jpeg
        if image is None:
            return seq, None
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        data = buf.tobytes() if ok else None
        with self.cond:
            if slot.jpeg_seq < seq:
                slot.jpeg, slot.jpeg_seq = data, seq
        return seq, data

    def wait_newer(self, stream_id: int, seq: int, timeout: float) -> bool:
        slot = self.latest[stream_id]
        with self.cond:
            return self.cond.wait_for(lambda: slot.seq > seq or self.closed, timeout) and not self.closed

    def page(self) -> str:
        ids = sorted(self.latest)
        views = "".join(f'<figure><img src="stream/{i}.mjpg" alt="stream {i}"><figcaption>{i}: '
                        f'{html.escape(self.ctx.streams[i].label)}</figcaption></figure>' for i in ids)
        return PAGE.format(title=html.escape(self.ctx.title), views=views)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def admit(self, kind: str) -> bool:
        """Take a place for a new `connection` or `viewer` if one is free (under the lock); a refusal is counted."""
        count, limit = ("connections", self.max_connections) if kind == "connection" else ("clients", self.max_clients)
        with self.cond:
            if getattr(self, count) >= limit:
                self.refused_busy += 1
                return False
            setattr(self, count, getattr(self, count) + 1)
            if kind == "viewer":
                self.clients_total += 1
            return True

    def stats(self) -> dict:
        return {**super().stats(), "url": self.url, "clients": self.clients, "clients_total": self.clients_total,
                "clients_timed_out": self.clients_timed_out, "frames_sent": self.frames_sent,
                "connections": self.connections, "requests_timed_out": self.requests_timed_out,
                "refused_busy": self.refused_busy}


MAX_REQUEST_HEAD = 16 * 1024  # bytes of request line and headers; a GET needs a few hundred


def _send_and_close(conn: socket.socket, code: int, reason: str, text: str) -> None:
    """A short plain-text response on a connection that gets nothing else; never blocks (the kernel's send buffer
    of a fresh connection takes a few hundred bytes)."""
    body = text.encode()
    head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: 5\r\nConnection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(head + body)


class _Server(ThreadingHTTPServer):
    """The stdlib's threading server with a cap on concurrent connections: one past `max_connections` gets a 503
    from the accepting thread itself, so a flood of connections costs neither threads nor the viewers' time."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of new connections waits instead of being refused

    def __init__(self, address: tuple[str, int], handler: type, sink: HttpSink) -> None:
        self.sink = sink
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        sink = self.sink
        if not sink.admit("connection"):
            _send_and_close(request, 503, "Service Unavailable",
                            f"busy: {sink.max_connections} connections are open; try again in a few seconds\n")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: this connection is not counted any more
            with sink.cond:
                sink.connections -= 1
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.sink.cond:
                self.sink.connections -= 1


class _Handler(BaseHTTPRequestHandler):
    sink: HttpSink
    server_version = "edgepix"
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("http %s: " + format, self.address_string(), *args)

    def handle(self) -> None:
        """Read the request head under one deadline, then answer it. The stdlib reads headers line by line with
        no overall limit, so a client sending nothing, or a byte now and then, would hold its thread forever."""
        head = self._read_head()
        if head is not None:
            self.rfile.close()  # the socket's reader is not used: what arrived is all in `head`
            self.rfile = io.BytesIO(head)  # the parser reads the request from here; GET requests have no body
            self.handle_one_request()

    def _read_head(self) -> bytes | None:
        sink = self.sink
        deadline = time.monotonic() + sink.request_timeout
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            remaining = deadline - time.monotonic()
            if len(data) > MAX_REQUEST_HEAD:
                _send_and_close(self.connection, 431, "Request Header Fields Too Large", "request head too large\n")
                return None
            try:
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.connection.recv(4096)
            except TimeoutError:  # socket.timeout is TimeoutError
                with sink.cond:
                    sink.requests_timed_out += 1
                _send_and_close(self.connection, 408, "Request Timeout",
                                f"no complete request within {sink.request_timeout:g} s\n")
                return None
            except OSError:
                return None
            if not chunk:  # the client closed the connection
                return None
            data += chunk
        return data

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _stream_id(self, path: str, prefix: str, suffix: str) -> int | None:
        if path == f"/{prefix}{suffix}":
            return min(self.sink.latest) if self.sink.latest else None
        m = re.fullmatch(rf"/{prefix}/(\d+){re.escape(suffix)}", path)
        if m and int(m.group(1)) in self.sink.latest:
            return int(m.group(1))
        return None

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        sink = self.sink
        path = urllib.parse.urlsplit(self.path).path
        self.connection.settimeout(sink.client_timeout)
        try:
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", sink.page().encode())
            elif path == "/stats.json":
                body = json.dumps(sink.ctx.stats(), default=_json_default).encode()
                self._send(200, "application/json", body)
            elif (sid := self._stream_id(path, "stream", ".mjpg")) is not None:
                self._mjpeg(sid)
            elif (sid := self._stream_id(path, "frame", ".jpg")) is not None:
                _, data = sink.jpeg(sid)
                if data is None:
                    self._send(503, "text/plain", b"no frame yet\n")
                else:
                    self._send(200, "image/jpeg", data)
            else:
                self._send(404, "text/plain", b"not found: try / , /stream.mjpg, /frame.jpg or /stats.json\n")
        except TimeoutError:  # the client stopped reading: drop it, the pipeline never waited for it
            with sink.cond:
                sink.clients_timed_out += 1
        except OSError:
            pass  # the client went away

    def _mjpeg(self, stream_id: int) -> None:
        sink = self.sink
        if not sink.admit("viewer"):
            self.send_response(503)
            self.send_header("Retry-After", "5")
            body = f"busy: {sink.max_clients} viewers are watching already; try again later\n".encode()
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        try:
            self._mjpeg_frames(stream_id)
        finally:
            with sink.cond:
                sink.clients -= 1

    def _mjpeg_frames(self, stream_id: int) -> None:
        sink = self.sink
        # A small send buffer: frames a slow client has not taken wait here as one newest frame, not as seconds
        # of video queued in the kernel (which would also delay what it sees).
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        seq = 0  # frames are numbered from 1: a client that connects after the first frame gets it at once
        while not sink.closed:
            if not sink.wait_newer(stream_id, seq, 1.0):
                continue
            seq, data = sink.jpeg(stream_id)
            if data is None:
                continue
            self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
                             .encode() + data + b"\r\n")
            self.wfile.flush()
            with sink.cond:
                sink.frames_sent += 1


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)

