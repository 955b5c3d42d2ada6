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

A server that goes away (refused connection, reset, unavailable) is retried with a doubling backoff, as a dead
camera is reopened: the frame waits, the run does not crash. `reconnect_attempts` bounds the tries per outage
(None: keep trying until the backend is closed).

`tritonclient` is imported when a backend is created: pip install 'edgepix[triton]'.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import BackendError, ModelFormatError, require
from ..description.spec import ONNX_METADATA_KEY
from ..description.tensors import TensorMeta, normalise_dim
from .base import Backend

log = logging.getLogger(__name__)

HTTP_PORT, GRPC_PORT = 8000, 8001
FIRST_BACKOFF_S = 0.25
LOAD_ATTEMPTS = 3

# KServe v2 data types -> numpy
_V2_TYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}
_NUMPY_TO_V2 = {np.dtype(v): k for k, v in _V2_TYPES.items()}


@dataclass(frozen=True, kw_only=True)
class TritonOptions:
    url: str = "localhost:8000"  # HOST:PORT (HTTP), or http://HOST:PORT, grpc://HOST:PORT
    model_version: str = ""  # "": the server's version policy (the latest)
    timeout_s: float = 30.0  # connection and network timeout of one request
    reconnect_attempts: int | None = None  # tries per outage; None: until closed
    backoff_max: float = 2.0  # longest wait between tries (doubling from 0.25 s)
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


def _is_outage(e: BaseException) -> bool:
    """True for a server that is not there (refused, reset, timed out, unavailable), False for a bad request."""
    if isinstance(e, OSError):  # refused, reset, timed out (ConnectionError and TimeoutError are OSErrors)
        return True
    status = str(getattr(e, "status", lambda: "")() or "")
    text = str(e).lower()
    return (status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "503", "502")
            or "connection" in text or "unavailable" in text or "timed out" in text or "socket" in text)


class _Counter:
    """Client-side time totals, shared by the worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.round_trip_ns = 0
        self.client_ns = 0
        self.reconnects = 0
        self.outage_s = 0.0

    def add(self, round_trip_ns: int, client_ns: int) -> None:
        with self.lock:
            self.calls += 1
            self.round_trip_ns += round_trip_ns
            self.client_ns += client_ns


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
        metadata = self._call(lambda c: self._json(c.get_model_metadata(self.model_name, self.options.model_version)),
                              what="read the model metadata", attempts=attempts)
        self.max_batch_size = int(config.get("max_batch_size", 0) or 0)
        self.platform = str(metadata.get("platform", config.get("platform", "")))
        self.inputs = tuple(self._meta(t) for t in metadata.get("inputs", ()))
        self.outputs = tuple(self._meta(t) for t in metadata.get("outputs", ()))
        spec_text = (config.get("parameters", {}).get(ONNX_METADATA_KEY) or {}).get("string_value")
        self.metadata = {ONNX_METADATA_KEY: spec_text} if spec_text else {}
        self._output_names = [t.name for t in self.outputs]
        self._server_start = self._server_counters()

    # ---- connection ------------------------------------------------------------------------------------------

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            kwargs: dict[str, Any] = {"url": self.address, "ssl": self.options.ssl}
            if self.protocol == "http":
                kwargs.update(connection_timeout=self.options.timeout_s, network_timeout=self.options.timeout_s)
            client = self._module.InferenceServerClient(**kwargs)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

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
        """fn(client) with reconnects: an outage is retried with a doubling backoff, anything else raised.
        `attempts`: reconnect tries before giving up (default: the options' reconnect_attempts)."""
        attempt, wait, outage_start = 0, FIRST_BACKOFF_S, None
        limit = self.options.reconnect_attempts if attempts is None else attempts
        self._local.outage_ns = 0
        while True:
            if self._closed:
                raise BackendError(f"backend 'triton' for {self.model_name} is closed")
            try:
                result = fn(self._client())
            except Exception as e:  # noqa: BLE001 - tritonclient and the transports raise many types
                if not _is_outage(e):
                    raise self._error(e, what) from e
                self._drop_client()
                attempt += 1
                if outage_start is None:
                    outage_start = time.monotonic()
                    log.warning("triton server %s: %s failed (%s); reconnecting", self.address, what,
                                _one_line(e))
                if limit is not None and attempt > limit:
                    raise BackendError(f"triton server {self.address} is unreachable ({_one_line(e)}) after "
                                       f"{limit} reconnect attempt(s); check that it runs and serves "
                                       f"{self.model_name!r}") from e
                time.sleep(wait)
                wait = min(wait * 2, self.options.backoff_max)
                continue
            if outage_start is not None:
                self._local.outage_ns = int((time.monotonic() - outage_start) * 1e9)
                with self._counter.lock:
                    self._counter.reconnects += 1
                    self._counter.outage_s += time.monotonic() - outage_start
                log.warning("triton server %s: reconnected after %.1f s", self.address,
                            time.monotonic() - outage_start)
            return result

    def _error(self, e: Exception, what: str) -> BackendError:
        text = _one_line(e)
        if "unknown model" in text.lower() or "not found" in text.lower():
            return ModelFormatError(f"triton server {self.address} has no ready model {self.model_name!r} ({text}); "
                                    "check the name and the server's log")
        return BackendError(f"triton server {self.address}: could not {what} for {self.model_name!r}: {text}")

    # ---- description -----------------------------------------------------------------------------------------

    def _json(self, answer) -> dict:
        """HTTP answers are dicts; gRPC ones protobuf messages (asked for as_json where the API allows)."""
        if isinstance(answer, dict):
            return answer
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(answer, preserving_proto_field_name=True)

    def _model_config(self, client) -> dict:
        config = self._json(client.get_model_config(self.model_name, self.options.model_version))
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
                                              outputs=outputs), what="run inference")
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
            stats = self._json(self._client().get_inference_statistics(self.model_name, self.options.model_version))
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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
