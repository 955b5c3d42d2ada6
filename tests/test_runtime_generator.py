"""Generators on tiny ONNX generator graphs built here with torch: outputs equal PyTorch's mapped to uint8,
seeding and batching, static batches, uint8 graphs, image -> image with letterbox, grids, foreign generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_runtime_models import ChannelLogits, export
from torch import nn

from edgepix.runtime import ImageGenerator, NoiseGenerator, Segmenter, tile_grid
from edgepix.runtime.core.errors import InputError, ModelFormatError
from edgepix.runtime.description.foreign import ForeignModelWarning
from edgepix.runtime.description.spec import ModelSpec

LATENT = 16


class TinyDCGAN(nn.Module):
    """z (N, L) or (N, L, 1, 1) -> tanh image (N, 3, 8, 12)."""

    def __init__(self, *, conv_input: bool = False, uint8: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_input, self.uint8 = conv_input, uint8
        self.fc = nn.Linear(LATENT, 32 * 2 * 3)
        self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(),
                                nn.ConvTranspose2d(16, 3, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.conv_input:
            z = z.flatten(1)
        y = self.up(self.fc(z).view(-1, 32, 2, 3) * 3)
        if self.uint8:  # what edgepix export --uint8-output appends
            y = torch.round((y + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        return y


def noise_spec(**overrides) -> ModelSpec:
    fields = dict(task="generation-noise", model_name="dcgan", input_size=(8, 12), latent_size=LATENT,
                  output_range=(-1.0, 1.0), output_kind="image", input_name="z", output_name="image",
                  mean=(0, 0, 0), std=(1, 1, 1))
    fields.update(overrides)
    return ModelSpec(**fields)


def to_uint8_bgr(y: torch.Tensor) -> np.ndarray:
    """The reference mapping: [-1, 1] -> round((y + 1) * 127.5), RGB -> BGR, NCHW -> NHWC."""
    img = np.clip(np.round((y.numpy().astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    return img.transpose(0, 2, 3, 1)[..., ::-1]


@pytest.fixture(scope="module")
def gens(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    z = torch.zeros(2, LATENT)
    return {
        "flat": export(TinyDCGAN(), tmp / "flat.onnx", z, spec=noise_spec(), input_name="z", output_name="image",
                       dynamic_batch=True),
        "conv": export(TinyDCGAN(conv_input=True), tmp / "conv.onnx", torch.zeros(2, LATENT, 1, 1),
                       spec=noise_spec(), input_name="z", output_name="image", dynamic_batch=True),
        "static4": export(TinyDCGAN(), tmp / "static4.onnx", torch.zeros(4, LATENT), spec=noise_spec(),
                          input_name="z", output_name="image"),
        "uint8": export(TinyDCGAN(uint8=True), tmp / "uint8.onnx", z, spec=noise_spec(output_kind="image_uint8"),
                        input_name="z", output_name="image", dynamic_batch=True),
        "foreign": export(TinyDCGAN(), tmp / "foreign.onnx", z, input_name="z", output_name="image",
                          dynamic_batch=True),
    }


def test_noise_generator_matches_pytorch(gens):
    with NoiseGenerator.load(gens["flat"]) as gen:
        assert gen.latent_size == LATENT
        images = list(gen.generate(10, batch_size=4, seed=3))
        z = gen.latents(10, seed=3)
    assert len(images) == 10 and all(im.shape == (8, 12, 3) and im.dtype == np.uint8 for im in images)
    with torch.no_grad():
        ref = to_uint8_bgr(TinyDCGAN()(torch.from_numpy(z)))
    diff = np.abs(np.stack(images).astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert len({im.tobytes() for im in images}) == 10


def test_images_depend_only_on_seed_and_index(gens):
    with NoiseGenerator.load(gens["flat"]) as gen:
        a = list(gen.generate(9, batch_size=4, seed=1))
        b = list(gen.generate(9, batch_size=3, seed=1))
        tail = list(gen.generate(4, batch_size=2, seed=1, start=5))
        other = list(gen.generate(9, batch_size=4, seed=2))
        assert gen.last_ms["batch"] == 1 and gen.last_ms["infer"] > 0  # 9 = 4 + 4 + 1
    for x, y in zip(a, b):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # batch sizes may round a float differently
    for x, y in zip(a[5:], tail):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    assert all(not np.array_equal(x, y) for x, y in zip(a, other))


def test_latent_input_of_rank_4_and_static_batch(gens):
    with NoiseGenerator.load(gens["flat"]) as flat, NoiseGenerator.load(gens["conv"]) as conv, \
            NoiseGenerator.load(gens["static4"]) as static:
        ref = list(flat.generate(6, batch_size=6, seed=0))
        for gen in (conv, static):
            got = list(gen.generate(6, batch_size=5, seed=0))  # static: chunks of 4, the last padded
            assert len(got) == 6
            assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(ref, got)) <= 1
        assert static.static_batch == 4
        with pytest.raises(InputError, match=r"latents: expected float32 \(n, 16\), got float64 \(2, 16\)"):
            flat.generate_from(np.zeros((2, LATENT)))


def test_uint8_graph_output_passes_through(gens):
    with NoiseGenerator.load(gens["flat"]) as f, NoiseGenerator.load(gens["uint8"]) as u:
        a = list(f.generate(5, seed=4))
        b = list(u.generate(5, seed=4))
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b)) <= 1


def test_foreign_noise_generator_assumes_tanh_range_and_warns(gens):
    with pytest.warns(ForeignModelWarning, match=r"generation-noise.*output range \[-1.0, 1.0\]"):
        gen = NoiseGenerator.load(gens["foreign"])
    with NoiseGenerator.load(gens["flat"]) as ref:
        assert np.array_equal(next(gen.generate(1)), next(ref.generate(1)))
    gen.close()


def test_wrong_task_says_which_class_to_use(gens):
    with pytest.raises(ModelFormatError, match="generation-noise model; load it with NoiseGenerator, not Segmenter"):
        Segmenter.load(gens["flat"])
    with pytest.raises(ModelFormatError, match="load it with NoiseGenerator, not ImageGenerator"):
        ImageGenerator.load(gens["flat"])


# ---- image -> image -------------------------------------------------------------------------------------------


# A 1x1 convolution that copies its input (test_runtime_models' ChannelLogits): with mean 0.5, std 0.5 and range
# [-1, 1] the generated image is the (resized) input image.
Identity = ChannelLogits


def image_spec(**overrides) -> ModelSpec:
    fields = dict(task="generation-image", model_name="pix2pix", input_size=(32, 32), output_kind="image",
                  output_range=(-1.0, 1.0), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    fields.update(overrides)
    return ModelSpec(**fields)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_image_generator_applies_the_spec_both_ways(tmp_path, resize):
    import cv2

    path = export(Identity(), tmp_path / "id.onnx", torch.zeros(1, 3, 32, 32), spec=image_spec(resize=resize),
                  dynamic_batch=True)
    rng = np.random.default_rng(0)
    frame = cv2.resize(rng.integers(0, 256, (4, 8, 3), dtype=np.uint8), (64, 32), interpolation=cv2.INTER_NEAREST)
    with ImageGenerator.load(path) as gen:
        out = gen.generate(frame)
        full = gen.generate(frame, to_frame_size=True)
        batch = gen.generate_batch([frame, frame[:, :32]])
    if resize == "stretch":
        expected = cv2.resize(frame, (32, 32), interpolation=cv2.INTER_LINEAR)
    else:  # 32x64 fits 32x32 as 16x32, centred: the border is cropped away again
        expected = cv2.resize(frame, (32, 16), interpolation=cv2.INTER_LINEAR)
    assert out.shape == expected.shape and np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    assert full.shape == frame.shape and np.abs(batch[0].astype(int) - out.astype(int)).max() == 0
    assert batch[1].shape == (32, 32, 3)


def test_tile_grid_places_images_row_by_row():
    images = [np.full((4, 6, 3), i * 40, np.uint8) for i in range(5)]
    grid = tile_grid(images, cols=3, pad=2, pad_value=255)
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    assert (grid[2:6, 2:8] == 0).all() and (grid[2:6, 10:16] == 40).all() and (grid[8:12, 10:16] == 160).all()
    assert (grid[8:12, 18:24] == 255).all() and (grid[0:2] == 255).all()  # the empty sixth cell and the padding
    assert tile_grid(images).shape == (14, 26, 3)  # cols = ceil(sqrt(5)) = 3
    with pytest.raises(InputError, match=r"image 1 is uint8 \(5, 6, 3\), expected uint8 \(4, 6, 3\)"):
        tile_grid([images[0], np.zeros((5, 6, 3), np.uint8)])
