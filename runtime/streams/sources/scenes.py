"""synthetic:// sources: moving synthetic scenes (the project's scene generator), paced or as fast as read."""

from __future__ import annotations

import logging

import cv2
import numpy as np

from .reader import Reader
from .uri import SourceSpec, int_param, synthetic_fps, synthetic_size, synthetic_speed

log = logging.getLogger(__name__)


#: URIs of this kind and what the code does with them (shown by the `--source` help and docs/streams.md)
URI_HELP = (
    ('`synthetic://?size=640x480&fps=30&seed=0&frames=N`',
     'moving synthetic scenes (the default source); `fps=0` is unpaced, frame by frame'),
)


class SyntheticReader(Reader):
    """Moving synthetic scenes (runtime.data.synthetic.MovingScene); paced at `fps` by the Source when fps > 0."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.fps = synthetic_fps(spec)
        self.live = self.fps > 0
        self.nominal_fps = self.fps if self.fps > 0 else 30.0
        self.size = synthetic_size(spec)
        self.seed = int_param(spec, "seed", 0, low=0, high=2**63 - 1)
        self.limit = int_param(spec, "frames", None, low=1)
        self.speed = synthetic_speed(spec)
        self.shading = dict(spec.params).get("shading", "0") not in ("0", "", "false", "no")
        self.scene = None
        self.count = 0

    def open(self) -> None:
        from ...data.synthetic import MovingScene, SceneConfig

        w, h = self.size
        # Per-frame Gaussian noise and blur cost ~35 ms at 640x480, more than the model; a camera-like grain from
        # a few precomputed noise fields costs well under a millisecond.
        config = SceneConfig(size=(h, w), blur_probability=0.0, max_noise_sigma=0.0)
        self.scene = MovingScene(seed=self.seed or 0, config=config, max_speed=self.speed)
        if not self.shading:
            # Flat-coloured objects are drawn by fillPoly alone; shading needs full-frame coordinate grids per
            # frame (~8 MB of temporaries and ~10 ms at 640x480). `?shading=1` keeps it.
            for obj in self.scene.objects:
                obj.shade = (obj.shade[0], 0.0)
        rng = np.random.default_rng(self.seed)
        # uint8 grain drawn directly (no float temporaries: a long-running process keeps a low peak)
        self._grain = [(rng.integers(0, 7, size=(h, w, 3), dtype=np.uint8),
                        rng.integers(0, 7, size=(h, w, 3), dtype=np.uint8)) for _ in range(4)]
        self.count = 0

    def read(self) -> tuple[np.ndarray, float | None] | None:
        if self.limit is not None and self.count >= self.limit:
            self.ended_cleanly = True
            return None
        image, _ = self.scene.next()
        up, down = self._grain[self.count % len(self._grain)]
        self.count += 1
        cv2.add(image, up, dst=image)
        cv2.subtract(image, down, dst=image)
        return image, None

    def rewind(self) -> bool:
        self.open()
        self.ended_cleanly = False
        return True

