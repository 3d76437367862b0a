"""Token files: the cluster's and the credentials' bearer tokens on disk,
read only from files their owner alone may read, and made without a race.

Pure file handling (no RPC, no config): the config's checks, the node's
authenticator, the CLI and `appliance run` all read or make them here.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

MIN_TOKEN_CHARS = 16
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file, never the token."""


def read_token(path: str | os.PathLike[str]) -> str:
    """The token in `path`: a regular file, readable by its owner only."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise TokenFileError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TokenFileError(f"{str(p)!r} is not a regular file")
    if st.st_mode & 0o077:
        raise TokenFileError(
            f"{str(p)!r} is readable or writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
        )
    try:
        token = p.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read {str(p)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(token) < MIN_TOKEN_CHARS or not set(token) <= _TOKEN_CHARS:
        raise TokenFileError(
            f"{str(p)!r} must hold one token of at least {MIN_TOKEN_CHARS} characters "
            "(letters, digits and -._~+/=), like `openssl rand -base64 32` prints"
        )
    return token


def ensure_token_file(path: Path, *, uid: int | None = None, gid: int | None = None) -> bool:
    """Make `path` (mode 0600, its directory 0700) with a new random token
    unless it exists; True when it was made. `uid`/`gid`: its owner."""
    if path.exists():
        return False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if uid is not None:
        os.chown(path.parent, uid, gid if gid is not None else -1)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made meanwhile by another process
        return False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    if uid is not None:
        os.chown(path, uid, gid if gid is not None else -1)
    return True
