"""A real HTTP origin on 127.0.0.1 that a test switches between healthy,
failing (HTTP 500), slow and down (port closed)."""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import web


def http_value(key: str) -> bytes:
    return f"{key}=".encode() + hashlib.sha256(key.encode()).hexdigest().encode()


class SwitchableOrigin:
    MODES = ("ok", "error", "slow")

    def __init__(self, slow_seconds: float = 30.0) -> None:
        self.mode = "ok"
        self.slow_seconds = slow_seconds
        self.hits: list[tuple[str, str]] = []  # (mode, key) of every request served
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v/{{key}}"

    async def _handle(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        mode = self.mode
        self.hits.append((mode, key))
        if mode == "error":
            return web.Response(status=500, text="database on fire")
        if mode == "slow":
            await asyncio.sleep(self.slow_seconds)
        if key.startswith("missing"):
            return web.Response(status=404, text="no such key")
        return web.Response(body=http_value(key))

    async def start(self) -> SwitchableOrigin:
        app = web.Application()
        app.router.add_get("/v/{key}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def down(self) -> None:
        """Close the port: connections are refused until `start()`."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def close(self) -> None:
        await self.down()
