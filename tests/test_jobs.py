"""`edgepix segment` as a Python call: runtime.streams.jobs.run_segment does what the command does."""

import json
import threading

import pytest

from edgepix.runtime.core.errors import InputError, ModelFormatError
from edgepix.runtime.streams.jobs import SegmentJob, run_segment
from edgepix.runtime.tasks.render import RenderOptions


def test_run_segment_from_python_writes_frames_and_statistics(seg_onnx, tmp_path):
    stats_file = tmp_path / "stats.json"
    lines: list[str] = []
    stats = run_segment(SegmentJob(model=seg_onnx, sources=["synthetic://?size=96x64&frames=6&fps=0"],
                                   sinks=[str(tmp_path / "out/")], render=RenderOptions(mode="mask"),
                                   stats=str(stats_file), workers=1, threads=1), describe=lines.append)
    assert stats["frames"] == 6 and len(list((tmp_path / "out").iterdir())) == 6
    assert json.loads(stats_file.read_text())["frames"] == 6
    assert len(lines) == 1 and "worker" in lines[0]


def test_run_segment_checks_the_job_before_opening_anything(seg_onnx, tmp_path):
    with pytest.raises(ModelFormatError, match="training checkpoint"):
        run_segment(SegmentJob(model=tmp_path / "best.pt"))
    with pytest.raises(InputError, match="--max-frames: expected a positive integer"):
        run_segment(SegmentJob(model=seg_onnx, max_frames=0))
    with pytest.raises(InputError, match="--triton-url applies to --backend triton"):
        run_segment(SegmentJob(model=seg_onnx, triton_url="127.0.0.1:8000"))


def test_run_segment_runs_outside_the_main_thread(seg_onnx):
    """A service may run jobs in threads: no signal handlers are installed there, and the job still runs."""
    result: dict = {}

    def job() -> None:
        result.update(run_segment(SegmentJob(model=seg_onnx, sources=["synthetic://?size=64x64&frames=3&fps=0"],
                                             sinks=["null://"], workers=1, threads=1)))

    t = threading.Thread(target=job)
    t.start()
    t.join(timeout=120)
    assert result.get("frames") == 3
