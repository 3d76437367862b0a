"""HTTP origin: GET ``origin`` with ``{key}`` replaced by the URL-encoded key.

Every key byte but letters, digits, ``-``, ``_`` and ``~`` is percent-encoded,
``.`` included: a key ``..`` must not climb out of the template's path. The
key goes only into the path (never the host), and redirects are not
followed: the origin's headers (often secrets) go to the configured host
alone.

One aiohttp ClientSession per origin, created lazily inside the running loop
and reused, so connections are pooled (keep-alive). 200 -> the body; 404 or
410 -> KeyNotFound; anything else -> OriginError. The body is read with a cap
of ``max_value_bytes``: a larger answer is refused without reading it all.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import quote, urlsplit

import aiohttp
import yarl

from appliance.cache.errors import KeyNotFound, OriginError

_NOT_FOUND = (404, 410)
_ERROR_SNIPPET = 200  # characters of an error body quoted in the message
_ERROR_BODY_CAP = 4096  # bytes of an error body read (the rest closes the connection)


class HttpOrigin:
    def __init__(
        self,
        group_name: str,
        url_template: str,
        *,
        timeout: float,
        headers: dict[str, str],
        headers_from_env: dict[str, str],
        max_value_bytes: int,
    ) -> None:
        g = group_name
        parts = urlsplit(url_template)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise ValueError(f"group {g}: bad http origin {url_template!r}; expected http(s)://host/…/{{key}}")
        if "{key}" not in url_template:
            raise ValueError(
                f"group {g}: http origin must contain {{key}} where the key goes, "
                f"e.g. https://api.example.com/items/{{key}}"
            )
        if parts.username or parts.password:
            raise ValueError(f"group {g}: put credentials in headers / headers_from_env, not in the http origin URL")
        if "{key}" in parts.netloc:
            raise ValueError(f"group {g}: {{key}} may go in the http origin's path or query, not in its host")
        merged = {str(k): str(v) for k, v in (headers or {}).items()}
        for header, var in (headers_from_env or {}).items():
            value = os.environ.get(var)
            if value is None:
                raise ValueError(
                    f"group {g}: environment variable {var} is not set "
                    f"(headers_from_env wants it for the {header} header)"
                )
            merged[str(header)] = value
        self.group_name = group_name
        self.url_template = url_template
        # Normalise the template's own encoding once (spaces, non-ASCII in the
        # path), keeping {key} as the slot for the already-quoted key.
        ph = "GROUPCACHEKEYSLOT"
        self._encoded_template = str(yarl.URL(url_template.replace("{key}", ph))).replace(ph, "{key}")
        self.host = parts.netloc
        self.timeout = float(timeout)
        self.max_value_bytes = int(max_value_bytes)
        self._headers = merged
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __repr__(self) -> str:
        # never show header values: they may be secrets
        return f"HttpOrigin({self.group_name!r}, {self.url_template!r})"

    def url_for(self, key: str) -> str:
        # quote() keeps "." (unreserved), and "." or ".." as a path segment
        # is a dot-segment that clients and servers resolve away.
        return self._encoded_template.replace("{key}", quote(key, safe="").replace(".", "%2E"))

    def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            # A session belongs to one loop; a new loop (tests, restarts) gets a new one.
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                # LimitedOrigin enforces the group's timeout with its message;
                # this is a backstop for direct use.
                timeout=aiohttp.ClientTimeout(total=self.timeout + 1.0, sock_connect=self.timeout),
                raise_for_status=False,
            )
            self._session_loop = loop
        return self._session

    async def load(self, key: str) -> bytes:
        g = self.group_name
        if self._closed:
            raise OriginError(f"group {g}: origin is closed")
        session = self._get_session()
        try:
            # encoded=True: the URL is already percent-encoded; yarl must not re-quote it.
            url = yarl.URL(self.url_for(key), encoded=True)
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status == 200:
                    return await self._read_capped(resp)
                if resp.status in _NOT_FOUND:
                    await self._drain_small(resp)
                    raise KeyNotFound(f"group {g}: key {key!r} not found (HTTP {resp.status})")
                if 300 <= resp.status < 400:
                    await self._drain_small(resp)
                    raise OriginError(
                        f"group {g}: origin answered HTTP {resp.status} (a redirect: not followed, so the "
                        "origin's headers go nowhere else; point the origin at the final URL)"
                    )
                detail = await self._error_detail(resp)
                raise OriginError(f"group {g}: origin answered HTTP {resp.status}: {detail}")
        except (KeyNotFound, OriginError):
            raise
        except TimeoutError:
            raise OriginError(f"group {g}: origin {self.host} timed out after {self.timeout}s") from None
        except aiohttp.ClientError as exc:
            raise OriginError(f"group {g}: cannot reach origin {self.host}: {type(exc).__name__}: {exc}") from exc

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.max_value_bytes
        too_big = OriginError(f"group {self.group_name}: response larger than {limit} bytes")
        # Content-Length is the encoded size; only trust it for identity bodies.
        if resp.content_length is not None and not resp.headers.get("Content-Encoding"):
            if resp.content_length > limit:
                resp.close()  # do not read it; the connection is dropped
                raise too_big
        buf = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            buf += chunk
            if len(buf) > limit:
                resp.close()
                raise too_big
        return bytes(buf)

    async def _drain_small(self, resp: aiohttp.ClientResponse) -> bytes:
        """Read a small error body so the connection can be reused; close it otherwise."""
        if resp.content_length is not None and resp.content_length > _ERROR_BODY_CAP:
            resp.close()
            return b""
        try:
            data = await resp.content.read(_ERROR_BODY_CAP + 1)
        except (TimeoutError, aiohttp.ClientError):
            resp.close()
            return b""
        if len(data) > _ERROR_BODY_CAP or not resp.content.at_eof():
            resp.close()
        return data

    async def _error_detail(self, resp: aiohttp.ClientResponse) -> str:
        body = await self._drain_small(resp)
        text = body.decode("utf-8", "replace").strip()
        text = " ".join(text.split())[:_ERROR_SNIPPET]
        reason = resp.reason or ""
        if text and reason and text != reason:
            return f"{reason}: {text}"
        return text or reason or "no reason given"

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
