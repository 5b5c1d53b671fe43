"""Safe file IO for every output and input: atomic, durable, private-until-done writes, and input checks.

One helper serves the GGUF export, ``save_pretrained`` and the Modelfile, so that every output follows the
same rules: it is written under a unique temporary name beside its destination, flushed to disk, given the
mode an ordinary ``open()`` would have given it, renamed over the destination, and the folder is synced, so
that a crash at any point leaves either the old file or the new one, never a half-written one. Nothing here
changes process-wide state (the umask is read, never set).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["PathError", "atomic_output", "check_output_path", "fsync_folder", "new_file_mode",
           "require_regular_file", "write_bytes_atomic"]


class PathError(ValueError):
    """An input that cannot be read safely, or an output that cannot be written safely; names the path."""


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, and a
    set-and-restore races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022  # the common default, where /proc does not say


def new_file_mode(path: Path) -> int:
    """The mode a rewritten file keeps, or a new one gets from open(): 0o666 minus the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def fsync_folder(folder: Path) -> None:
    """Make a rename inside folder durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def require_regular_file(path: Path, what: str) -> None:
    """Refuse inputs that are not regular files before opening them: a FIFO would block the open forever,
    and a device or folder would be read as garbage."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise PathError(f"{path}: {what} is missing") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise PathError(f"{path}: {what} must be a regular file, found {kind}")


def check_output_path(output: Path, inputs: Iterable[Path] = ()) -> None:
    """An output file may replace an old output, never an input, a folder or a special file."""
    if not output.parent.is_dir():
        raise PathError(f"{output}: output folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise PathError(f"{output}: output folder {output.parent} is not writable")
    if output.exists() or output.is_symlink():
        if output.is_dir():
            raise PathError(f"{output}: is a folder; expected a file path for the output")
        if not output.is_file():
            raise PathError(f"{output}: exists and is not a regular file; refusing to replace it")
        for source in inputs:
            with contextlib.suppress(OSError):
                if os.path.samefile(output, source):
                    raise PathError(f"{output}: is an input of this command ({source}); refusing to "
                                      "overwrite it, choose another output path")


@contextlib.contextmanager
def atomic_output(destination: Path, *, prefix: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary path beside destination; on success it becomes destination, durably.

    The caller writes the temporary file (any way it likes) inside the block. On leaving the block normally
    the file is fsynced, given destination's mode (or the umask's), renamed, and the folder fsynced; on any
    exception, KeyboardInterrupt and SystemExit included, the temporary file is removed. A destination that is
    a symbolic link is followed, as open() would: the file it names is replaced and the link stays a link.
    """
    destination = Path(destination)
    if destination.is_symlink():
        destination = Path(os.path.realpath(destination))
    fd, name = tempfile.mkstemp(prefix=prefix or f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mode = new_file_mode(destination)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600: the final file gets the mode open() would give it
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(destination.parent)


def write_bytes_atomic(destination: Path, data: bytes) -> Path:
    """Write a small file whole, atomically (see atomic_output)."""
    with atomic_output(destination) as tmp:
        tmp.write_bytes(data)
    return destination
