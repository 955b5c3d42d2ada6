"""Archives and generation on a local Ray cluster started here (2 CPUs): the same files as the local engine, an
actor killed mid-run, a rerun after the driver was killed, and the one-line error without ray."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, run_edgepix
from test_stream_reliability import noise_model
from test_stream_support import RGB_CLASSES, write_scene_video

from edgepix.runtime.batch.archive import ArchiveJob, run_archive
from edgepix.runtime.batch.cluster import ClusterOptions
from edgepix.runtime.batch.worker import read_journal
from edgepix.runtime.data.synthetic import SceneConfig, make_scene
from edgepix.runtime.description.spec import ONNX_METADATA_KEY, ModelSpec, default_palette
from edgepix.runtime.tasks.render import RenderOptions
from edgepix.runtime.tasks.segmenter import Segmenter

pytestmark = pytest.mark.slow
MASK = RenderOptions(mode="mask")


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster with 2 CPUs for this module; the engines join it (ray.is_initialized())."""
    ray = pytest.importorskip("ray", reason="needs Ray: pip install 'edgepix[scale]' (make setup installs it)")

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def conv_model(path: Path, *, size: int = 96) -> Path:
    """Three 3x3 convolutions with fixed random weights (about 5 ms a frame on one core): slow enough that a
    run can be interrupted part way, with class maps that vary across each frame. Built with onnx alone."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    shapes = {"w1": (16, 3, 3, 3), "w2": (16, 16, 3, 3), "w3": (3, 16, 3, 3)}
    weights = [numpy_helper.from_array((rng.normal(size=s) * 0.3).astype(np.float32), n) for n, s in shapes.items()]
    conv = {"pads": [1, 1, 1, 1]}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w1"], ["c1"], **conv), helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], **conv), helper.make_node("Relu", ["c2"], ["r2"]),
         helper.make_node("Conv", ["r2", "w3"], ["output"], **conv)], "convs",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, size, size])], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = ModelSpec(task="segmentation", model_name="convs", input_size=(size, size), class_names=RGB_CLASSES,
                     palette=default_palette(3), dynamic_batch=True)
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, spec.to_json()
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return conv_model(tmp_path_factory.mktemp("model") / "convs.onnx")


def make_archive(root: Path, *, videos: int, frames: int, images: int, broken: bool = True) -> Path:
    """Videos in two day folders (one .avi), scene images, and a broken image among them."""
    for i in range(videos):
        folder = root / f"day{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        write_scene_video(folder / f"cam{i}.{'avi' if i == 1 else 'mp4'}", n=frames, size=(128, 96), seed=i)
    shots = root / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        cv2.imwrite(str(shots / f"s{i}.jpg"), make_scene(i, SceneConfig(size=(72, 100)))[0])
    if broken:
        (shots / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    return root


def outputs(sink: Path) -> list[str]:
    """The outputs in `sink`: not its .edgepix folder, nor partial files (hidden names)."""
    return sorted(p.relative_to(sink).as_posix() for p in sink.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(sink).parts))


def decoded_frames(path: Path) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return np.stack(frames)


def assert_same_outputs(a: Path, b: Path) -> None:
    """The same names; images byte for byte; videos frame for frame, decoded."""
    assert outputs(a) == outputs(b)
    for name in outputs(a):
        if name.endswith(".png"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        else:
            x, y = decoded_frames(a / name), decoded_frames(b / name)
            assert x.shape == y.shape and np.array_equal(x, y), name


def test_ray_archive_writes_what_the_local_engine_writes(cluster, model, tmp_path):
    archive = make_archive(tmp_path / "archive", videos=3, frames=8, images=5)
    jobs = {engine: ArchiveJob(model=model, sources=[f"{archive}/**/*"], sink=str(tmp_path / engine), render=MASK,
                               engine=engine, chunk=2, cluster=ClusterOptions(actors=2), quiet=True)
            for engine in ("local", "ray")}
    summaries = {engine: run_archive(job) for engine, job in jobs.items()}
    assert summaries["ray"]["actors"] == 2
    expected = ["day0/cam0.mp4", "day0/cam2.mp4", "day1/cam1.avi"] + [f"shots/s{i}.png" for i in range(5)]
    assert outputs(tmp_path / "local") == sorted(expected)
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    for s in summaries.values():
        assert (s["inputs"], s["done"], s["failed"], s["skipped"], s["frames"]) == (9, 8, 1, 0, 3 * 8 + 5)
        assert s["failures"] == [{"input": f"{archive}/shots/broken.jpg", "reason": "not an image OpenCV can decode"}]
        journal = read_journal(s["sink"], s["run"])
        assert sorted(e["output"] for e in journal) == sorted(expected)
    # The PNGs are the model's class maps, pixel for pixel (mask colours are the palette, one per class).
    palette_bgr = np.array(default_palette(3), np.uint8)[:, ::-1]
    classes = set()
    with Segmenter.load(model, "ort-cpu") as seg:
        for i in range(5):
            class_map = seg.segment(cv2.imread(str(archive / "shots" / f"s{i}.jpg"))).class_map
            drawn = cv2.imread(str(tmp_path / "ray" / "shots" / f"s{i}.png"))
            assert np.array_equal(drawn, palette_bgr[class_map])
            classes.update(np.unique(class_map).tolist())
    assert len(classes) == 3  # maps with every class in them: a comparison that can fail


def actor_pids(class_name: str) -> list[int]:
    """Processes of this test's Ray actors of `class_name` (Ray titles them `ray::ClassName...`)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(f"ray::{class_name}") and descends_from(int(entry), os.getpid()):
            pids.append(int(entry))
    return pids


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_actor_killed_mid_run_and_nothing_is_missing_or_written_twice(cluster, model, tmp_path):
    archive = make_archive(tmp_path / "archive", videos=8, frames=40, images=6)
    sink = tmp_path / "ray"
    job = ArchiveJob(model=model, sources=[f"{archive}/**/*"], sink=str(sink), render=MASK, engine="ray", chunk=3,
                     cluster=ClusterOptions(actors=2), quiet=True)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_archive(job)))
    runner.start()
    wait_for(lambda: len(read_journal(sink)) >= 1 and len(actor_pids("SegmentActor")) == 2)
    victims = actor_pids("SegmentActor")
    os.kill(victims[0], signal.SIGKILL)
    runner.join(120)
    assert not runner.is_alive()
    assert result["workers_lost"] == 1 and result["task_retries"] == 1, result
    assert (result["done"], result["failed"], result["interrupted"], result["frames"]) == (14, 1, 0, 8 * 40 + 6)
    journal = read_journal(sink, result["run"])
    names = [e["output"] for e in journal]
    assert sorted(names) == outputs(sink) and len(names) == len(set(names)) == 14  # each output committed once
    retried = [r for r in result["items"] if r.get("attempt") == 2]  # the killed actor's task, run again
    assert retried and all(r["outcome"] == "done" for r in retried)
    # An input of it that the killed attempt had committed is reported, not written again.
    assert all(("note" in r) == (r["output"] not in {e["output"] for e in journal if e["attempt"] == 2})
               for r in retried)
    assert not [p for p in sink.rglob(".*partial*")]  # nothing half-written is left
    local = tmp_path / "local"
    run_archive(replace(job, sink=str(local), engine="local"))
    assert_same_outputs(local, sink)


