"""Evaluating generators: `edgepix val gen`.

pix2pix, on validation pairs (A -> B):
- L1 (mean absolute difference of uint8 images / 255), PSNR (dB, uint8 range) and SSIM (Wang et al. 2004: Gaussian
  window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, on each colour channel, averaged over the valid window positions);
- the segmentation-consistency score of the pix2pix paper (its "FCN score"): a segmentation model runs on the
  generated images and its predictions are scored (mIoU, pixel accuracy) against the masks the images were generated
  from. The same segmenter on the real images gives the ceiling;
- the baseline of painting each class in its mean colour (per-class mean BGR over the training pairs) when A is a
  mask, scored the same way: a generator must beat it on the perceptual and consistency scores to be worth running.

DCGAN: sample diversity, the mean pairwise distance between images, for generated samples and for real images of
the training distribution, in two fixed feature spaces: downsampled pixels (16x16 colour, [0, 1]) and random
convolution features (a fixed, seeded 2-layer random ReLU conv net, pooled to 4x4). A collapsed generator has a
ratio (samples / real) far below 1; a healthy generator stays within 0.7-1.3.

Everything is numpy/OpenCV except running the models (torch), so the metrics can be reused on the device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgepix.runtime.core.errors import DataError, ModelFormatError
from edgepix.runtime.data.metrics import ConfusionMatrix, psnr

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ---- SSIM ----------------------------------------------------------------------------------------------


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 255.0) -> float:
    """Mean SSIM of two images (HxW or HxWxC; colour: the mean over channels).

    Gaussian-weighted local statistics (11x11 window, sigma 1.5, population variances), evaluated at every window
    position that lies fully inside the image (as MATLAB's `ssim` from Wang et al. does), then averaged.
    """
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {a.shape} and {b.shape}")
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[1]}x{a.shape[0]}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    r = SSIM_WINDOW // 2
    values = []
    for ch in range(x.shape[2]):
        xc, yc = np.ascontiguousarray(x[..., ch]), np.ascontiguousarray(y[..., ch])

        def blur(img: np.ndarray) -> np.ndarray:
            return cv2.GaussianBlur(img, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)[
                r:-r, r:-r]

        mx, my = blur(xc), blur(yc)
        sxx = blur(xc * xc) - mx * mx
        syy = blur(yc * yc) - my * my
        sxy = blur(xc * yc) - mx * my
        num = (2 * mx * my + c1) * (2 * sxy + c2)
        den = (mx * mx + my * my + c1) * (sxx + syy + c2)
        values.append(float(np.mean(num / den)))
    return float(np.mean(values))


# ---- diversity -----------------------------------------------------------------------------------------


def pixel_features(images: np.ndarray, size: int = 16) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size*size*3) float64 in [0, 1]: area-downsampled colour pixels."""
    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64).ravel() / 255.0
                     for im in images])


