import os
import sys
from pathlib import Path

# grpc's C core logs connection chatter at INFO; keep test output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


import pytest  # noqa: E402

# On CI a skip is a failure (support/required.py).
pytest_plugins = ["support.required"]

# The server backends of appliance.fronts. A module that runs its tests
# on each one says `pytestmark = pytest.mark.usefixtures("backend")`. The
# engine is built by `make` where cargo exists; without it, it is skipped.
BACKENDS = ("engine", "grpcio")


@pytest.fixture(params=BACKENDS)
def backend(request):
    from support import nodes

    if request.param == "engine":
        from appliance.fronts import engine_available

        missing = engine_available()
        if missing:
            pytest.skip(f"the engine is not built here: {missing}")
    saved = nodes.BACKEND["server"]
    nodes.BACKEND["server"] = request.param
    try:
        yield request.param
    finally:
        nodes.BACKEND["server"] = saved


def pytest_asyncio_loop_factories(config, item):
    """Async tests run on the loop `appliance worker` runs (SharedLoop), so
    the engine backend serves events from its receiving thread as it does in
    production."""
    from appliance.fronts.grpc_engine.loop import SharedLoop

    return {"shared": SharedLoop}


@pytest.fixture
def etcd_server(tmp_path):
    """A private etcd on free loopback ports, for this test only."""
    from support.etcd_server import EtcdServer

    server = EtcdServer(tmp_path / "etcd").start()
    try:
        yield server
    finally:
        server.stop()
