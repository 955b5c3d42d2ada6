"""Image-folder sinks: one image file per frame (a folder, or a printf-style pattern)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ...core.errors import SinkError
from ...core.fileio import check_writable_folder, remove_stale_partials_under, write_image
from ...core.formats import IMAGE_WRITE_SUFFIXES
from .base import Output, Sink, SinkContext

log = logging.getLogger(__name__)


#: URIs of this sink and what it does (shown by the `--sink` help and docs/streams.md)
URI_HELP = (
    ('`out/`, `out/f_%05d.png`',
     'one image per frame, named by frame index (JPEG unless the pattern says otherwise)'),
)


# ---- image folders ------------------------------------------------------------------------------------------


class ImageFolderSink(Sink):
    """`dir/` -> dir/000000.jpg ...; `dir/name_%05d.png` -> a printf pattern of the frame index."""

    def __init__(self, uri: str, target: str, streams: frozenset[int] | None = None) -> None:
        super().__init__(uri, streams)
        if "%" in target:
            self.folder, self.pattern = Path(os.path.dirname(target) or "."), os.path.basename(target)
            try:
                self.pattern % 0
            except (TypeError, ValueError):
                raise SinkError(f"{uri}: expected a pattern with one integer field such as frame_%05d.png") from None
            if not self.pattern.lower().endswith(IMAGE_WRITE_SUFFIXES):
                raise SinkError(f"{uri}: the pattern must end in an image type ({', '.join(IMAGE_WRITE_SUFFIXES)})")
        else:
            self.folder, self.pattern = Path(target), "%06d.jpg"

    def preflight(self) -> None:
        check_writable_folder(self.folder, "image folder", SinkError)
        remove_stale_partials_under(self.folder)  # once: each frame's write does not scan the folder

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        self.preflight()

    def write(self, out: Output) -> None:
        folder = self.folder / str(out.stream_id) if self.multi() else self.folder
        if self.multi():
            folder.mkdir(exist_ok=True)
        write_image(folder / (self.pattern % out.index), out.image)  # complete or absent, never truncated
        self.frames_written += 1

