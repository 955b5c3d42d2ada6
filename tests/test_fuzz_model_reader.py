"""Seeded, bounded fuzzing of the model reader and the spec parser.

Mutants of a real export (truncations, byte flips, wrong length prefixes, text that is not UTF-8, unknown element
types, hostile spec JSON) and hostile spec / manifest JSON are read the ways a user reads a model: the header reader
with the embedded spec, `edgepix info`'s reader (ONNX Runtime), `Segmenter.load` and one frame through the loaded
model. Every outcome must be a success or an EdgepixError; a hang or runaway memory fails the test too.

The mutants run in a child process (this file run as a script) with an address-space limit, a per-case alarm and
an overall timeout, so that a crash, a hang or an allocation storm is reported as such instead of taking pytest down.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import engine_manifest_dict

SEED = 1234
PER_CASE_S = 5.0  # real cases take milliseconds; a case past this counts as a hang
TOTAL_S = 150  # the child as a whole (a hang inside C code is only stopped by this)
MEMORY_LIMIT = 8 << 30  # address space of the child: a runaway allocation fails instead of swapping the machine
PEAK_RSS_LIMIT_MB = 1500


# ---- the parent: pytest ------------------------------------------------------------------------------------------


def test_fuzzed_models_and_specs_load_or_fail_with_edgepix_errors(seg_onnx, tmp_path, record_property):
    cmd = [sys.executable, str(Path(__file__).resolve()), str(seg_onnx), str(tmp_path), str(SEED)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TOTAL_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    wall = time.monotonic() - t0
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    started = [r["case"] for r in records if r.get("event") == "start"]
    cases = [r for r in records if r.get("event") == "done"]
    hung = started[len(cases):]  # cases run one after the other: a start without its end is where it stopped
    assert proc.returncode == 0, (f"the fuzz child ended with {proc.returncode} after {wall:.1f} s; unfinished case "
                                  f"{hung[:1]}; stderr: {err[-2000:]}")
    summary = next(r for r in records if r.get("event") == "summary")
    loaded = [c for c in cases if c["outcome"] == "loaded"]
    own = [c for c in cases if c["outcome"] == "edgepix-error"]
    other = [c for c in cases if c["outcome"] == "other"]
    slow = sorted(cases, key=lambda c: -c["seconds"])[:3]
    line = (f"fuzz: {len(cases)} cases ({summary['model_mutants']} model mutants, {summary['json_cases']} spec and "
            f"manifest JSON cases): {len(loaded)} loaded, {len(own)} EdgepixError, {len(other)} other; "
            f"slowest {slow[0]['seconds']:.2f} s ({slow[0]['case']}), peak RSS {summary['peak_rss_mb']:.0f} MB, "
            f"wall {wall:.1f} s")
    print(line)
    for key, value in (("fuzz_cases", len(cases)), ("fuzz_loaded", len(loaded)), ("fuzz_edgepix_errors", len(own)),
                       ("fuzz_other", len(other)), ("fuzz_wall_s", round(wall, 1))):
        record_property(key, value)
    assert not hung
    assert not other, "not an EdgepixError: " + "; ".join(f"{c['case']}: {c['detail']}" for c in other[:5])
    assert slow[0]["seconds"] < PER_CASE_S, line
    assert summary["peak_rss_mb"] < PEAK_RSS_LIMIT_MB, line
    # The mix is meaningful: both outcomes occur in numbers, and every error was one line.
    assert len(cases) >= 300 and len(loaded) >= 30 and len(own) >= 150, line
    multi = [c for c in own if "\n" in c["detail"]]
    assert not multi, f"errors of more than one line: {multi[:2]}"


# ---- the child: mutants and readers ---------------------------------------------------------------------------
# A minimal protobuf walker of its own, so that the mutants do not depend on the reader under test.


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _fields(buf: bytes, base: int = 0, end: int | None = None):
    """(number, wire, field start, value start, value end) of each field of the message buf[base:end]."""
    pos, end = base, len(buf) if end is None else end
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, vend = _varint(buf, pos)
            vstart = pos
        elif wire == 1:
            vstart, vend = pos, pos + 8
        elif wire == 2:
            length, vstart = _varint(buf, pos)
            vend = vstart + length
        elif wire == 5:
            vstart, vend = pos, pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, start, vstart, vend
        pos = vend


def _length_field(number: int, payload: bytes) -> bytes:
    return _enc_varint((number << 3) | 2) + _enc_varint(len(payload)) + payload


class Model:
    """The export's bytes and the spans the mutants aim at."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.top = list(_fields(data))
        graph = next(f for f in self.top if f[0] == 7)
        self.graph = list(_fields(data, graph[3], graph[4]))
        self.meta = [f for f in self.top if f[0] == 14]
        # Structure: everything but the weights (initializers keep their first bytes: dims, type, name).
        self.structural: list[tuple[int, int]] = [(f[2], f[4]) for f in self.top if f[0] != 7]
        self.structural += [(f[2], f[4]) if f[0] != 5 else (f[2], min(f[4], f[3] + 48)) for f in self.graph]
        self.length_fields = [f for f in self.top + self.graph if f[1] == 2]
        self.strings = self._strings()

    def _strings(self) -> list[tuple[str, int, int]]:
        """(what, start, end) of text fields: producer, graph name, tensor names, metadata keys and values."""
        out = [("producer", f[3], f[4]) for f in self.top if f[0] == 2]
        out += [("graph name", f[3], f[4]) for f in self.graph if f[0] == 2]
        for f in self.graph:
            if f[0] in (11, 12):  # graph input / output ValueInfoProto: its name
                out += [(f"value name {f[0]}", g[3], g[4]) for g in _fields(self.data, f[3], f[4]) if g[0] == 1]
        for f in self.meta:
            out += [(f"metadata {g[0]}", g[3], g[4]) for g in _fields(self.data, f[3], f[4]) if g[0] in (1, 2)]
        return [s for s in out if s[2] > s[1]]

    def spec_text(self) -> str:
        for f in self.meta:
            entry = {g[0]: self.data[g[3]:g[4]] for g in _fields(self.data, f[3], f[4])}
            if entry.get(1) == b"edgepix.spec":
                return entry[2].decode()
        raise AssertionError("the export has no edgepix.spec")

    def with_spec(self, value: bytes) -> bytes:
        """The model with its edgepix.spec metadata value replaced (every other byte as it was)."""
        for f in self.meta:
            entry = {g[0]: self.data[g[3]:g[4]] for g in _fields(self.data, f[3], f[4])}
            if entry.get(1) == b"edgepix.spec":
                field = _length_field(14, _length_field(1, b"edgepix.spec") + _length_field(2, value))
                return self.data[:f[2]] + field + self.data[f[4]:]
        raise AssertionError("the export has no edgepix.spec")


