"""A STAND-IN for Triton Inference Server, kept for the one thing the real server in the tests cannot do: serve the
onnxruntime_onnx repositories that `edgepix export ... --format triton` writes by default. The tests' real server
(tests/triton_server.py, from the nvidia-pytriton wheel) has only Triton's Python backend, no onnxruntime backend;
everything else about the `triton` backend (gRPC, errors, timeouts, outages) is tested against that real server.

It is not Triton: a small loopback HTTP server that speaks the KServe v2 protocol over HTTP only (no gRPC), serves
onnxruntime_onnx models with ONNX Runtime on the CPU, always answers in binary, and implements the parts of the
protocol tritonclient's HTTP client calls:

    GET  /v2/health/live, /v2/health/ready, /v2/models/NAME[/versions/V]/ready
    GET  /v2/models/NAME[/versions/V]          model metadata (inputs, outputs, datatypes, shapes)
    GET  /v2/models/NAME[/versions/V]/config   the model configuration as JSON (config.pbtxt parsed by
                                               tritonclient's ModelConfig protobuf, so a bad config fails here)
    GET  /v2/models/NAME[/versions/V]/stats    the statistics extension: success, queue, compute_input/infer/output
    POST /v2/models/NAME[/versions/V]/infer    with the binary tensor data extension

Requests are checked against the configuration (names, datatypes, dims, max_batch_size) and refused with the HTTP
status Triton gives (400; 404 for a model it does not have); its error texts are its own. Each model runs
`instance_group.count` requests at once; others wait, and that wait is the reported queue time. There is no dynamic
batching and no repository index.

    python tests/kserve_standin.py --repository REPO --port 8000
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

V2_TO_NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
               "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
               "FP32": np.float32, "FP64": np.float64}
NUMPY_TO_V2 = {np.dtype(v): k for k, v in V2_TO_NUMPY.items()}
STAT_KEYS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def parse_config(text: str):
    """config.pbtxt -> tritonclient's ModelConfig message (raises on anything Triton's parser would refuse)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


