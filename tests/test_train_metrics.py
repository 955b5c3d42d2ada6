"""The confusion-matrix meter and the losses, against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgepix.train.losses import SegmentationLoss  # noqa: E402
from edgepix.train.metrics import SegmentationMeter  # noqa: E402
from edgepix.train.segmentation import Schedule, lr_factor  # noqa: E402


def test_meter_on_a_known_confusion():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    m = SegmentationMeter(3, ignore_index=255)
    m.update(pred[None], target[None])
    assert m.matrix.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    r = m.compute()
    # IoU = TP / (TP + FP + FN): class 0: 1/(1+1+1), class 1: 3/(3+1+0), class 2: 1/(1+0+1)
    assert r.iou == pytest.approx((1 / 3, 3 / 4, 1 / 2))
    assert r.miou == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert r.pixel_accuracy == pytest.approx(5 / 7)
    assert r.pixels == (2, 3, 2)


def test_meter_takes_logits_and_accumulates():
    m = SegmentationMeter(2, ignore_index=None)
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 1, 0, 2] = 1.0  # argmax: [0, 0, 1]
    target = torch.tensor([[[0, 1, 1]]])
    m.update(logits, target)
    m.update(logits, target)
    assert m.matrix.tolist() == [[2, 0], [2, 2]]
    assert m.compute().miou == pytest.approx((2 / 4 + 2 / 4) / 2)


def test_meter_absent_class_is_nan_and_not_averaged():
    m = SegmentationMeter(3)
    m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    r = m.compute()
    assert r.iou[:2] == (1.0, 1.0) and math.isnan(r.iou[2]) and r.miou == 1.0


def test_meter_agrees_with_the_runtime_confusion_matrix():
    from edgepix.runtime.data.metrics import ConfusionMatrix

    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (3, 17, 19))
    target[0, :3] = 255
    pred = rng.integers(0, 5, (3, 17, 19))
    cm = ConfusionMatrix(5, 255)
    cm.update(pred, target)
    m = SegmentationMeter(5)
    m.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert np.array_equal(m.matrix.numpy(), cm.matrix)
    assert m.compute().miou == pytest.approx(cm.miou())


def test_cross_entropy_ignores_the_ignore_index():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 255]]])
    loss = SegmentationLoss("ce", ignore_index=255)(logits, target)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_ohem_keeps_the_hard_pixels():
    # Eight pixels: six easy (p(true) ~ 0.99), two hard (p(true) ~ 0.12). OHEM with threshold 0.7 keeps the hard two.
    logits = torch.zeros(1, 2, 1, 8)
    logits[0, 0] = torch.tensor([5.0, 5, 5, 5, 5, 5, -1, -1])
    target = torch.zeros(1, 1, 8, dtype=torch.long)
    ohem = SegmentationLoss("ohem", ohem_threshold=0.7, ohem_min_fraction=0.1)(logits, target)
    ce = SegmentationLoss("ce")(logits, target)
    hard = math.log(1 + math.exp(1.0))  # -log softmax([-1, 0])[0]
    assert ohem.item() == pytest.approx(hard, rel=1e-5)
    assert ce.item() < ohem.item()
    # With no pixel above the threshold, the hardest min_fraction are kept.
    easy = SegmentationLoss("ohem", ohem_threshold=0.01, ohem_min_fraction=0.25)(logits, target)
    assert easy.item() == pytest.approx(hard, rel=1e-5)


def test_dice_term_is_zero_for_perfect_predictions_and_positive_otherwise():
    target = torch.tensor([[[0, 1], [1, 255]]])
    perfect = torch.full((1, 2, 2, 2), -30.0)
    perfect[0, 0, 0, 0] = perfect[0, 1, 0, 1] = perfect[0, 1, 1, 0] = 30.0
    loss = SegmentationLoss("ce", dice_weight=1.0)
    assert loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    wrong = -perfect
    assert loss(wrong, target).item() > 30  # CE dominates; Dice adds close to 1
    assert (SegmentationLoss("ce", dice_weight=1.0)(wrong, target) - SegmentationLoss("ce")(wrong, target)).item() \
        == pytest.approx(0.75, abs=1e-4)
    # Per class, Dice = (2 * overlap + 1) / (predicted + true + 1): class 0 has 0 overlap, 2 predicted and 1 true
    # pixel -> 1/4; class 1 has 0 overlap, 1 predicted and 2 true -> 1/4; the loss is the mean of 1 - Dice = 0.75.


@pytest.mark.parametrize("schedule", list(Schedule))
def test_warmup_then_decay(schedule):
    kw = dict(total=100, warmup=10, schedule=schedule, warmup_start=0.1, min_ratio=0.01)
    f = [lr_factor(i, **kw) for i in range(101)]
    assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(0.55) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after the warm-up
    assert f[100] == pytest.approx(0.01)
    mid = lr_factor(55, **kw)
    assert mid == pytest.approx(0.01 + 0.99 * (0.5 if schedule is Schedule.COSINE else 0.5**0.9), rel=1e-6)
