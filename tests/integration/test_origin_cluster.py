"""Origins behind a real cluster: one HTTP request for a cluster-wide storm."""

import asyncio

import grpc
import pytest
from aiohttp import web

from appliance.config import GroupSettings
from appliance.origins import build_origin
from appliance.pb import groupcache_pb2, groupcache_pb2_grpc
from support.nodes import all_arrived, cluster

pytestmark = pytest.mark.usefixtures("backend")  # each test on both server backends


async def test_200_concurrent_cluster_wide_gets_make_one_http_request(tmp_path):
    hits = []
    release = asyncio.Event()

    async def handler(request):
        hits.append(request.match_info["key"])
        await asyncio.wait_for(release.wait(), 10)  # hold the load so every Get piles up
        return web.Response(body=b"from-http:" + request.match_info["key"].encode())

    app = web.Application()
    app.router.add_get("/v/{key}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    spec = GroupSettings(origin=f"http://127.0.0.1:{port}/v/{{key}}", timeout="10s")
    origin = build_origin("g", spec, state_dir=tmp_path, max_value_bytes=1 << 20)
    try:
        async with cluster(3, origin.load) as nodes:
            channels = [grpc.aio.insecure_channel(n.addr) for n in nodes]
            stubs = [groupcache_pb2_grpc.GroupCacheStub(c) for c in channels]
            req = groupcache_pb2.GetRequest(group="g", key="cold key/张")
            calls = [asyncio.ensure_future(stubs[i % 3].Get(req, timeout=15)) for i in range(200)]
            await all_arrived(nodes, 200, timeout=15)  # every Get waits on that one load
            release.set()
            replies = await asyncio.gather(*calls)
            assert {r.value for r in replies} == {"from-http:cold key/张".encode()}
            assert hits == ["cold key/张"]
            for c in channels:
                await c.close()
    finally:
        await origin.close()
        await runner.cleanup()
