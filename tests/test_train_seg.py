"""Segmentation training end to end on tiny data: it learns, writes its run folder, resumes exactly, trains under
torchrun, and the CLI reports per-class IoU and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import REPO, run_edgepix  # noqa: E402

from edgepix.runtime.core.errors import EdgepixError  # noqa: E402
from edgepix.runtime.description.spec import ModelSpec, Task  # noqa: E402
from edgepix.train.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from edgepix.train.segmentation import (  # noqa: E402
    SegTrainConfig,
    evaluate_checkpoint,
    format_iou_table,
    train_segmentation,
)
from edgepix.train.transforms import AugmentConfig, preprocess  # noqa: E402

CLASSES = ["background", "red", "green"]
# Tiny settings shared by the runs below: one thread (the suite shares two cores), no loader processes.
TINY = dict(imgsz=(64, 64), batch=8, workers=0, threads=1, quiet=True, augment=AugmentConfig(scale=(0.9, 1.1)))
TINY_UNET = dict(model="unet", model_kwargs={"base_channels": 4, "depth": 2})


def make_easy_dataset(root: Path, *, n_train: int, n_val: int, size: int = 64, seed: int = 0) -> Path:
    """Grey noisy background with one red and one green rectangle per image (masks 0/1/2)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stems = []
    for i in range(n_train + n_val):
        image = (np.full((size, size, 3), 110) + rng.integers(0, 20, (size, size, 1))).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        for cls, colour in ((1, (40, 40, 220)), (2, (40, 200, 40))):
            w, h = rng.integers(12, 28, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            image[y:y + h, x:x + w] = colour
            mask[y:y + h, x:x + w] = cls
        stem = f"{i:03d}"
        cv2.imwrite(str(root / "images" / f"{stem}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
        stems.append(stem)
    (root / "train.txt").write_text("\n".join(stems[:n_train]) + "\n")
    (root / "val.txt").write_text("\n".join(stems[n_train:]) + "\n")
    (root / "classes.json").write_text(json.dumps({"names": CLASSES}))
    return root


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    return make_easy_dataset(tmp_path_factory.mktemp("easy") / "data", n_train=64, n_val=8)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_easy_dataset(tmp_path_factory.mktemp("small") / "data", n_train=16, n_val=4, seed=1)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fastscnn_learns_and_writes_its_run_folder(easy_data, tmp_path):
    out = tmp_path / "run"
    cfg = SegTrainConfig(data=str(easy_data), out=str(out), model="fastscnn", epochs=6, lr=1e-2,
                         warmup_epochs=0, **TINY)
    result = train_segmentation(cfg)
    losses = [row["train_loss"] for row in result.history]
    mious = [row["val_miou"] for row in result.history]
    assert losses[-1] < 0.4 * losses[0], losses
    assert mious[-1] > 0.6 and mious[-1] > mious[0] + 0.3, mious
    assert result.best_miou == max(mious) and result.images_per_s > 0

    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.csv", "train.log"]
    rows = _read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert float(rows[-1]["val_miou"]) == pytest.approx(mious[-1], rel=1e-5)
    assert {"train_loss", "lr", "val_pixel_accuracy", "iou_red", "iou_green", "train_images_per_s"} <= set(rows[0])
    png = cv2.imread(str(out / "curves.png"))
    assert png is not None and png.shape[0] > 200 and png.shape[1] > 400
    log = (out / "train.log").read_text()
    assert "img/s" in log and "mIoU" in log and "done: 6 epochs" in log

    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["arch"] == "fastscnn" and ckpt["arch_kwargs"] == {"num_classes": 3}
    spec: ModelSpec = ckpt["spec"]
    assert spec.task is Task.SEGMENTATION and spec.class_names == tuple(CLASSES) and spec.input_size == (64, 64)
    assert spec.ignore_index == 255 and len(spec.palette) == 3
    assert ckpt["epoch"] == ckpt["best_epoch"] == result.best_epoch
    assert ckpt["metrics"]["val_miou"] == pytest.approx(result.best_miou)
    assert {"optimizer", "scheduler", "history", "train_config", "rng"} <= set(ckpt)

    # The checkpoint reproduces the recorded number through the runtime's preprocessing, image by image.
    model = model_from_checkpoint(ckpt)
    from edgepix.train.metrics import SegmentationMeter

    meter = SegmentationMeter(3)
    for stem in (easy_data / "val.txt").read_text().split():
        image = cv2.imread(str(easy_data / "images" / f"{stem}.png"))
        mask = cv2.imread(str(easy_data / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        with torch.no_grad():
            logits = model(torch.from_numpy(preprocess(image, spec))[None])
        meter.update(logits, torch.from_numpy(mask)[None])
    assert meter.compute().miou == pytest.approx(result.best_miou, abs=1e-6)


def test_resume_continues_exactly_where_the_run_stopped(small_data, tmp_path):
    """Interrupt after epoch 2 of 3, resume: the weights and the loss curve equal the uninterrupted run's."""
    common = dict(data=str(small_data), epochs=3, lr=5e-3, **TINY, **TINY_UNET)
    full = train_segmentation(SegTrainConfig(out=str(tmp_path / "full"), **common))

    def stop_after_two(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(SegTrainConfig(out=str(tmp_path / "cut"), **common), on_epoch_end=stop_after_two)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    with pytest.raises(EdgepixError, match="already holds a run"):
        train_segmentation(SegTrainConfig(out=str(tmp_path / "cut"), **common))
    # The resumed process gets only --out (and device/workers/threads); everything else comes from the checkpoint.
    resumed = train_segmentation(SegTrainConfig(data="ignored", out=str(tmp_path / "cut"), workers=0, threads=1,
                                                quiet=True), resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    assert [r["val_miou"] for r in resumed.history] == [r["val_miou"] for r in full.history]
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["scheduler"] == b["scheduler"]
    assert [r["epoch"] for r in _read_csv(tmp_path / "cut" / "metrics.csv")] == ["1", "2", "3"]
    # Resuming a finished run does nothing.
    assert train_segmentation(SegTrainConfig(out=str(tmp_path / "cut"), threads=1, quiet=True), resume=True) is None
    with pytest.raises(Exception, match="nothing to resume"):
        train_segmentation(SegTrainConfig(out=str(tmp_path / "none"), quiet=True), resume=True)


@pytest.mark.slow
def test_killed_cli_run_resumes_and_its_loss_curve_continues(small_data, tmp_path):
    """SIGKILL the real command after its first epoch; `--resume` finishes it with the uninterrupted numbers."""
    args = ["train", "seg", "--data", str(small_data), "--model", "unet", "--model-arg", "base_channels=4",
            "--model-arg", "depth=2", "--imgsz", "64", "--epochs", "4", "--batch", "8", "--lr", "5e-3",
            "--workers", "0", "--threads", "1", "--device", "cpu"]
    # The uninterrupted reference, in this process with the same settings.
    train_segmentation(SegTrainConfig(data=str(small_data), out=str(tmp_path / "ref"), epochs=4, lr=5e-3, device="cpu",
                                      imgsz=(64, 64), batch=8, workers=0, threads=1, quiet=True, **TINY_UNET))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edgepix", "-q", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "metrics.csv").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_read_csv(out / "metrics.csv"))
    assert 1 <= done < 4, "the run finished before it could be killed"
    assert load_checkpoint(out / "last.pt")["epoch"] == done  # the checkpoint is whole (atomic write)
    r = run_edgepix("-q", *args, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    got, want = _read_csv(out / "metrics.csv"), _read_csv(tmp_path / "ref" / "metrics.csv")
    assert [row["epoch"] for row in got] == ["1", "2", "3", "4"]
    assert [row["train_loss"] for row in got] == [row["train_loss"] for row in want]
    assert float(got[-1]["train_loss"]) < float(got[0]["train_loss"])


@pytest.mark.slow
def test_torchrun_two_processes_agrees_with_one_process(small_data, tmp_path):
    args = ["train", "seg", "--data", str(small_data), "--model", "unet", "--model-arg", "base_channels=4",
            "--model-arg", "depth=2", "--imgsz", "64", "--epochs", "2", "--batch", "8", "--lr", "5e-3",
            "--workers", "0", "--device", "cpu"]
    single = run_edgepix("-q", *args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "edgepix", *args, "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # Only rank 0 logs and writes: one set of files, one summary line.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert ddp.stderr.count("done: 2 epochs") == 1 and "2 processes (gloo)" in ddp.stderr
    ckpt = load_checkpoint(tmp_path / "two" / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 2 and len(ckpt["rng"]["torch"]) == 2
    one, two = _read_csv(tmp_path / "one" / "metrics.csv"), _read_csv(tmp_path / "two" / "metrics.csv")
    # Same global batches, same augmentation; only BatchNorm sees 4 images per process instead of 8.
    for a, b in zip(one, two):
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=0.1)
    # The reduced confusion matrix is the whole validation set's: one process evaluating the saved model agrees.
    ev = evaluate_checkpoint(tmp_path / "two" / "last.pt", str(small_data), device="cpu", quiet=True)
    assert ev.samples == 4
    assert ev.metrics.miou == pytest.approx(float(two[-1]["val_miou"]), abs=1e-6)
    assert ev.metrics.pixel_accuracy == pytest.approx(float(two[-1]["val_pixel_accuracy"]), abs=1e-6)


def test_cli_train_then_val_prints_a_per_class_table(small_data, tmp_path):
    out = tmp_path / "run"
    r = run_edgepix("train", "seg", "--data", str(small_data), "--model", "unet", "--model-arg", "base_channels=4",
                    "--model-arg", "depth=2", "--imgsz", "64", "--epochs", "1", "--batch", "8", "--workers", "0",
                    "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stderr and "done: 1 epochs" in r.stderr
    r = run_edgepix("val", "seg", str(out / "best.pt"), "--data", str(small_data))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[1].split() == ["class", "IoU", "pixels"]
    assert [line.split()[0] for line in lines[2:5]] == CLASSES
    miou = float(lines[5].split()[1])
    recorded = load_checkpoint(out / "best.pt")["metrics"]["val_miou"]
    assert miou == pytest.approx(recorded, abs=1e-4)
    r = run_edgepix("val", "seg", str(out / "best.pt"), "--data", str(small_data), "--json")
    data = json.loads(r.stdout)
    assert set(data["iou"]) == set(CLASSES) and data["samples"] == 4
    assert sum(data["pixels"].values()) == 4 * 64 * 64


def _cli(capsys, *args: str) -> tuple[int, str]:
    """The `edgepix` entry point in this process (same parser and error handling, no interpreter start-up)."""
    from edgepix.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse: bad usage
        code = e.code
    return code, capsys.readouterr().err


def test_cli_errors_are_one_line(small_data, tmp_path, capsys):
    code, err = _cli(capsys, "train", "seg", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    expected = (f"edgepix train: error: data folder not found: {tmp_path / 'nope'} "
                "(expected a dataset folder or 'synthetic')")
    assert code == 1 and err.strip().splitlines() == [expected]
    code, err = _cli(capsys, "train", "seg", "--data", str(small_data), "--model", "fastscn", "--out", str(tmp_path))
    assert code == 1 and "unknown model 'fastscn'" in err and "Did you mean 'fastscnn'" in err
    code, err = _cli(capsys, "train", "seg", "--data", "synthetic", "--imgsz", "100", "--out", str(tmp_path / "x"))
    assert code == 1 and "multiples of 32" in err
    code, err = _cli(capsys, "val", "seg", str(tmp_path / "absent.pt"), "--data", "synthetic")
    assert code == 1 and "checkpoint not found" in err
    code, err = _cli(capsys, "train", "seg")
    assert code == 2 and "--data" in err
    # A bad mask is found before training starts and named with its value, in the real command: one line, no
    # traceback, exit 1, nothing written.
    bad = make_easy_dataset(tmp_path / "bad", n_train=4, n_val=2)
    mask = cv2.imread(str(bad / "masks" / "001.png"), cv2.IMREAD_UNCHANGED)
    mask[0, 0] = 7
    cv2.imwrite(str(bad / "masks" / "001.png"), mask)
    r = run_edgepix("train", "seg", "--data", str(bad), "--out", str(tmp_path / "y"), "--imgsz", "64")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "001.png: mask value 7 is not a class" in r.stderr
    assert not (tmp_path / "y" / "last.pt").exists()


def test_val_on_mismatched_classes_is_refused(small_data, tmp_path):
    out = tmp_path / "run"
    train_segmentation(SegTrainConfig(data=str(small_data), out=str(out), epochs=1, **TINY, **TINY_UNET))
    with pytest.raises(EdgepixError, match="differ from the model's"):
        evaluate_checkpoint(out / "last.pt", "synthetic", synthetic_n=2, quiet=True)
    table = format_iou_table(evaluate_checkpoint(out / "last.pt", str(small_data), quiet=True))
    assert table.splitlines()[-2].startswith("mIoU")
