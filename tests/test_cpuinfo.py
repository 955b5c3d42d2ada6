"""CPU instruction sets: parsing /proc/cpuinfo for x86 and ARM, the numpy fallback, what `edgepix doctor` prints,
and the one-line warning `export --format onnx-int8` gives where INT8 has no fast path."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest

from edgepix.runtime.core import cpuinfo
from edgepix.runtime.core.cpuinfo import CpuFeatures, parse_proc_cpuinfo

# Trimmed from real machines: an AVX2-only AMD EPYC (Zen 2), an Intel Xeon with AVX-512 VNNI (Cascade Lake),
# a Jetson Orin (Cortex-A78AE) and a Raspberry Pi 4 (Cortex-A72).
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
processor\t: 1
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512_vnni
"""
XEON_VNNI = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni
"""
JETSON_ORIN = """processor\t: 0
model name\t: ARMv8 Processor rev 1 (v8l)
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""
RASPBERRY_PI_4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
Hardware\t: BCM2835
"""


def test_an_avx2_only_x86_cpu_has_no_fast_int8_path():
    cpu = parse_proc_cpuinfo(EPYC_AVX2, "x86_64")
    assert cpu.model == "AMD EPYC 7B12" and cpu.source == "/proc/cpuinfo"
    features = dict(cpu.features())
    assert features["AVX2"] is True
    # only the first processor's flags count, and an unlisted flag is absent, not unknown
    assert features["AVX-512"] is False and features["AVX-512-VNNI"] is False and features["AMX-INT8"] is False
    assert cpu.fast_int8 is False and cpu.fp16_arithmetic is False
    assert cpu.int8_advice().startswith("no VNNI or AMX")
    assert "AVX2 yes, AVX-512 no, AVX-512-VNNI no, AVX-VNNI no, AMX-INT8 no" in cpu.describe()


def test_vnni_is_a_fast_int8_path():
    cpu = parse_proc_cpuinfo(XEON_VNNI, "x86_64")
    assert cpu.fast_int8 is True
    assert cpu.int8_advice() == "INT8 has a fast path here (AVX-512-VNNI)"


def test_arm_dot_product_and_fp16_arithmetic():
    orin = parse_proc_cpuinfo(JETSON_ORIN, "aarch64")
    assert dict(orin.features()) == {"NEON": True, "dot-product": True, "I8MM": False, "FP16-arithmetic": True,
                                     "SVE": False}
    assert orin.fast_int8 is True and orin.fp16_arithmetic is True
    pi = parse_proc_cpuinfo(RASPBERRY_PI_4, "aarch64")
    assert pi.fast_int8 is False and pi.fp16_arithmetic is False and dict(pi.features())["NEON"] is True
    assert "asimddp" in pi.int8_advice()


def test_without_a_flags_line_nothing_is_claimed():
    cpu = parse_proc_cpuinfo("processor\t: 0\nmodel name\t: QEMU Virtual CPU\n", "x86_64")
    assert cpu.fast_int8 is None and all(present is None for _, present in cpu.features())
    assert "unknown" in cpu.int8_advice()


def test_the_numpy_fallback_knows_some_flags_and_leaves_the_rest_unknown():
    cpu = cpuinfo._from_numpy("x86_64")
    features = dict(cpu.features())
    if cpu.source == "numpy":  # numpy's table is internal; without it everything is unknown
        assert features["AVX2"] in (True, False)
        assert features["AVX-VNNI"] is None and features["AMX-INT8"] is None  # numpy does not detect these


def test_this_machine_is_read_once_and_agrees_with_numpy_where_both_know():
    cpu = cpuinfo.cpu_features()
    assert cpu is cpuinfo.cpu_features()
    numpy_view = cpuinfo._from_numpy(cpu.machine)
    for label, present in cpu.features():
        other = dict(numpy_view.features()).get(label)
        if present is not None and other is not None and label in ("AVX2", "AVX-512", "NEON"):
            assert present == other, label


def fake_cpu(*flags: str) -> CpuFeatures:
    known = {f for _, names in cpuinfo.X86_FEATURES for f in names}
    return CpuFeatures(machine="x86_64", model="Test CPU", flags=frozenset(flags), known=frozenset(known),
                       source="/proc/cpuinfo")


def test_doctor_prints_the_instruction_sets(monkeypatch, capsys):
    from edgepix.commands import cmd_doctor

    monkeypatch.setattr(cpuinfo, "cpu_features", lambda: fake_cpu("avx2"))
    assert cmd_doctor(argparse.Namespace(engines=None)) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "Test CPU: AVX2 yes, AVX-512 no, AVX-512-VNNI no, AVX-VNNI no, AMX-INT8 no" in lines["cpu"]
    assert lines["cpu-int8"].split()[1] == "slow" and "no VNNI or AMX" in lines["cpu-int8"]
    assert lines["cpu-fp16"].split()[1] == "none"


def test_int8_export_warns_once_where_the_cpu_has_no_fast_int8_path(seg_onnx, tmp_path, monkeypatch, caplog):
    from edgepix.export.precision import Int8Options, Int8Target, quantize_int8
    from edgepix.runtime.description.spec import ModelSpec

    spec = ModelSpec.from_onnx(seg_onnx)
    calibration = [np.random.default_rng(i).standard_normal((1, 3, *spec.input_size), dtype=np.float32)
                   for i in range(2)]
    caplog.set_level(logging.WARNING, logger="edgepix.runtime.core.cpuinfo")
    for flags, warnings in ((("avx2", "avx512_vnni"), 0), (("avx2",), 1)):
        monkeypatch.setattr(cpuinfo, "cpu_features", lambda flags=flags: fake_cpu(*flags))
        cpuinfo.warn_if_int8_is_slow_here.cache_clear()
        caplog.clear()
        for i in range(2):  # twice in one process: still one line
            quantize_int8(seg_onnx, tmp_path / f"int8_{i}.onnx", spec, calibration, Int8Options())
        lines = [r.getMessage() for r in caplog.records if r.name == "edgepix.runtime.core.cpuinfo"]
        assert len(lines) == warnings, lines
        if warnings:
            assert lines[0].startswith("this CPU (Test CPU) has no VNNI or AMX") and "\n" not in lines[0]
    cpuinfo.warn_if_int8_is_slow_here.cache_clear()
    caplog.clear()
    quantize_int8(seg_onnx, tmp_path / "trt.onnx", spec, calibration, Int8Options(target=Int8Target.TENSORRT))
    assert not [r for r in caplog.records if r.name == "edgepix.runtime.core.cpuinfo"]  # TensorRT is not this CPU
    cpuinfo.warn_if_int8_is_slow_here.cache_clear()


@pytest.mark.parametrize("reduce_range", [False, True])
def test_reduce_range_is_recorded_in_the_spec(seg_onnx, tmp_path, reduce_range):
    from edgepix.export.precision import Int8Options, quantize_int8
    from edgepix.runtime.description.spec import ModelSpec

    spec = ModelSpec.from_onnx(seg_onnx)
    calibration = [np.zeros((1, 3, *spec.input_size), np.float32)]
    out = quantize_int8(seg_onnx, tmp_path / "q.onnx", spec, calibration, Int8Options(reduce_range=reduce_range))
    assert ("reduce_range" in out.quantization) is reduce_range


def test_loading_an_int8_file_on_a_cpu_without_fast_int8_says_so_once(seg_onnx, tmp_path, monkeypatch, caplog):
    import json

    import onnx

    from edgepix.runtime import Segmenter
    from edgepix.runtime.description.spec import ONNX_METADATA_KEY

    model = onnx.load(str(seg_onnx))
    for prop in model.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            spec = json.loads(prop.value)
            spec["precision"] = "int8"  # the same graph, described as an INT8 artifact
            prop.value = json.dumps(spec)
    int8 = tmp_path / "int8.onnx"
    onnx.save(model, str(int8))
    monkeypatch.setattr(cpuinfo, "cpu_features", lambda: parse_proc_cpuinfo(EPYC_AVX2.split("processor\t: 1")[0],
                                                                             "x86_64"))
    cpuinfo.warn_if_int8_is_slow_here.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                Segmenter.load(int8, backend="ort-cpu").close()
            Segmenter.load(seg_onnx, backend="ort-cpu").close()
        said = [r.getMessage() for r in caplog.records if "INT8" in r.getMessage()]
        assert len(said) == 1 and "AMD EPYC 7B12" in said[0] and "ship the FP32 file" in said[0], said
    finally:
        cpuinfo.warn_if_int8_is_slow_here.cache_clear()
