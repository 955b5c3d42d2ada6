"""The `triton` backend: inference on a Triton Inference Server (or any KServe v2 server), everything else local.

    edgepix segment fastscnn --backend triton --triton-url 10.0.0.5:8000          # HTTP
    edgepix segment fastscnn --backend triton --triton-url grpc://10.0.0.5:8001   # gRPC
    Segmenter.load("fastscnn", "triton", url="10.0.0.5:8000")

The model argument is the model's name in the server's repository (an edgepix repository from
`edgepix export ... --format triton`). Inputs and outputs come from the server's model metadata and the ModelSpec
from the model configuration's `edgepix.spec` parameter, so nothing is configured twice.

Several requests in flight: the stream pipeline runs several inference workers (4 for this backend) and each thread
gets a client of its own (tritonclient's clients are not thread-safe), so while one frame is on the wire or on the
server, the next ones are decoded, pre-processed, post-processed and rendered here.

Where the time goes (`run_stats()`, added to the pipeline's statistics as `backend_stats`): `round_trip` is the wall
time of the inference calls, `client` the serialisation and deserialisation of tensors here, `server` the time the
server spent on requests for this model (its statistics extension: queue, compute input/infer/output), and
`network` what is left: round trip - client - server, i.e. transfer time plus the HTTP/gRPC stack on both ends.
Server figures are averages over the server's counters since this backend connected, so other clients of the
same model are included in them.

Failures are told apart by what the client library raises, never by message text:

- the server is not there or not answering: the OS's connection errors (refused, reset, unreachable), a timeout
  (`timeout_s`: HTTP's connection and network timeouts, gRPC's per-call deadline), an HTTP connection closed
  before the answer, gRPC status UNAVAILABLE or DEADLINE_EXCEEDED, HTTP 502/503/504 (a proxy in front). These are
  retried, the frame waiting, as a dead camera is reopened: `reconnect_attempts` retries (8 by default) with waits
  doubling from 0.25 s to `backoff_max` (2 s), so an outage of about 12 s is waited out and a server that is back
  is found within 2 s; after the last one the call raises a BackendError of one line. None keeps trying until the
  backend is closed.
- no such model (gRPC NOT_FOUND, HTTP 404): a ModelFormatError that lists the server's ready models and says why
  the model asked for is not among them (not in the repository, or in it but not loaded), read from the server's
  repository index;
- anything else the server refused (a wrong shape or type: gRPC INVALID_ARGUMENT, HTTP 400; a failing model): a
  BackendError at once, with the server's status and its one-line reason.

Time spent waiting for a server is counted as outage in `run_stats()`, not as round trip: `reconnects` counts the
outages that ended with the server back, `outage_s` their wall time (one outage, however many workers waited it
out). The stream pipeline adds those to its statistics, and a live source drops (and counts) the frames that
arrive meanwhile.

`tritonclient` is imported when a backend is created: pip install 'edgepix[triton]'.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np

from ..core.errors import BackendError, ModelFormatError, require, unknown_name
from ..description.spec import ONNX_METADATA_KEY
from ..description.tensors import TensorMeta, normalise_dim
from .base import Backend

log = logging.getLogger(__name__)

HTTP_PORT, GRPC_PORT = 8000, 8001
FIRST_BACKOFF_S = 0.25
RECONNECT_ATTEMPTS = 8  # retries per outage: 0.25 + 0.5 + 1 + 2 + 2 + 2 + 2 + 2 = 11.75 s of waiting by default
LOAD_ATTEMPTS = 3  # a server that is not there when the backend is created fails sooner
#: the `edgepix.io` model parameter of a repository model that takes frames (export.triton, --triton-io frames)
IO_PARAMETER, FRAMES_IO = "edgepix.io", "frames"

# KServe v2 data types -> numpy
_V2_TYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}
_NUMPY_TO_V2 = {np.dtype(v): k for k, v in _V2_TYPES.items()}


@dataclass(frozen=True, kw_only=True)
class TritonOptions:
    url: str = "localhost:8000"  # HOST:PORT (HTTP), or http://HOST:PORT, grpc://HOST:PORT
    model_version: str = ""  # "": the server's version policy (the latest)
    timeout_s: float = 30.0  # one request's time limit (HTTP: connection and network timeouts; gRPC: deadline)
    reconnect_attempts: int | None = RECONNECT_ATTEMPTS  # retries per outage; None: until the backend is closed
    backoff_max: float = 2.0  # longest wait between retries (doubling from 0.25 s)
    ssl: bool = False

    def __post_init__(self) -> None:
        protocol_and_address(self.url)  # raises on a bad URL
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise BackendError(f"timeout_s: expected a positive number of seconds, got {self.timeout_s!r}")
        if self.reconnect_attempts is not None and (not isinstance(self.reconnect_attempts, int)
                                                    or self.reconnect_attempts < 0):
            raise BackendError(f"reconnect_attempts: expected >= 0 or None, got {self.reconnect_attempts!r}")
        if not self.backoff_max > 0:
            raise BackendError(f"backoff_max: expected a positive number of seconds, got {self.backoff_max!r}")


def protocol_and_address(url: str) -> tuple[str, str]:
    """'host:8000' -> ('http', 'host:8000'); 'grpc://host' -> ('grpc', 'host:8001')."""
    protocol = "http"
    rest = url.strip()
    for scheme in ("http", "https", "grpc"):
        if rest.startswith(scheme + "://"):
            protocol, rest = ("http" if scheme == "https" else scheme), rest[len(scheme) + 3:]
            break
    rest = rest.rstrip("/")
    if not rest or "/" in rest or " " in rest:
        raise BackendError(f"Triton URL {url!r}: expected HOST:PORT, http://HOST:PORT or grpc://HOST:PORT")
    if ":" not in rest.rsplit("]", 1)[-1]:
        rest += f":{GRPC_PORT if protocol == 'grpc' else HTTP_PORT}"
    return protocol, rest


class Failure(enum.Enum):
    """What a failed call means, from the exception's type and status code (see the module docstring)."""

    OUTAGE = "unreachable"  # not there: retried
    TIMEOUT = "not answering"  # there but silent past timeout_s: retried
    NO_MODEL = "no such model"
    REFUSED = "refused"  # a bad request or a failing model: not retried


