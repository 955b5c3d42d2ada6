"""GAN losses against hand-computed values; SSIM and diversity on inputs with known answers; paired data."""

import math

import numpy as np
import pytest
import torch

from edgepix.train.gan_data import PairedDataset, colorize_mask, open_pair_source
from edgepix.train.gan_eval import (
    class_mean_colours,
    diversity,
    mean_pairwise_distance,
    paint_mean_colours,
    pixel_features,
    ssim,
)
from edgepix.train.gan_losses import GANLoss, make_adam, pix2pix_generator_loss

REAL = torch.tensor([2.0, -1.0])
FAKE = torch.tensor([0.5, -3.0])


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


@pytest.mark.parametrize("mode,d_real,d_fake,g", [
    # vanilla: BCE with logits = softplus(-x) for target 1, softplus(x) for target 0
    ("vanilla", (softplus(-2.0) + softplus(1.0)) / 2, (softplus(0.5) + softplus(-3.0)) / 2,
     (softplus(-0.5) + softplus(3.0)) / 2),
    # lsgan: ((2-1)^2 + (-1-1)^2)/2, (0.5^2 + 3^2)/2, ((0.5-1)^2 + (-3-1)^2)/2
    ("lsgan", 2.5, 4.625, 8.125),
    # hinge: (relu(-1) + relu(2))/2, (relu(1.5) + relu(-2))/2, -(0.5 - 3)/2
    ("hinge", 1.0, 0.75, 1.25),
])
def test_gan_losses_match_hand_computed_values(mode, d_real, d_fake, g):
    loss = GANLoss(mode)
    assert float(loss.d_real(REAL)) == pytest.approx(d_real, abs=1e-6)
    assert float(loss.d_fake(FAKE)) == pytest.approx(d_fake, abs=1e-6)
    assert float(loss.d_loss(REAL, FAKE)) == pytest.approx(d_real + d_fake, abs=1e-6)
    assert float(loss.g_loss(FAKE)) == pytest.approx(g, abs=1e-6)


def test_vanilla_values_spelled_out():
    # softplus(-2) = 0.126928, softplus(1) = 1.313262 -> 0.720095
    assert float(GANLoss("vanilla").d_real(REAL)) == pytest.approx(0.720095, abs=1e-6)


def test_pix2pix_objective_is_gan_plus_100_l1():
    fake_b = torch.tensor([[0.0, 0.5], [1.0, -1.0]]).reshape(1, 1, 2, 2)
    real_b = torch.tensor([[0.5, 0.5], [0.0, -1.0]]).reshape(1, 1, 2, 2)
    logits = torch.tensor([0.0])  # vanilla G loss = softplus(0) = log 2
    total, adv, l1 = pix2pix_generator_loss(GANLoss("vanilla"), logits, fake_b, real_b)
    assert float(l1) == pytest.approx((0.5 + 0 + 1 + 0) / 4)
    assert float(adv) == pytest.approx(math.log(2))
    assert float(total) == pytest.approx(math.log(2) + 100 * 0.375)


def test_adam_defaults_are_the_papers():
    opt = make_adam([torch.nn.Parameter(torch.zeros(1))])
    assert opt.defaults["lr"] == 2e-4 and opt.defaults["betas"] == (0.5, 0.999)


# ---- SSIM ----------------------------------------------------------------------------------------------


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Direct evaluation of Wang et al.'s formula: an explicit normalised 11x11 Gaussian (sigma 1.5) at every
    valid window position (independent of OpenCV)."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = a.astype(np.float64), b.astype(np.float64)
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_known_values():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # Two flat images: only the luminance term remains, (2*100*150 + C1) / (100^2 + 150^2 + C1).
    c1 = (0.01 * 255) ** 2
    flat = ssim(np.full((20, 20), 100, np.uint8), np.full((20, 20), 150, np.uint8))
    assert flat == pytest.approx((30000 + c1) / (32500 + c1), abs=1e-9)
    assert flat == pytest.approx(0.923092, abs=1e-6)  # 30006.5025 / 32506.5025
    # A shifted image keeps the structure term at 1: SSIM = mean luminance term, close to 1 for a small shift.
    b = rng.integers(0, 200, (24, 24), dtype=np.uint8)
    assert ssim(b, b + 40) < 1.0
    # Against the direct formula on random images.
    c = np.clip(b.astype(int) + rng.integers(-30, 31, b.shape), 0, 255).astype(np.uint8)
    assert ssim(b, c) == pytest.approx(_ssim_reference(b, c), abs=1e-9)
    # More noise, lower SSIM; an inverted image scores far lower.
    d = np.clip(b.astype(int) + rng.integers(-90, 91, b.shape), 0, 255).astype(np.uint8)
    assert ssim(b, d) < ssim(b, c) < 1.0
    assert ssim(b, 255 - b) < 0.0


