"""The appliance's private directories and generated files.

A runtime or state directory is ours alone: made 0700, and refused when it
exists but belongs to another user or others may write in it (another user
could have planted a config, a socket or a link there). Generated files are
written through a fresh temporary file opened without following links, then
renamed into place, so a planted link redirects nothing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeDirectory(Exception):
    """A directory the appliance must own alone does not belong to it."""


def private_dir(path: Path) -> None:
    """Make `path` (and its parents) and leave it 0700: only this user inside.
    Raises UnsafeDirectory when it exists as another user's, as a link
    another user made, or with write access for group or others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    uid = os.getuid()
    link = path.lstat()
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (uid, 0):
        raise UnsafeDirectory(f"{path} is a link made by uid {link.st_uid}, not by this user (uid {uid}): remove it")
    st = path.stat()
    if st.st_uid != uid:
        raise UnsafeDirectory(
            f"{path} belongs to uid {st.st_uid}, not to this user (uid {uid}): remove it, or set "
            "node.runtime_dir / node.state_dir to a directory of this user's"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): its contents cannot be "
            "trusted; remove it or make it 0700 after checking what is inside"
        )
    path.chmod(0o700)  # ours, and only we could write in it: close it to readers too


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write `path` whole: a fresh file beside it (never a link followed),
    renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