def test_a_rerun_after_the_driver_was_killed_skips_what_was_finished(cluster, model, tmp_path):
    archive = make_archive(tmp_path / "archive", videos=6, frames=60, images=0, broken=False)
    sink = tmp_path / "out"
    command = [sys.executable, "-m", "edgepix", "-q", "segment", str(model), "--source", f"{archive}/**/*.*",
               "--sink", f"{sink}/", "--vis", "mask", "--engine", "ray", "--address", cluster, "--actors", "2"]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(read_journal(sink)) >= 2 or driver.poll() is not None)
    finally:
        driver.kill()
        _, err = driver.communicate()
    wait_for(lambda: not actor_pids("SegmentActor"))  # Ray ends the dead driver's actors
    first = set(outputs(sink))
    assert {e["output"] for e in read_journal(sink)} <= first
    assert 2 <= len(first) < 6, err.decode()  # killed part way through
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((sink / ".edgepix" / "summary.json").read_text())
    skipped = {r["output"] for r in summary["items"] if r["outcome"] == "skipped"}
    assert skipped == first and summary["done"] == 6 - len(first) and summary["failed"] == 0
    second = [e["output"] for e in read_journal(sink, summary["run"])]
    assert sorted(second + sorted(first)) == outputs(sink) == sorted(f"day{i % 2}/cam{i}.{'avi' if i == 1 else 'mp4'}"
                                                                       for i in range(6))
    for name in outputs(sink):  # complete: every frame of every input
        assert len(decoded_frames(sink / name)) == 60, name
    assert not [p for p in sink.rglob(".*partial*")]


def test_generate_on_ray_writes_the_local_files(cluster, tmp_path):
    from edgepix.cli import main

    model = noise_model(tmp_path / "gen.onnx")
    local = run_edgepix("-q", "generate", str(model), "--num", "45", "--batch", "4", "--seed", "3", "--out",
                        str(tmp_path / "local"), "--grid", str(tmp_path / "local.png"))
    assert local.returncode == 0, local.stderr
    assert main(["-q", "generate", str(model), "--num", "45", "--batch", "4", "--seed", "3", "--out",
                 str(tmp_path / "ray"), "--grid", str(tmp_path / "ray.png"), "--engine", "ray", "--actors", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == [f"{i:05d}.png" for i in range(45)] == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in names:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert (tmp_path / "local.png").read_bytes() == (tmp_path / "ray.png").read_bytes()


def test_without_ray_the_engine_fails_in_one_line(tmp_path):
    model = noise_model(tmp_path / "gen.onnx")
    code = ("import sys; sys.modules['ray'] = None; from edgepix.cli import main; "  # import ray -> ImportError
            f"sys.exit(main(['generate', {str(model)!r}, '--num', '2', '--out', {str(tmp_path / 'o')!r}, "
            "'--engine', 'ray']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "pip install 'edgepix[scale]'" in lines[0]
