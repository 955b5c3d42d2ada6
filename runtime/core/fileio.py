"""The one file writer: an artifact is either complete at its path or absent, never half-written, even after a
power cut.

Every file edgepix writes takes the same way: a temporary file beside the target, the write checked (a short write
or a full disk is an OSError, never a truncated file), fsync of the file, rename over the target, fsync of the
folder (so that the rename itself survives a power cut). Without the two fsyncs a crash shortly after the rename can
leave an empty or truncated file at the final name, which a resumable run would then count as complete.

A file being written lives beside its target under a hidden partial name, `.NAME.XXXXXXXX.partial.EXT` (the real
extension last, so that encoders which choose a format by extension still do), and is renamed over the target
when complete. While it is written, the writing process holds an exclusive `flock` on it. A process killed
mid-write (a power cut, SIGKILL) leaves its partial file behind, but not the lock: the next run writing to the
same target finds such files, sees that nobody holds them, and removes them (`remove_stale_partials`).

Partial files are created with mode 0666 minus the umask, as a plain `open` would create the target; a target
that exists keeps its mode.
"""

from __future__ import annotations

import contextlib
import errno
import glob as globlib
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale partial files are reported, never removed
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def partial_glob(path: Path) -> list[str]:
    """Glob patterns (in `path`'s folder) of partial files for `path`, including the names older versions used."""
    name, stem, suffix = (globlib.escape(s) for s in (path.name, path.stem, path.suffix))
    return [f".{name}.*.partial{suffix}", f".{name}.*.partial", f".{stem}.partial{suffix}"]


class PartialFile:
    """A new, locked partial file beside `target`. `path` is where to write; `commit()` renames it over the
    target; `discard()` deletes it. The lock is held until either (or until the process dies)."""

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        folder = self.target.parent
        while True:
            self.path = folder / f".{self.target.name}.{secrets.token_hex(4)}.partial{self.target.suffix}"
            try:
                # O_EXCL: never reuse another writer's file; mode 0o666: the kernel applies the umask, as for open().
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                                  0o666)
                break
            except FileExistsError:
                continue
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:  # a file system without locks (some network mounts): write unlocked
                    log.debug("no lock on %s: %s", self.path, e)
            if hasattr(os, "fchmod"):
                with contextlib.suppress(FileNotFoundError):  # overwriting keeps the target's mode, as open() does
                    os.fchmod(self.fd, stat.S_IMODE(os.stat(self.target).st_mode))
        except BaseException:
            self.discard()
            raise

    def write(self, data: bytes | memoryview) -> None:
        """Write all of `data` to the partial file; an OSError (ENOSPC, EIO, ...) when it cannot."""
        view = memoryview(data).cast("B")
        while view:
            written = os.write(self.fd, view)
            if written <= 0:  # os.write raises on errors; a zero-byte write would loop forever
                raise OSError(errno.EIO, "the write made no progress")
            view = view[written:]

    def commit(self) -> None:
        """Make the partial file durable and rename it over the target. The fsync covers whatever was written to
        the file, by this object or through its path (an encoder that opens the path itself writes to the same
        inode); a delayed write error (a full disk on a file system that allocates late) surfaces here."""
        os.fsync(self.fd)
        os.replace(self.path, self.target)
        fsync_folder(self.target.parent)
        self._unlock()

    def discard(self) -> None:
        """Delete the partial file (a no-op after `commit`)."""
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._unlock()

    def _unlock(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = -1


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename, a new file) to disk. File systems that cannot fsync a folder are
    accepted as they are."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # Windows opens no folders; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder` (a staged folder about to be renamed into place)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders that hold them
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            fsync_folder(path)
    fsync_folder(folder)


