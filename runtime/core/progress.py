"""Progress bars that degrade gracefully: tqdm when installed, a plain counter on stderr otherwise."""

from __future__ import annotations

import sys
import time


class _PlainProgress:
    """Prints `desc: done/total` about once a second; enough for logs on devices without tqdm."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self._last = 0.0

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self._last >= 1.0 or (self.total is not None and self.n >= self.total):
            self._last = now
            total = f"/{self.total}" if self.total is not None else ""
            print(f"{self.desc}: {self.n}{total} {self.unit}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(_PlainProgress):
    def update(self, k: int = 1) -> None:
        self.n += k


def progress_bar(total: int | None, *, desc: str, unit: str = "it", quiet: bool = False):
    if quiet:
        return _Silent(total, desc, unit)
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