def model_mutants(model: Model, rng: random.Random):
    """(name, bytes) of mutated models."""
    data, n = model.data, len(model.data)

    def structural_pos() -> int:
        start, end = rng.choice(model.structural)
        return rng.randrange(start, end)

    boundaries = sorted({f[4] for f in model.top + model.graph})
    for i in range(60):
        cut = (rng.randrange(1, n) if i < 20 else structural_pos() if i < 40
               else max(1, rng.choice(boundaries) + rng.choice((-1, 0, 1))))
        yield f"truncate@{cut}", data[:cut]
    for i in range(130):
        pos = rng.randrange(n) if i < 40 else structural_pos()
        flipped = bytearray(data)
        flipped[pos] ^= rng.randrange(1, 256)
        yield f"flip@{pos}", bytes(flipped)
    for i in range(60):
        number, _, start, vstart, vend = rng.choice(model.length_fields)
        tag_end = _varint(data, start)[1]
        length = vend - vstart
        new = rng.choice((length + 1, length - 1, 0, length * 2 + 7, 2**31, 2**63 - 1))
        encoded = _enc_varint(max(new, 0)) if i % 10 else b"\xff" * 10 + b"\x01"  # some: an over-long varint
        yield f"length{number}@{start}:{length}->{new if i % 10 else 'overlong'}", \
            data[:tag_end] + encoded + data[vstart:]
    for what, start, end in model.strings:
        for bad in (b"\xff", b"\xc3", b"\xed\xa0\x80"):  # invalid byte, cut sequence, encoded surrogate
            pos = rng.randrange(start, end)
            yield f"utf8 {what}@{pos}:{bad!r}", data[:pos] + bad + data[pos + 1:]
    yield from elem_type_mutants(data)
    for name, text in hostile_specs(json.loads(model.spec_text()), rng):
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        yield f"spec {name}", model.with_spec(raw)


