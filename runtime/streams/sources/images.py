"""Still-image sources: one image, a folder or a glob, in natural order."""

from __future__ import annotations

import glob as globlib
import logging
import os
import re

import cv2
import numpy as np

from ...core.errors import SourceError
from ...core.formats import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from .capture import CaptureReader
from .reader import Reader
from .uri import SourceKind, SourceSpec, has_glob

log = logging.getLogger(__name__)


#: URIs of this kind and what the code does with them (shown by the `--source` help and docs/streams.md)
URI_HELP = (
    ("`img.jpg`, `folder/`, `'frames/*.png'`",
     'one image, a folder or a glob, natural order (`2` before `10`); videos in the list are played; '
     'undecodable files are skipped with a warning'),
)


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path)]


class ImageListReader(Reader):
    """One image, a folder or a glob: images are one frame each, videos in the list are read to their end."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.live = spec.options.realtime
        self.paths: list[str] = []
        self._i = 0
        self._video: CaptureReader | None = None
        self.nominal_fps = None
        self.skipped = 0
        self.skipped_names: list[str] = []

    def open(self) -> None:
        target = self.spec.target
        if os.path.isdir(target):
            names = [os.path.join(target, n) for n in os.listdir(target)]
        elif has_glob(target):
            names = globlib.glob(target, recursive=True)
        else:
            names = [target]
        suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
        self.paths = sorted((p for p in names if os.path.isfile(p) and p.lower().endswith(suffixes)), key=_natural_key)
        if not self.paths:
            raise SourceError(f"source {self.spec.uri!r}: no images or videos found (looked for "
                              f"{', '.join(IMAGE_SUFFIXES)} and video files)")
        self._i = 0

    def read(self) -> tuple[np.ndarray, float | None] | None:
        while True:
            if self._video is not None:
                got = self._video.read()
                if got is not None:
                    return got
                self.truncated = self._video.truncated or self.truncated
                self._video.close()
                self._video = None
            if self._i >= len(self.paths):
                self.ended_cleanly = True
                return None
            path = self.paths[self._i]
            self._i += 1
            if path.lower().endswith(VIDEO_SUFFIXES):
                video = CaptureReader(SourceSpec(path, SourceKind.VIDEO, path, self.spec.options))
                try:
                    video.open()
                except SourceError as e:
                    self._skip(path)
                    log.warning("skipping %s: %s", path, e)
                    continue
                self._video = video
                continue
            # IMREAD_COLOR: grayscale, BGRA and 16-bit images arrive as 8-bit BGR, EXIF orientation applied.
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if image is None:
                self._skip(path)
                log.warning("skipping %s: not an image OpenCV can decode", path)
                continue
            return image, None

    def _skip(self, path: str) -> None:
        self.skipped += 1
        if len(self.skipped_names) < 3:
            self.skipped_names.append(os.path.basename(path))

    def nothing_read(self) -> str:
        if self.skipped:
            more = ", ..." if self.skipped > len(self.skipped_names) else ""
            return (f"none of the {len(self.paths)} file(s) could be decoded ({', '.join(self.skipped_names)}{more}); "
                    f"expected images ({', '.join(IMAGE_SUFFIXES)}) or videos OpenCV/FFmpeg can read")
        return "no frame could be read"

    def rewind(self) -> bool:
        self.close()
        self._i = 0
        self.ended_cleanly = False
        return True

    def close(self) -> None:
        if self._video is not None:
            self._video.close()
            self._video = None