def remove_stale_partials(target: str | os.PathLike) -> list[Path]:
    """Delete the partial files of `target` left by writers that died; returns what was removed.

    A partial file whose lock another process holds is being written right now: it is left alone and logged.
    """
    target = Path(target)
    folder = target.parent
    found: set[Path] = set()
    for pattern in partial_glob(target):
        with contextlib.suppress(OSError):
            found.update(p for p in folder.glob(pattern) if p.is_file())
    removed = []
    for p in sorted(found):
        if fcntl is None:
            log.warning("%s: a partial file, maybe left by an interrupted run; delete it if no run writes %s",
                        p, target.name)
            continue
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    log.info("%s is being written by another running process; leaving it", p)
                    continue
                raise
            os.unlink(p)  # still holding the lock: no writer can have picked it up in between
            removed.append(p)
        except OSError as e:
            log.warning("cannot remove the stale partial file %s: %s", p, e.strerror or e)
        finally:
            os.close(fd)
    if removed:
        log.warning("removed %d partial file(s) left by an interrupted run writing %s: %s", len(removed), target,
                    ", ".join(p.name for p in removed))
    return removed


_PARTIAL_NAME = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.partial(\.[^.]*)?")


def remove_stale_partials_under(folder: str | os.PathLike, *, skip: tuple[str, ...] = ()) -> int:
    """Remove, in one pass over `folder` and its subfolders (except those named in `skip`), the partial files that
    killed writers left (files someone is writing are locked and stay); returns how many went. A run writing many
    files calls this once at its start instead of letting every write scan the folder."""
    folder = Path(folder)
    removed = 0
    for p in folder.rglob(".*.partial*"):
        m = _PARTIAL_NAME.fullmatch(p.name)
        if m is not None and not set(skip) & set(p.relative_to(folder).parts):
            removed += len(remove_stale_partials(p.with_name(m.group("name"))))
    return removed


def check_writable(path: str | os.PathLike, what: str, error: type[Exception]) -> Path:
    """Make sure a file can be written at `path` before any long work starts; raise `error` (one line) if not.

    Creates the folder, removes stale partial files of `path`, and creates and deletes a partial file (the
    only honest test: permission bits say nothing for root, nor about a read-only or full file system)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise error(f"{what} {path} is a folder; expected a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create the folder for {what} {path}: {e.strerror or e}") from None
    remove_stale_partials(path)
    try:
        PartialFile(path).discard()
    except OSError as e:
        raise error(f"cannot write {what} {path}: {e.strerror or e}") from None
    return path


def check_writable_folder(folder: str | os.PathLike, what: str, error: type[Exception]) -> Path:
    """Like `check_writable` for a folder that files will be written into."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create {what} {folder}: {e.strerror or e}") from None
    if not folder.is_dir():
        raise error(f"{what} {folder} is a file; expected a folder")
    try:
        PartialFile(folder / "probe").discard()
    except OSError as e:
        raise error(f"cannot write into {what} {folder}: {e.strerror or e}") from None
    return folder


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is deleted.

    The temporary file lives in the destination folder so that `os.replace` is a rename on one file system.
    Stale partial files of `path` from an interrupted run are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    part = PartialFile(path)
    try:
        yield part.path
        part.commit()
    finally:
        # After a successful commit the partial name no longer exists; after a failure it must not linger.
        part.discard()


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, scan: bool = True) -> None:
    """`data` at `path`, complete or absent. `scan=False` skips the look for stale partial files of `path` (a
    scan of the folder: a run writing thousands of files removes them once, with remove_stale_partials_under)."""
    path = Path(path)
    if scan:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path)
    part = PartialFile(path)
    try:
        part.write(data)
        part.commit()
    finally:
        part.discard()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_image(path: Path, image) -> None:
    """An image that appears complete or not at all: encoded in memory (the format from `path`'s suffix), written
    to a locked partial file beside `path` with every byte checked, made durable and renamed over it. SinkError in
    one line when it cannot (the partial file is removed). It does not look for stale partial files of `path`
    (a scan of the whole folder per image, quadratic in a folder of thousands): a run removes them once
    (remove_stale_partials_under)."""
    import cv2

    from .errors import SinkError

    ok, encoded = cv2.imencode(Path(path).suffix or ".png", image)
    if not ok:
        raise SinkError(f"cannot encode an image for {path} (suffix {Path(path).suffix!r})")
    try:
        atomic_write_bytes(path, encoded, scan=False)
    except OSError as e:
        raise SinkError(f"cannot write {path}: {e.strerror or e}") from None