class StandInModel:
    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort
        from google.protobuf.json_format import MessageToDict

        self.config = parse_config((folder / "config.pbtxt").read_text(encoding="utf-8"))
        self.name = self.config.name or folder.name
        self.config_json = MessageToDict(self.config, preserving_proto_field_name=True)
        if self.config.platform != "onnxruntime_onnx":
            raise ValueError(f"the stand-in serves onnxruntime_onnx models only, {self.name} is {self.config.platform}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "1" / "model.onnx"), so, providers=["CPUExecutionProvider"])
        instances = sum(g.count or 1 for g in self.config.instance_group) or 1
        self.slots = threading.Semaphore(instances)
        self.lock = threading.Lock()
        self.stats = {k: {"count": 0, "ns": 0} for k in STAT_KEYS}
        self.inference_count = 0

    def shape(self, dims) -> list[int]:
        return ([-1] if self.config.max_batch_size > 0 else []) + [int(d) for d in dims]

    def metadata(self) -> dict:
        def tensors(items):
            return [{"name": t.name, "datatype": _v2(t.data_type), "shape": self.shape(t.dims)} for t in items]

        return {"name": self.name, "versions": ["1"], "platform": self.config.platform,
                "inputs": tensors(self.config.input), "outputs": tensors(self.config.output)}

    def record(self, key: str, ns: int) -> None:
        with self.lock:
            self.stats[key]["count"] += 1
            self.stats[key]["ns"] += ns

    def statistics(self) -> dict:
        with self.lock:
            return {"model_stats": [{"name": self.name, "version": "1", "inference_count": self.inference_count,
                                     "execution_count": self.stats["success"]["count"],
                                     "inference_stats": json.loads(json.dumps(self.stats)), "batch_stats": []}]}

    def check(self, name: str, array: np.ndarray, datatype: str) -> None:
        spec = next((t for t in self.config.input if t.name == name), None)
        if spec is None:
            raise ValueError(f"stand-in: {self.name} has no input {name}")
        if datatype != _v2(spec.data_type):
            raise ValueError(f"stand-in: {self.name} input {name}: {datatype} given, {_v2(spec.data_type)} configured")
        expected = self.shape(spec.dims)
        if len(array.shape) != len(expected) or any(e != -1 and e != s for e, s in zip(expected, array.shape)):
            raise ValueError(f"stand-in: {self.name} input {name}: shape {list(array.shape)} given, {expected} "
                             "configured")
        if self.config.max_batch_size > 0 and array.shape[0] > self.config.max_batch_size:
            raise ValueError(f"stand-in: {self.name}: batch {array.shape[0]} above max_batch_size "
                             f"{self.config.max_batch_size}")


def _v2(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(data_type)[len("TYPE_"):]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient expects
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _model(self, parts: list[str]) -> tuple[StandInModel | None, list[str]]:
        # parts after "v2/models": NAME [versions V] [rest...]
        model = self.server.models.get(parts[0]) if parts else None
        rest = parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            if rest[1] not in ("1", ""):
                return None, rest
            rest = rest[2:]
        return model, rest

    def do_GET(self) -> None:
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        if parts[:2] == ["v2", "health"]:
            return self._send(200)
        if parts[:2] != ["v2", "models"]:
            return self._json(404, {"error": f"not found: {self.path}"})
        model, rest = self._model(parts[2:])
        if model is None:
            return self._json(404, {"error": f"stand-in: no model {parts[2] if len(parts) > 2 else ''!r}"})
        if not rest:
            return self._json(200, model.metadata())
        if rest == ["ready"]:
            return self._send(200)
        if rest == ["config"]:
            return self._json(200, model.config_json)
        if rest == ["stats"]:
            return self._json(200, model.statistics())
        return self._json(404, {"error": f"not found: {self.path}"})

    def do_POST(self) -> None:
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        model, rest = self._model(parts[2:]) if parts[:2] == ["v2", "models"] else (None, [])
        if model is None or rest != ["infer"]:
            return self._json(404, {"error": f"stand-in: no model or endpoint {self.path}"})
        start = time.perf_counter_ns()
        try:
            header_length = int(self.headers.get("Inference-Header-Content-Length", length))
            request = json.loads(body[:header_length])
            offset = header_length
            feed = {}
            for t in request["inputs"]:
                dtype = np.dtype(V2_TO_NUMPY[t["datatype"]])
                size = t.get("parameters", {}).get("binary_data_size")
                if size is not None:
                    array = np.frombuffer(body[offset:offset + size], dtype).reshape(t["shape"])
                    offset += size
                else:
                    array = np.asarray(t["data"], dtype).reshape(t["shape"])
                model.check(t["name"], array, t["datatype"])
                feed[t["name"]] = array
        except (ValueError, KeyError) as e:
            model.record("fail", time.perf_counter_ns() - start)
            return self._json(400, {"error": str(e)})
        t_input = time.perf_counter_ns()
        model.slots.acquire()
        t_run = time.perf_counter_ns()
        try:
            wanted = [o["name"] for o in request.get("outputs", [])] or [o.name for o in model.config.output]
            arrays = model.session.run(wanted, feed)
        finally:
            model.slots.release()
        t_done = time.perf_counter_ns()
        outputs, blobs = [], []
        for name, array in zip(wanted, arrays):
            array = np.ascontiguousarray(array)
            blob = array.tobytes()
            outputs.append({"name": name, "datatype": NUMPY_TO_V2[array.dtype], "shape": list(array.shape),
                            "parameters": {"binary_data_size": len(blob)}})
            blobs.append(blob)
        header = json.dumps({"model_name": model.name, "model_version": "1", "outputs": outputs}).encode()
        t_output = time.perf_counter_ns()
        model.record("queue", t_run - t_input)
        model.record("compute_input", t_input - start)
        model.record("compute_infer", t_done - t_run)
        model.record("compute_output", t_output - t_done)
        model.record("success", t_output - start)
        with model.lock:
            model.inference_count += next(iter(feed.values())).shape[0] if model.config.max_batch_size > 0 else 1
        self._send(200, header + b"".join(blobs), {"Content-Type": "application/octet-stream",
                                                    "Inference-Header-Content-Length": str(len(header))})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    models: dict[str, StandInModel]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Close every open keep-alive connection, as a server process that exits does."""
        import socket

        with self.connections_lock:
            connections, self.connections = list(self.connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class KServeStandInServer:
    """The stand-in on 127.0.0.1 (port 0: any free port), in a background thread."""

    def __init__(self, repository: str | Path, *, port: int = 0) -> None:
        self.repository = Path(repository)
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.models = {m.name: m for m in (StandInModel(p) for p in sorted(self.repository.iterdir())
                                           if (p / "config.pbtxt").is_file())}

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> KServeStandInServer:
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.models = self.models
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kserve-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections (a server that went away)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.drop_connections()
            self._server = None

    def __enter__(self) -> KServeStandInServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="A KServe v2 stand-in for Triton (tests only)")
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = KServeStandInServer(args.repository, port=args.port).start()
    print(f"KServe v2 stand-in (not Triton) serving {', '.join(server.models)} on {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