# ---- diversity -----------------------------------------------------------------------------------------


def test_mean_pairwise_distance_known_value():
    # pairwise distances 5, 4, 3 -> mean 4
    assert mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])) == pytest.approx(4.0)
    assert mean_pairwise_distance(np.ones((5, 7))) == 0.0


def test_diversity_exposes_mode_collapse():
    from edgepix.runtime.data.synthetic import SceneConfig, make_scene

    real = np.stack([make_scene(i, SceneConfig(size=(32, 32)))[0] for i in range(24)])
    same = diversity(real[::-1].copy(), real)  # the same set in another order: ratio exactly 1
    assert all(r == pytest.approx(1.0) for r in same.ratio.values())
    collapsed = np.stack([real[0]] * 20 + [real[1]] * 4)  # almost all samples are one image
    d = diversity(collapsed, real)
    assert all(r < 0.6 for r in d.ratio.values())
    assert pixel_features(real[:2]).shape == (2, 16 * 16 * 3)


# ---- paired data ---------------------------------------------------------------------------------------


def test_mask_to_scene_pairs_and_mean_colour_baseline():
    src = open_pair_source("synthetic", "train", seed=3, synthetic_n=6, size=(64, 64))
    a, b, m = src.load(0)
    assert a.shape == b.shape == (64, 64, 3) and m.shape == (64, 64)
    palette = src.classes.palette
    # A is the mask painted with the palette, in BGR.
    c = int(m.max())
    assert tuple(a[m == c][0][::-1]) == tuple(palette[c])
    assert np.array_equal(colorize_mask(m, palette), a)
    colours = class_mean_colours(src, 6, len(palette))
    assert colours.shape == (6, 3) and np.all((colours >= 0) & (colours <= 255))
    painted = paint_mean_colours(m, colours)
    for c in np.unique(m):
        assert np.array_equal(painted[m == c][0], np.round(colours[c]).astype(np.uint8))


def test_paired_dataset_jitter_keeps_mask_colours(tmp_path):
    from edgepix.runtime.description.spec import ModelSpec

    src = open_pair_source("synthetic", "train", seed=1, synthetic_n=4, size=(64, 64))
    spec = ModelSpec(task="generation-image", model_name="pix2pix", input_size=(64, 64), mean=(0.5,) * 3,
                     std=(0.5,) * 3, output_range=(-1, 1), output_kind="image")
    ds = PairedDataset(src, spec, train=True, load_size=80, seed=0)
    a, b, m = ds.sample(1)
    assert a.shape == b.shape == (64, 64, 3)
    colours = {tuple(c) for c in src.classes.palette}  # RGB
    assert {tuple(int(v) for v in px[::-1]) for px in a.reshape(-1, 3)} <= colours  # nearest-neighbour only
    ta, tb, tm = ds[1]
    assert ta.shape == (3, 64, 64) and float(ta.min()) >= -1 and float(ta.max()) <= 1


def test_ab_folder_and_side_by_side_pairs(tmp_path):
    import cv2

    from edgepix.runtime.core.errors import DataError

    for sub in ("A", "B"):
        (tmp_path / "ab" / sub).mkdir(parents=True)
    for i in range(40):
        cv2.imwrite(str(tmp_path / "ab" / "A" / f"{i}.png"), np.full((8, 8, 3), i, np.uint8))
        cv2.imwrite(str(tmp_path / "ab" / "B" / f"{i}.png"), np.full((8, 8, 3), 100 + i, np.uint8))
    train = open_pair_source(tmp_path / "ab", "train")
    val = open_pair_source(tmp_path / "ab", "val")
    assert len(train) + len(val) == 40 and len(train) > len(val) > 0
    a, b, _ = train.load(0)
    assert int(b[0, 0, 0]) == int(a[0, 0, 0]) + 100
    swapped = open_pair_source(tmp_path / "ab", "train", direction="BtoA").load(0)
    assert int(swapped[0][0, 0, 0]) == int(b[0, 0, 0])
    (tmp_path / "ab" / "B" / "0.png").unlink()
    with pytest.raises(DataError, match="no partner"):
        open_pair_source(tmp_path / "ab", "train")
    (tmp_path / "sbs" / "train").mkdir(parents=True)
    ab = np.concatenate([np.full((8, 8, 3), 10, np.uint8), np.full((8, 8, 3), 200, np.uint8)], axis=1)
    cv2.imwrite(str(tmp_path / "sbs" / "train" / "x.png"), ab)
    a, b, _ = open_pair_source(tmp_path / "sbs", "train").load(0)
    assert a.shape == b.shape == (8, 8, 3) and int(a[0, 0, 0]) == 10 and int(b[0, 0, 0]) == 200
