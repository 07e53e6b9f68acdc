"""`file://` image reads: only regular files under VARCO_FILE_ROOT, never anything that can block.

A FIFO, a device or a socket under the root would block a task thread forever (or stream without
end), so the file is opened non-blocking and checked with fstat before a byte is read; the check
and the read use one descriptor, so the file cannot be swapped in between.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from varco.tasks.errors import ForbiddenURLError, ImageFetchError, ImageTooLargeError

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink"}  # fmt: skip
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC


def read_regular_file(root: Path | None, uri: str, limit: int) -> bytes:
    """The bytes of the regular file `uri` names, if it lies under `root`; typed errors otherwise."""
    if root is None:
        raise ForbiddenURLError("file:// URIs are disabled: set VARCO_FILE_ROOT to the directory they may read")
    raw = unquote(urlsplit(uri).path)
    if "\x00" in raw:
        raise ImageFetchError("file path contains a NUL byte")
    try:
        path = Path(raw).resolve()  # symlinks resolved before the root check
    except (OSError, RuntimeError) as exc:
        raise ImageFetchError(f"cannot resolve the file path: {exc}") from None
    if not path.is_relative_to(root.resolve()):
        raise ForbiddenURLError(f"{path} is outside VARCO_FILE_ROOT ({root})")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise ImageFetchError(f"no such file: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise ImageFetchError(f"file name too long ({len(raw)} characters)") from None
        raise ImageFetchError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise ImageFetchError(f"{path} is {kind}; only regular files are read")
        if info.st_size > limit:
            raise ImageTooLargeError(f"image is {info.st_size} bytes; the limit is {limit}")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # the file grew after fstat
                raise ImageTooLargeError(f"image is over the {limit}-byte limit")
        return b"".join(chunks)
    except OSError as exc:
        raise ImageFetchError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