# Status codes as tritonclient's InferenceServerException.status() gives them: str(grpc.StatusCode.X) for gRPC, the
# HTTP status for HTTP.
_STATUS_FAILURES = {
    "StatusCode.UNAVAILABLE": Failure.OUTAGE, "StatusCode.DEADLINE_EXCEEDED": Failure.TIMEOUT,
    "StatusCode.NOT_FOUND": Failure.NO_MODEL,
    str(HTTPStatus.BAD_GATEWAY.value): Failure.OUTAGE, str(HTTPStatus.SERVICE_UNAVAILABLE.value): Failure.OUTAGE,
    str(HTTPStatus.GATEWAY_TIMEOUT.value): Failure.TIMEOUT, str(HTTPStatus.NOT_FOUND.value): Failure.NO_MODEL,
}
# OS errors of a network that does not reach the server (ConnectionError and TimeoutError are told by type)
_UNREACHABLE_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


def classify(e: BaseException, *, closed_types: tuple[type, ...] = ()) -> Failure:
    """The kind of failure `e` is. `closed_types`: the transport's own "connection closed before the answer"
    exceptions (geventhttpclient's HTTPConnectionClosed for HTTP), an outage like a reset."""
    if isinstance(e, TimeoutError):  # socket timeouts (HTTP's connection and network timeouts)
        return Failure.TIMEOUT
    if isinstance(e, ConnectionError) or isinstance(e, closed_types):  # refused, reset, aborted, broken pipe
        return Failure.OUTAGE
    if isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNOS:
        return Failure.OUTAGE
    status = e.status() if callable(getattr(e, "status", None)) else None
    return _STATUS_FAILURES.get(str(status), Failure.REFUSED)


