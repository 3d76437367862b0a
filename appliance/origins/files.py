"""File origin: ``file:///dir`` serves the file ``dir/<key>``.

The key is a relative path below ``dir``. A key that tries to leave the
directory (``..`` components, an absolute path, a NUL byte, or a symlink
whose target resolves outside ``realpath(dir)``) is refused with
InvalidRequest. A missing file or a directory is KeyNotFound. A symlink that
stays inside the directory is followed. Files are read in a small thread
pool, capped at ``max_value_bytes``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

from appliance.cache.errors import InvalidRequest, KeyNotFound, OriginError


class FileOrigin:
    def __init__(
        self,
        group_name: str,
        url: str,
        *,
        max_value_bytes: int,
        max_concurrent_loads: int = 4,
    ) -> None:
        g = group_name
        parts = urlsplit(url)
        if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost"):
            raise ValueError(f"group {g}: bad file origin {url!r}; expected file:///absolute/dir")
        if parts.query or parts.fragment:
            raise ValueError(f"group {g}: file origin {url!r} must not have a query or fragment")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"group {g}: file origin needs an absolute directory: file:///dir, got {url!r}")
        root = Path(path)
        if not root.is_dir():
            what = "does not exist" if not root.exists() else "is not a directory"
            raise ValueError(f"group {g}: file origin directory {root} {what}")
        self.group_name = group_name
        self.root = root
        self.real_root = os.path.realpath(root)
        self.max_value_bytes = int(max_value_bytes)
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, max_concurrent_loads), thread_name_prefix=f"origin-file-{group_name}"
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"FileOrigin({self.group_name!r}, {str(self.root)!r})"

    def resolve(self, key: str) -> str:
        """The real path that ``key`` names, or InvalidRequest if it leaves the root."""
        g = self.group_name
        if "\x00" in key:
            raise InvalidRequest(f"group {g}: key contains a NUL byte")
        if key.startswith("/") or os.path.isabs(key):
            raise InvalidRequest(
                f"group {g}: key {key!r} is an absolute path; expected a path relative to the origin directory"
            )
        if ".." in key.replace("\\", "/").split("/"):
            raise InvalidRequest(f"group {g}: key {key!r} contains a '..' component")
        real = os.path.realpath(os.path.join(self.real_root, key))
        if real != self.real_root and not real.startswith(self.real_root.rstrip("/") + "/"):
            raise InvalidRequest(f"group {g}: key {key!r} resolves outside the origin directory")
        return real

    async def load(self, key: str) -> bytes:
        if self._closed:
            raise OriginError(f"group {self.group_name}: origin is closed")
        real = self.resolve(key)  # cheap checks first, in the loop
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read, key, real)

    def _read(self, key: str, real: str) -> bytes:
        g = self.group_name
        limit = self.max_value_bytes
        try:
            # O_NONBLOCK: a FIFO in the directory must not hang a thread.
            # O_NOFOLLOW: `real` is already resolved; a symlink swapped in since is refused.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise KeyNotFound(f"group {g}: key {key!r} not found") from None
        except IsADirectoryError:
            raise KeyNotFound(f"group {g}: key {key!r} is a directory") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidRequest(f"group {g}: key {key!r} changed to a symlink while being read") from None
            raise OriginError(f"group {g}: cannot open {key!r}: {exc.strerror or exc}") from exc
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise KeyNotFound(f"group {g}: key {key!r} is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise KeyNotFound(f"group {g}: key {key!r} is not a regular file")
            if st.st_size > limit:
                raise OriginError(f"group {g}: file {key!r} is larger than {limit} bytes ({st.st_size})")
            os.set_blocking(fd, True)
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = os.read(fd, min(1 << 20, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:  # the file grew while we read it
                    raise OriginError(f"group {g}: file {key!r} is larger than {limit} bytes")
            return b"".join(chunks)
        except OSError as exc:
            raise OriginError(f"group {g}: cannot read {key!r}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=False, cancel_futures=True)