def elem_type_mutants(data: bytes):
    import onnx

    for where in ("input", "output"):
        for elem_type in (0, 8, 16, 17, 99, 1000):
            m = onnx.load_from_string(data)
            getattr(m.graph, where)[0].type.tensor_type.elem_type = elem_type
            yield f"elem_type {where}={elem_type}", m.SerializeToString()


def hostile_specs(spec: dict, rng: random.Random):
    """(name, JSON text or bytes) of specs a damaged or crafted file could carry."""
    big = "1" + "0" * 4999
    yield "nested arrays 1e5", "[" * 100_000 + "]" * 100_000
    yield "nested objects 5e4", '{"a":' * 50_000 + "1" + "}" * 50_000
    yield "nested class_names", json.dumps(spec).replace('"class_names": [', '"class_names": ' + "[" * 5000 + "[", 1) \
        .replace('"palette"', "]" * 5000 + ', "palette"', 1)
    yield "empty", ""
    yield "null", "null"
    yield "list", "[1, 2]"
    yield "string", '"spec"'
    yield "NaN scale", json.dumps(spec).replace('"scale": ', '"scale": NaN, "x": ', 1)
    yield "duplicate keys", json.dumps(spec)[:-1] + ', "task": "segmentation"}'
    yield "huge document", json.dumps({**spec, "model_name": "m" * (2 << 20)})
    yield "huge string", json.dumps({**spec, "model_name": "m" * 100_000})
    yield "long class name", json.dumps({**spec, "class_names": ["c" * 5000] + spec["class_names"][1:]})
    yield "100000 classes", json.dumps({**spec, "class_names": [f"c{i}" for i in range(100_000)], "palette": []})
    yield "surrogate class name", json.dumps({**spec, "class_names": ["\ud800"] + spec["class_names"][1:]},
                                             ensure_ascii=True)
    yield "surrogate key", json.dumps({**spec, "\udfff": 1}, ensure_ascii=True)
    yield "not utf-8", json.dumps(spec).encode()[:20] + b"\xff\xfe" + json.dumps(spec).encode()[20:]
    for key in ("pad_value", "size_divisor", "ignore_index", "format_version"):
        yield f"{key} 5000 digits", _with(spec, key, big)
        yield f"{key} 39 digits", _with(spec, key, "9" * 39)
    for key in ("input_size", "palette"):
        yield f"{key} 5000 digits", json.dumps({**spec, key: None}).replace(f'"{key}": null', f'"{key}": [{big}, 1]')
    for key in ("scale", "mean", "std"):
        for literal in ("1e999", "-1e999", "1e309", "1" + "0" * 400, "Infinity", "-Infinity", "NaN", "1" + "0" * 38):
            value = literal if key == "scale" else f"[{literal}, 0.5, 0.5]"
            yield f"{key} {literal[:12]}", _with(spec, key, value)
    odd_values = [None, True, False, 0, -1, 1.5, "", "x" * 64, [], [1, 2, 3], {}, {"a": 1}, [[1, 2, 3]] * 3,
                  2**63, -(2**63), 1e300]
    for key in spec:
        for value in rng.sample(odd_values, 4):
            yield f"{key}={json.dumps(value)[:20]}", json.dumps({**spec, key: value})
    yield "unknown key", json.dumps({**spec, "colour_space": "RGB"})
    yield "missing key", json.dumps({k: v for k, v in spec.items() if k != "task"})
    text = json.dumps(spec)
    for _ in range(20):
        cut = rng.randrange(len(text))
        yield f"truncated@{cut}", text[:cut]
    for _ in range(20):
        pos = rng.randrange(len(text))
        yield f"flipped@{pos}", text[:pos] + chr(rng.choice(b'{}[]",:0123456789eE-+.\\ ')) + text[pos + 1:]


def _with(spec: dict, key: str, literal: str) -> str:
    """The spec's JSON with `key`'s value written as a raw literal (json.dumps cannot write 1e999 or 5000 digits)."""
    return json.dumps({**spec, key: "@@"}).replace('"@@"', literal)


