"""The Python clients applications import: ring-aware calls over gRPC.

    from appliance.client import AsyncClient, Client
    from appliance.config import find_config, load_settings

    settings = load_settings(find_config())

    # The live ring from the etcd the config names, followed while the
    # client is open (TLS and limits from the config too):
    with Client.from_settings(settings) as c:
        c.get("scores", "张三")            # b"100"

    # asyncio applications:
    async with AsyncClient.from_settings(settings) as c:
        await c.get("scores", "张三")

    # Or a static peer list, used as it is:
    with Client(["127.0.0.1:9999", "127.0.0.1:10000", "127.0.0.1:10001"]) as c:
        c.get("scores", "张三")

Each key goes straight to its owner (the ring the nodes use), so a Get
costs one hop. When the owner fails, the client reads the ring again and
retries on another node (any node can serve any key), all within the
call's timeout.

Layout: `routing` is the grpc-free core both clients share (requests,
replies, ring, tries, channel pool), `base` their arguments and ring
updates, `follow` the etcd watch; `sync` and `aio` only make the calls.
"""

from .aio import AsyncClient
from .common import settings_kwargs
from .follow import EtcdMembers
from .sync import Client

__all__ = ["AsyncClient", "Client", "EtcdMembers", "settings_kwargs"]