class _Counter:
    """Client-side time totals and outages, shared by the worker threads. An outage lasts from the first thread that
    finds the server gone to the last one that gets through again (or gives up): several workers waiting out the
    same outage count it once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.round_trip_ns = 0
        self.client_ns = 0
        self.reconnects = 0
        self.outage_s = 0.0
        self._waiting = 0  # threads waiting for the server now
        self._outage_since = 0.0

    def add(self, round_trip_ns: int, client_ns: int) -> None:
        with self.lock:
            self.calls += 1
            self.round_trip_ns += round_trip_ns
            self.client_ns += client_ns

    def outage_begins(self) -> bool:
        """A thread starts waiting; True for the first (a new outage)."""
        with self.lock:
            self._waiting += 1
            if self._waiting == 1:
                self._outage_since = time.monotonic()
            return self._waiting == 1

    def outage_ends(self, *, reconnected: bool) -> float | None:
        """A thread stops waiting; for the last one, the outage's length in seconds (else None)."""
        with self.lock:
            self._waiting -= 1
            if self._waiting:
                return None
            length = time.monotonic() - self._outage_since
            self.outage_s += length
            self.reconnects += int(reconnected)
            return length


class TritonBackend(Backend):
    """A model served by Triton; `path` is the model's name on the server."""

    name = "triton"
    options_type = TritonOptions
    # tritonclient's clients are not thread-safe, but each calling thread gets a client of its own (`_client`), and
    # the shared counters take a lock: one backend serves every worker.
    thread_safe = True

    def __init__(self, path: str | os.PathLike, *, options: TritonOptions | None = None) -> None:
        super().__init__(path)
        self.options = options if options is not None else TritonOptions()
        self.model_name = str(path)
        self.protocol, self.address = protocol_and_address(self.options.url)
        self._module = require(f"tritonclient.{self.protocol}", extra="triton", purpose="The triton backend")
        self._closed_types: tuple[type, ...] = ()
        if self.protocol == "http":  # the HTTP client's transport: an answer cut off by a server that went away
            from geventhttpclient.response import HTTPConnectionClosed

            self._closed_types = (HTTPConnectionClosed,)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._counter = _Counter()
        self._final_stats: dict[str, Any] | None = None
        # A server that is not there at start fails in a few tries, like a camera that does not open; later
        # outages are waited out.
        attempts = min(LOAD_ATTEMPTS, self.options.reconnect_attempts if self.options.reconnect_attempts is not None
                       else LOAD_ATTEMPTS)
        config = self._call(self._model_config, what="read the model configuration", attempts=attempts)
        metadata = self._call(lambda c: self._json(c.get_model_metadata(self.model_name, self.options.model_version,
                                                                        **self._deadline())),
                              what="read the model metadata", attempts=attempts)
        self.max_batch_size = int(config.get("max_batch_size", 0) or 0)
        self.platform = str(metadata.get("platform", config.get("platform", "")))
        self.inputs = tuple(self._meta(t) for t in metadata.get("inputs", ()))
        self.outputs = tuple(self._meta(t) for t in metadata.get("outputs", ()))
        parameters = config.get("parameters", {})
        if (parameters.get(IO_PARAMETER) or {}).get("string_value") == FRAMES_IO:
            raise ModelFormatError(f"triton model {self.model_name!r} takes frames ({IO_PARAMETER} = {FRAMES_IO}), "
                                   "and the triton backend sends tensors: serve an export with --triton-io tensors "
                                   "for it, or send that model frames with tritonclient")
        spec_text = (parameters.get(ONNX_METADATA_KEY) or {}).get("string_value")
        self.metadata = {ONNX_METADATA_KEY: spec_text} if spec_text else {}
        self._output_names = [t.name for t in self.outputs]
        self._server_start = self._server_counters()

    # ---- connection ------------------------------------------------------------------------------------------

    def _deadline(self) -> dict[str, float]:
        """gRPC calls take their time limit per call (`client_timeout`); HTTP clients have theirs from creation."""
        return {"client_timeout": self.options.timeout_s} if self.protocol == "grpc" else {}

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            kwargs: dict[str, Any] = {"url": self.address, "ssl": self.options.ssl}
            if self.protocol == "http":
                kwargs.update(connection_timeout=self.options.timeout_s, network_timeout=self.options.timeout_s)
            else:
                kwargs.update(channel_args=self._grpc_channel_args())
            client = self._module.InferenceServerClient(**kwargs)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _grpc_channel_args(self) -> list[tuple[str, Any]]:
        """tritonclient's own channel arguments, plus a subchannel of this channel's own. gRPC otherwise shares a
        connection among channels to the same address, with its reconnect backoff (1 s growing 1.6 times per failed
        attempt): a new client after an outage would wait out the old connection's backoff, seconds after the
        server is back. The retries here pace the reconnects instead."""
        keepalive = self._module.KeepAliveOptions()
        return [("grpc.max_send_message_length", self._module.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", self._module.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
                ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
                ("grpc.use_local_subchannel_pool", 1)]

    def _drop_client(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._clients_lock:
                if client in self._clients:
                    self._clients.remove(client)
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a client of a dead server may fail to close; it is dropped anyway
                pass

    def _call(self, fn, *, what: str, attempts: int | None = None):
        """fn(client) with reconnects: an outage or a timeout is retried with a doubling backoff, anything else
        raised. `attempts`: retries before giving up (default: the options' reconnect_attempts)."""
        attempt, wait, outage_start = 0, FIRST_BACKOFF_S, None
        limit = self.options.reconnect_attempts if attempts is None else attempts
        self._local.outage_ns = 0
        while True:
            if self._closed:
                if outage_start is not None:
                    self._counter.outage_ends(reconnected=False)
                raise BackendError(f"backend 'triton' for {self.model_name} is closed")
            try:
                result = fn(self._client())
            except Exception as e:  # noqa: BLE001 - tritonclient and its transports raise many types: classified here
                failure = classify(e, closed_types=self._closed_types)
                if failure in (Failure.NO_MODEL, Failure.REFUSED) and outage_start is not None:
                    self._counter.outage_ends(reconnected=True)  # the server answers again, if with a refusal
                if failure is Failure.NO_MODEL:
                    raise self._missing_model_error(e) from e
                if failure is Failure.REFUSED:
                    raise BackendError(f"triton server {self.protocol}://{self.address} could not {what} for "
                                       f"{self.model_name!r}: {_describe(e)}") from e
                self._drop_client()
                attempt += 1
                if outage_start is None:
                    outage_start = time.monotonic()
                    if self._counter.outage_begins():
                        log.warning("triton server %s: %s failed (%s: %s); reconnecting", self.address, what,
                                    failure.value, _one_line(e))
                if limit is not None and attempt > limit:
                    self._counter.outage_ends(reconnected=False)
                    raise BackendError(
                        f"triton server {self.protocol}://{self.address} is {failure.value} ({_describe(e)}) "
                        f"after {limit} retr{'y' if limit == 1 else 'ies'} over "
                        f"{time.monotonic() - outage_start:.1f} s; check that it runs and serves {self.model_name!r} "
                        "(reconnect_attempts, --triton-retries on the command line, and timeout_s set the "
                        "patience)") from e
                time.sleep(wait)
                wait = min(wait * 2, self.options.backoff_max)
                continue
            if outage_start is not None:
                self._local.outage_ns = int((time.monotonic() - outage_start) * 1e9)
                length = self._counter.outage_ends(reconnected=True)
                if length is not None:
                    log.warning("triton server %s: reconnected after %.1f s", self.address, length)
            return result

    def _missing_model_error(self, e: Exception) -> ModelFormatError:
        """The server has no ready model of this name: say which it has, and whether this one is in its repository
        but not loaded (its state and reason from the repository index)."""
        try:
            index = self._json_list(self._client().get_model_repository_index(**self._deadline()))
        except Exception as index_error:  # noqa: BLE001 - the index is an extra; the answer is the NOT_FOUND above
            log.debug("triton repository index unavailable: %s", _one_line(index_error))
            index = []
        ready = sorted({m.get("name", "") for m in index if m.get("state") == "READY"})
        entry = next((m for m in index if m.get("name") == self.model_name), None)
        where = f"triton server {self.protocol}://{self.address}"
        if entry is not None:
            state = entry.get("state") or "not loaded"
            reason = f": {str(entry['reason']).strip().splitlines()[0][:300]}" if entry.get("reason") else ""
            return ModelFormatError(f"{where}: model {self.model_name!r} is in the repository but not ready ({state}"
                                    f"{reason}); ready models: {', '.join(ready) or 'none'}; load it (the server's "
                                    "model control) or read the server's log")
        if ready or index:
            return ModelFormatError(f"{where}: {unknown_name('model', self.model_name, ready)}")
        return ModelFormatError(f"{where} has no model {self.model_name!r} ({_describe(e)}); check "
                                "the name and the server's log")

    def _json_list(self, answer) -> list[dict]:
        """The repository index: a list over HTTP, a RepositoryIndexResponse over gRPC."""
        if isinstance(answer, list):
            return answer
        return list(self._json(answer).get("models", []))

    # ---- description -----------------------------------------------------------------------------------------

    def _json(self, answer) -> dict:
        """HTTP answers are dicts; gRPC ones protobuf messages (asked for as_json where the API allows)."""
        if isinstance(answer, dict):
            return answer
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(answer, preserving_proto_field_name=True)

    def _model_config(self, client) -> dict:
        config = self._json(client.get_model_config(self.model_name, self.options.model_version, **self._deadline()))
        return config.get("config", config)  # gRPC wraps it in ModelConfigResponse

    def _meta(self, t: Mapping[str, Any]) -> TensorMeta:
        datatype = str(t.get("datatype", ""))
        if datatype not in _V2_TYPES:
            raise ModelFormatError(f"triton model {self.model_name!r}: tensor {t.get('name')!r} has type {datatype}; "
                                   f"edgepix handles {', '.join(_V2_TYPES)}")
        shape = tuple(normalise_dim(int(d)) for d in t.get("shape", ()))
        return TensorMeta(str(t["name"]), np.dtype(_V2_TYPES[datatype]), shape)

    @property
    def description(self) -> str:
        return (f"triton ({self.protocol}://{self.address}, model {self.model_name}"
                f"{' v' + self.options.model_version if self.options.model_version else ''}, {self.platform}, "
                f"max batch {self.max_batch_size})")

    # ---- inference -------------------------------------------------------------------------------------------

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = next(iter(feed.values())).shape[0] if feed else 0
        step = self.max_batch_size if self.max_batch_size > 0 else n
        if self.max_batch_size > 0 and n > step:  # larger batches than the server takes go as several requests
            parts = [self._infer_once({k: v[i:i + step] for k, v in feed.items()}) for i in range(0, n, step)]
            return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        return self._infer_once(feed)

    def _infer_once(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        module = self._module
        t0 = time.perf_counter_ns()
        inputs = []
        for name, array in feed.items():
            array = np.ascontiguousarray(array)
            datatype = _NUMPY_TO_V2.get(array.dtype)
            if datatype is None:
                raise BackendError(f"input {name!r}: numpy type {array.dtype.name} has no KServe v2 type")
            tensor = module.InferInput(name, list(array.shape), datatype)
            if self.protocol == "http":
                tensor.set_data_from_numpy(array, binary_data=True)
            else:
                tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [module.InferRequestedOutput(name, binary_data=True) if self.protocol == "http"
                   else module.InferRequestedOutput(name) for name in self._output_names]
        t1 = time.perf_counter_ns()
        result = self._call(lambda c: c.infer(self.model_name, inputs, model_version=self.options.model_version,
                                              outputs=outputs, **self._deadline()), what="run inference")
        t2 = time.perf_counter_ns()
        arrays = {name: np.array(result.as_numpy(name)) for name in self._output_names}
        t3 = time.perf_counter_ns()
        # Time spent waiting for a server that went away is counted as outage, not as round trip.
        self._counter.add(round_trip_ns=t3 - t0 - self._local.outage_ns, client_ns=(t1 - t0) + (t3 - t2))
        return arrays

    # ---- statistics ------------------------------------------------------------------------------------------

    def _server_counters(self) -> dict[str, int] | None:
        """The server's cumulative counters for this model (statistics extension), or None if it has none."""
        try:
            stats = self._json(self._client().get_inference_statistics(self.model_name, self.options.model_version,
                                                                       **self._deadline()))
        except Exception as e:  # noqa: BLE001 - a server without the statistics extension: no server split
            log.debug("triton statistics unavailable: %s", _one_line(e))
            return None
        totals = {"count": 0, "request_ns": 0, "queue_ns": 0, "compute_input_ns": 0, "compute_infer_ns": 0,
                  "compute_output_ns": 0}
        for model in stats.get("model_stats", ()):
            s = model.get("inference_stats", {})
            totals["count"] += int(s.get("success", {}).get("count", 0) or 0)
            totals["request_ns"] += int(s.get("success", {}).get("ns", 0) or 0)
            for key in ("queue", "compute_input", "compute_infer", "compute_output"):
                totals[f"{key}_ns"] += int(s.get(key, {}).get("ns", 0) or 0)
        return totals

    def _recent_server_counters(self) -> dict[str, int] | None:
        # A status line or HUD asks for statistics often; one statistics request per second is plenty.
        cached = getattr(self, "_counters_cache", None)
        if cached is not None and time.monotonic() - cached[0] < 1.0:
            return cached[1]
        counters = self._server_counters()
        self._counters_cache = (time.monotonic(), counters)
        return counters

    def run_stats(self) -> dict[str, Any]:
        """Mean milliseconds per request: round trip, client, network and server (queue, compute)."""
        if self._closed:
            return dict(self._final_stats or {})
        c = self._counter
        with c.lock:
            calls, round_trip, client = c.calls, c.round_trip_ns, c.client_ns
            reconnects, outage = c.reconnects, c.outage_s
        out: dict[str, Any] = {"backend": "triton", "server": f"{self.protocol}://{self.address}",
                               "model": self.model_name, "requests": calls, "reconnects": reconnects,
                               "outage_s": round(outage, 3)}
        if calls == 0:
            return out
        out["round_trip_ms"] = round(round_trip / calls / 1e6, 3)
        out["client_ms"] = round(client / calls / 1e6, 3)
        now = self._recent_server_counters()
        start = self._server_start
        if now is not None and start is not None and now["count"] > start["count"]:
            served = now["count"] - start["count"]

            def per_request(key: str) -> float:
                return round((now[key] - start[key]) / served / 1e6, 3)

            server = per_request("request_ns")
            out.update(server_ms=server, server_queue_ms=per_request("queue_ns"),
                       server_compute_ms=round(per_request("compute_input_ns") + per_request("compute_infer_ns")
                                               + per_request("compute_output_ns"), 3),
                       server_compute_infer_ms=per_request("compute_infer_ns"), server_requests=served)
            out["network_ms"] = round(max(0.0, out["round_trip_ms"] - out["client_ms"] - server), 3)
        else:
            out["network_ms"] = None  # the server reports no statistics: network and server are not split
        return out

    def close(self) -> None:
        # The statistics are read while the connection is still open (close() drops it).
        if not self._closed:
            self._counters_cache = None  # the final figures count every request
            self._final_stats = self.run_stats()
        super().close()

    def close_impl(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a client of a dead server
                pass


def _describe(e: BaseException) -> str:
    """One line: tritonclient's exceptions read '[status] message' already; a transport's gets its type."""
    if callable(getattr(e, "status", None)) and e.status():
        return _one_line(e)
    return f"{type(e).__name__}: {_one_line(e)}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