def manifest_cases(spec: dict, rng: random.Random):
    """(name, text) of engine manifests: valid ones with hostile fields, and the hostile spec texts as manifests."""
    manifest = engine_manifest_dict(spec, [1, 3, 64, 64])
    profile = manifest["profiles"][0][0]
    yield "manifest valid", json.dumps(manifest)
    odd_values = [None, True, 7, "x", [], {}, [[1]], [{"a": 1}], 2**70]
    for key in manifest:
        for value in rng.sample(odd_values, 3):
            yield f"manifest {key}={json.dumps(value)[:16]}", json.dumps({**manifest, key: value})
    for key in ("min", "opt", "max"):
        yield f"manifest profile {key} strings", json.dumps({**manifest, "profiles": [[{**profile, key: ["a"]}]]})
    yield "manifest io shape strings", json.dumps({**manifest, "io": [{**manifest["io"][0], "shape": ["x"]}]})
    yield "manifest io shape dict", json.dumps({**manifest, "io": [{**manifest["io"][0], "shape": {"a": 1}}]})
    yield "manifest nested", "[" * 100_000 + "]" * 100_000
    yield "manifest 5000 digits", json.dumps({**manifest, "manifest_version": "@@"}).replace('"@@"', "1" * 5000)
    yield "manifest not utf-8", b"\xff" + json.dumps(manifest).encode()


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001 - the signal module's signature
    raise _Timeout(f"no result after {PER_CASE_S} s")


def _outcome(fn):
    """('loaded' | 'edgepix-error' | 'other', detail) of calling fn()."""
    from edgepix.runtime.core.errors import EdgepixError

    try:
        fn()
        return "loaded", ""
    except EdgepixError as e:
        return "edgepix-error", f"{type(e).__name__}: {e}"[:300]
    except BaseException as e:  # noqa: BLE001 - anything else is what this test looks for
        return "other", f"{type(e).__name__}: {str(e)[:300]}"


def _worst(results):
    for kind in ("other", "edgepix-error", "loaded"):
        for r in results:
            if r[0] == kind:
                return r
    return "loaded", ""


def run_child(model_path: Path, work: Path, seed: int) -> None:
    import numpy as np

    from edgepix.runtime.backends.tensorrt.manifest import read_manifest
    from edgepix.runtime.description.onnxinfo import read_onnx_info
    from edgepix.runtime.description.onnxproto import read_onnx_header
    from edgepix.runtime.description.spec import ModelSpec
    from edgepix.runtime.tasks.segmenter import Segmenter

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGALRM, _on_alarm)
    rng = random.Random(seed)
    model = Model(model_path.read_bytes())
    frame = np.random.default_rng(seed).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    mutant = work / "mutant.onnx"
    counts = {"model_mutants": 0, "json_cases": 0}

    def emit(**record) -> None:
        print(json.dumps(record), flush=True)

    def case(name: str, steps) -> None:
        emit(event="start", case=name)
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, PER_CASE_S)
        try:
            results = [_outcome(step) for step in steps]  # every reader: each has its own path to a failure
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        outcome, detail = _worst(results)
        emit(event="done", case=name, outcome=outcome, detail=detail, seconds=time.perf_counter() - t0)

    def read_model():
        header = read_onnx_header(mutant)
        ModelSpec.from_onnx_metadata(header.metadata, source=str(mutant))

    def run_segmenter():
        with Segmenter.load(mutant, "ort-cpu") as seg:
            seg.segment(frame)

    for name, data in model_mutants(model, rng):
        mutant.write_bytes(data)
        counts["model_mutants"] += 1
        case(name, [read_model, lambda: read_onnx_info(mutant), run_segmenter])

    spec = json.loads(model.spec_text())
    for name, text in hostile_specs(spec, rng):
        counts["json_cases"] += 1
        case(f"from_json {name}", [lambda text=text: ModelSpec.from_json(text)])
    manifest = work / "model.engine.json"
    for name, text in manifest_cases(spec, rng):
        counts["json_cases"] += 1
        manifest.write_bytes(text if isinstance(text, bytes) else text.encode())
        case(name, [lambda: read_manifest(manifest)])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    emit(event="summary", peak_rss_mb=peak_mb, **counts)


if __name__ == "__main__":
    run_child(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
