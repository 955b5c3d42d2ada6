"""The stream benchmark's baseline loop pre-processes and colours exactly as the runtime does, with the fastest
single OpenCV calls (blobFromImage, cv2.LUT), so the pipeline's ratio over it measures nothing but scheduling."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgepix.benchmarks.stream_bound import _blob_params
from edgepix.runtime.data.synthetic import CLASS_NAMES, PALETTE
from edgepix.runtime.description.spec import ModelSpec
from edgepix.runtime.tasks.imageops import Normalizer


@pytest.mark.parametrize("with_params", [True, False])
def test_blob_from_image_equals_the_runtime_normalizer(monkeypatch, with_params):
    spec = ModelSpec(task="segmentation", model_name="m", input_size=(96, 128), class_names=CLASS_NAMES,
                     palette=PALETTE)
    if not with_params:  # OpenCV < 4.8: blobFromImage, then the per-channel scale in numpy
        monkeypatch.delattr(cv2.dnn, "blobFromImageWithParams", raising=False)
    frame = (np.random.default_rng(3).random((120, 160, 3)) * 255).astype(np.uint8)
    mean_px = tuple(m / spec.scale for m in spec.mean)
    scale = tuple(spec.scale / s for s in spec.std)
    blob = _blob_params(scale, mean_px, (128, 96), True)(frame)
    expected = Normalizer(spec, spec.input_size)([frame])[0]
    assert blob.shape == expected.shape == (1, 3, 96, 128) and blob.dtype == np.float32
    np.testing.assert_allclose(blob, expected, atol=1e-5)


def test_lut_colouring_equals_palette_indexing():
    palette = np.array([c[::-1] for c in PALETTE], np.uint8)
    mask = np.random.default_rng(0).integers(0, len(PALETTE), (37, 53)).astype(np.uint8)
    lut = np.zeros((256, 1, 3), np.uint8)
    lut[: len(palette), 0] = palette
    np.testing.assert_array_equal(cv2.LUT(cv2.merge((mask, mask, mask)), lut), palette[mask])