class RandomConvFeatures:
    """A fixed random 2-layer conv net (3x3 conv, ReLU, 2x2 average pool, twice), pooled to a 4x4 grid.

    The weights come from a fixed seed, so the feature space is the same in every run; images are resized to 64x64
    first. Random convolutional features respond to local structure (edges, texture, colour), which downsampled
    pixels smooth away.
    """

    def __init__(self, *, widths: tuple[int, int] = (16, 32), seed: int = 0, size: int = 64) -> None:
        rng = np.random.default_rng(seed)
        self.size = size
        self.w1 = rng.standard_normal((widths[0], 3, 3, 3)) / math.sqrt(27)
        self.b1 = rng.standard_normal(widths[0]) * 0.1
        self.w2 = rng.standard_normal((widths[1], widths[0], 3, 3)) / math.sqrt(9 * widths[0])
        self.b2 = rng.standard_normal(widths[1]) * 0.1

    @staticmethod
    def _conv_relu_pool(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        # x: (C, H, W) float32 -> (K, H/2, W/2)
        out = []
        for k in range(w.shape[0]):
            acc = np.full(x.shape[1:], b[k], np.float32)
            for c in range(x.shape[0]):
                acc += cv2.filter2D(x[c], -1, w[k, c].astype(np.float32), borderType=cv2.BORDER_REFLECT)
            np.maximum(acc, 0, out=acc)
            out.append(cv2.resize(acc, (acc.shape[1] // 2, acc.shape[0] // 2), interpolation=cv2.INTER_AREA))
        return np.stack(out)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        feats = []
        for im in images:
            x = cv2.resize(im, (self.size, self.size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
            x = (x - 0.5).transpose(2, 0, 1)
            h = self._conv_relu_pool(x, self.w1, self.b1)
            h = self._conv_relu_pool(h, self.w2, self.b2)
            pooled = np.stack([cv2.resize(c, (4, 4), interpolation=cv2.INTER_AREA) for c in h])
            feats.append(pooled.astype(np.float64).ravel())
        return np.stack(feats)


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs i < j of the rows of `features`."""
    n = len(features)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images, got {n}")
    sq = np.sum(features**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * features @ features.T, 0.0)
    iu = np.triu_indices(n, k=1)
    return float(np.mean(np.sqrt(d2[iu])))


@dataclass
class Diversity:
    samples: dict[str, float]  # feature space -> mean pairwise distance of generated samples
    real: dict[str, float]  # the same for real images

    @property
    def ratio(self) -> dict[str, float]:
        return {k: self.samples[k] / self.real[k] for k in self.samples}


def diversity(samples: np.ndarray, real: np.ndarray) -> Diversity:
    """Mean pairwise distances of `samples` and `real` (both (N, H, W, 3) uint8) in both feature spaces."""
    conv = RandomConvFeatures()
    spaces = {"pixels16": pixel_features, "randconv": conv}
    return Diversity({k: mean_pairwise_distance(f(samples)) for k, f in spaces.items()},
                     {k: mean_pairwise_distance(f(real)) for k, f in spaces.items()})


# ---- pix2pix scores ------------------------------------------------------------------------------------


@dataclass
class ImageScores:
    l1: float  # mean |a - b| / 255
    psnr: float  # mean over images, dB
    ssim: float  # mean over images
    seg_miou: float = float("nan")
    seg_pixel_accuracy: float = float("nan")
    seg_iou: tuple[float, ...] = ()


class ScoreAccumulator:
    def __init__(self, num_classes: int | None = None, ignore_index: int | None = 255) -> None:
        self.l1, self.psnr, self.ssim, self.n = 0.0, 0.0, 0.0, 0
        self.cm = ConfusionMatrix(num_classes, ignore_index) if num_classes else None

    def add(self, generated: np.ndarray, target: np.ndarray) -> None:
        self.l1 += float(np.mean(np.abs(generated.astype(np.float64) - target.astype(np.float64)))) / 255.0
        self.psnr += psnr(generated, target)
        self.ssim += ssim(generated, target)
        self.n += 1

    def add_segmentation(self, prediction: np.ndarray, mask: np.ndarray) -> None:
        self.cm.update(prediction, mask)

    def result(self) -> ImageScores:
        n = max(self.n, 1)
        scores = ImageScores(self.l1 / n, self.psnr / n, self.ssim / n)
        if self.cm is not None and self.cm.matrix.sum():
            scores.seg_miou = self.cm.miou()
            scores.seg_pixel_accuracy = self.cm.pixel_accuracy()
            scores.seg_iou = tuple(float(v) for v in self.cm.iou())
        return scores


class TorchSegmenter:
    """An edgepix segmentation checkpoint run in PyTorch: BGR uint8 images -> class maps at the images' size."""

    def __init__(self, checkpoint: str | Path, *, device: str = "cpu") -> None:
        import torch

        from .checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(checkpoint)
        if ckpt["spec"].task.value != "segmentation":
            raise ModelFormatError(f"--seg {checkpoint}: a {ckpt['spec'].task.value} checkpoint; the consistency "
                                   "score needs a segmentation model")
        self.spec = ckpt["spec"]
        self.device = torch.device(device)
        self.model = model_from_checkpoint(ckpt).to(self.device).eval()

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        from .transforms import preprocess

        x = torch.from_numpy(np.stack([preprocess(im, self.spec) for im in images])).to(self.device)
        with torch.no_grad():
            pred = self.model(x).argmax(1).to(torch.uint8).cpu().numpy()
        return [cv2.resize(p, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_NEAREST) if p.shape != im.shape[:2]
                else p for p, im in zip(pred, images)]


def class_mean_colours(source, n: int, num_classes: int) -> np.ndarray:
    """Per-class mean BGR colour (num_classes x 3, float64) over the first `n` pairs of a mask -> image source."""
    sums = np.zeros((num_classes, 3))
    counts = np.zeros(num_classes)
    for i in range(min(n, len(source))):
        _, image, mask = source.load(i)
        if mask.shape != image.shape[:2]:
            mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        for c in range(num_classes):
            sel = mask == c
            k = int(sel.sum())
            if k:
                sums[c] += image[sel].astype(np.float64).sum(axis=0)
                counts[c] += k
    return sums / np.maximum(counts, 1)[:, None]


def paint_mean_colours(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    table[: len(colours)] = np.clip(np.round(colours), 0, 255).astype(np.uint8)
    return table[mask]


@dataclass
class Pix2PixReport:
    checkpoint: str
    data: str
    pairs: int
    generator: ImageScores
    baseline: ImageScores | None = None  # mean colour per class
    real: ImageScores | None = None  # the segmenter on the real images (consistency ceiling)
    class_names: tuple[str, ...] = ()
    seconds: float = 0.0

    def format(self) -> str:
        def row(name: str, s: ImageScores | None) -> str:
            if s is None:
                return ""
            seg = (f"{s.seg_miou:>10.4f}{s.seg_pixel_accuracy:>10.4f}" if not math.isnan(s.seg_miou)
                   else f"{'-':>10}{'-':>10}")
            l1 = f"{s.l1:>10.4f}{s.psnr:>10.2f}{s.ssim:>10.4f}" if not math.isnan(s.psnr) else f"{'-':>10}" * 3
            return f"{name:<28}{l1}{seg}\n"

        head = f"{'':<28}{'L1':>10}{'PSNR dB':>10}{'SSIM':>10}{'seg mIoU':>10}{'seg acc':>10}\n"
        text = (f"{self.checkpoint} on {self.data}: {self.pairs} validation pairs ({self.seconds:.1f} s)\n" + head
                + row("generator", self.generator) + row("baseline: class mean colour", self.baseline)
                + row("real images (ceiling)", self.real))
        if self.generator.seg_iou:
            text += "segmentation consistency per class (IoU of the segmenter on generated images):\n"
            text += "  " + "  ".join(f"{n} {v:.3f}" for n, v in zip(self.class_names, self.generator.seg_iou))
        return text.rstrip("\n")

    def as_dict(self) -> dict[str, Any]:
        def d(s: ImageScores | None):
            return None if s is None else {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                           for k, v in s.__dict__.items()}

        return {"checkpoint": self.checkpoint, "data": self.data, "pairs": self.pairs, "generator": d(self.generator),
                "baseline": d(self.baseline), "real": d(self.real), "class_names": list(self.class_names)}


def evaluate_pix2pix(checkpoint: str | Path, data: str, *, seg: str | Path | None = None, n: int = 200,
                     batch: int = 8, device: str = "cpu", use_ema: bool = True, train_mode: bool = False,
                     baseline_n: int = 200, quiet: bool = False, scenes: str | None = None) -> Pix2PixReport:
    """Score a pix2pix checkpoint on `n` validation pairs of `data` (see the module docstring)."""
    import torch

    from edgepix.runtime.core.progress import progress_bar

    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .gan_data import PairedDataset, open_pair_source
    from .gan_trainer import to_uint8_bgr
    from .transforms import normalize

    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    spec = ckpt["spec"]
    if spec.task.value != "generation-image":
        raise ModelFormatError(f"{checkpoint}: a {spec.task.value} checkpoint; this evaluates image -> image models")
    cfg = ckpt.get("train_config", {})
    size = spec.input_size
    scenes = scenes or cfg.get("scenes", "varied")  # checkpoints from before lit scenes trained on varied ones
    val = open_pair_source(data, "val", seed=int(cfg.get("seed", 0)), synthetic_val_n=n, size=size,
                           direction=cfg.get("direction", "AtoB"), appearance=scenes)
    model = model_from_checkpoint(ckpt, use_ema=use_ema).to(device)
    model.train(train_mode)
    if train_mode:  # batch statistics, dropout off: the `--train-mode` export
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    segmenter = TorchSegmenter(seg, device=device) if seg else None
    labelled = val.a_is_label and val.classes is not None
    if segmenter is not None and not labelled:
        raise DataError(f"--seg needs mask -> image pairs (synthetic or a segmentation dataset); {data} has A/B images")
    if segmenter is not None and segmenter.spec.class_names != val.classes.names:
        raise DataError(f"--seg {seg}: the segmenter's classes {list(segmenter.spec.class_names)} differ from the "
                        f"data's {list(val.classes.names)}")
    k = val.classes.num_classes if labelled else None
    ignore = val.classes.ignore_index if labelled else None
    acc_gen, acc_base, acc_real = ScoreAccumulator(k, ignore), ScoreAccumulator(k, ignore), ScoreAccumulator(k, ignore)
    colours = None
    if labelled:
        train = open_pair_source(data, "train", seed=int(cfg.get("seed", 0)), synthetic_n=baseline_n, size=size,
                                 direction=cfg.get("direction", "AtoB"), appearance=scenes)
        colours = class_mean_colours(train, baseline_n, k)
    ds = PairedDataset(val, spec, train=False)
    total = min(n, len(ds))
    with progress_bar(total, desc="val gen", unit="pair", quiet=quiet) as bar:
        for start in range(0, total, batch):
            idx = range(start, min(total, start + batch))
            samples = [ds.sample(i) for i in idx]
            x = torch.stack([torch.from_numpy(normalize(s[0], spec)) for s in samples]).to(device)
            with torch.no_grad():
                generated = list(to_uint8_bgr(model(x)))
            targets = [s[1] for s in samples]
            masks = [s[2] for s in samples]
            for g, t in zip(generated, targets):
                acc_gen.add(g, t)
            if colours is not None:
                painted = [paint_mean_colours(m, colours) for m in masks]
                for p, t in zip(painted, targets):
                    acc_base.add(p, t)
            if segmenter is not None:
                for pred, m in zip(segmenter(generated), masks):
                    acc_gen.add_segmentation(pred, m)
                for pred, m in zip(segmenter(painted), masks):
                    acc_base.add_segmentation(pred, m)
                for pred, m in zip(segmenter(targets), masks):
                    acc_real.add_segmentation(pred, m)
            bar.update(len(idx))
    real = None
    if segmenter is not None:
        real = acc_real.result()
        real.l1 = real.psnr = real.ssim = float("nan")
    described = f"{data} ({scenes} scenes)" if str(data) == "synthetic" else str(data)
    return Pix2PixReport(str(checkpoint), described, total, acc_gen.result(),
                         acc_base.result() if colours is not None else None, real,
                         val.classes.names if labelled else (), time.perf_counter() - t0)


@dataclass
class DCGANReport:
    checkpoint: str
    data: str
    n: int
    diversity: Diversity
    seconds: float = 0.0
    band: tuple[float, float] = (0.7, 1.3)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        lo, hi = self.band
        return all(lo <= r <= hi for r in self.diversity.ratio.values())

    def format(self) -> str:
        lines = [f"{self.checkpoint}: {self.n} samples vs {self.n} real images of {self.data} ({self.seconds:.1f} s)",
                 f"{'feature space':<16}{'samples':>10}{'real':>10}{'ratio':>8}"]
        for k in self.diversity.samples:
            lines.append(f"{k:<16}{self.diversity.samples[k]:>10.4f}{self.diversity.real[k]:>10.4f}"
                         f"{self.diversity.ratio[k]:>8.3f}")
        lo, hi = self.band
        verdict = "diverse" if self.passed else "NOT within the band: possible mode collapse" if min(
            self.diversity.ratio.values()) < lo else "NOT within the band"
        lines.append(f"diversity ratio band {lo:g}-{hi:g}: {verdict}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "data": self.data, "n": self.n, "samples": self.diversity.samples,
                "real": self.diversity.real, "ratio": self.diversity.ratio, "passed": self.passed}


def sample_generator(model, n: int, latent_size: int, *, seed: int, batch: int = 64, device: str = "cpu") -> np.ndarray:
    """`n` BGR uint8 samples of a noise generator (torch), latents from a seeded generator."""
    import torch

    from .gan_trainer import to_uint8_bgr

    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for s in range(0, n, batch):
            z = torch.randn(min(batch, n - s), latent_size, generator=g).to(device)
            out.append(to_uint8_bgr(model(z)))
    return np.concatenate(out)


def real_images(data: str, n: int, size: int, *, seed: int, scenes: str = "varied") -> np.ndarray:
    """`n` real images at the model's size, as the trainer feeds them (held-out synthetic scenes for 'synthetic')."""
    from .gan_data import open_image_source, resize_center_crop

    split = "val"
    source = open_image_source(data, split, seed=seed, synthetic_val_n=n, size=(size, size), appearance=scenes)
    if len(source) < 2:
        source = open_image_source(data, "train", seed=seed, synthetic_n=n, size=(size, size), appearance=scenes)
    k = min(n, len(source))
    return np.stack([resize_center_crop(source.load(i), (size, size)) for i in range(k)])


def evaluate_dcgan(checkpoint: str | Path, data: str, *, n: int = 500, seed: int = 0, device: str = "cpu",
                   use_ema: bool = True, scenes: str | None = None) -> DCGANReport:
    from .checkpoint import load_checkpoint, model_from_checkpoint

    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    spec = ckpt["spec"]
    if spec.task.value != "generation-noise":
        raise ModelFormatError(f"{checkpoint}: a {spec.task.value} checkpoint; diversity applies to noise generators")
    model = model_from_checkpoint(ckpt, use_ema=use_ema).to(device).eval()
    cfg = ckpt.get("train_config", {})
    real = real_images(data, n, spec.input_size[0], seed=int(cfg.get("seed", 0)),
                       scenes=scenes or cfg.get("scenes", "varied"))
    samples = sample_generator(model, len(real), spec.latent_size, seed=seed, device=device)
    return DCGANReport(str(checkpoint), str(data), len(real), diversity(samples, real), time.perf_counter() - t0)
