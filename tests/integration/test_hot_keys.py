"""A hot key read by the Python Client under `appliance run` is spread over
every worker, whose hot caches then serve it."""

import pytest

from support.appliance import Appliance

pytestmark = pytest.mark.integration


@pytest.fixture
def appliance(tmp_path):
    app = Appliance(tmp_path)
    try:
        yield app.start()
    finally:
        app.cleanup()


def test_client_spreads_a_hot_key_over_every_worker(appliance):
    from appliance.client import Client
    from appliance.config import load_settings

    settings = load_settings(appliance.config)
    with Client.from_settings(settings, timeout=5, follow=False) as client:
        owner = client.locate("张三")
        for _ in range(300):  # bounded: a few hundred Gets of one key
            assert client.get("scores", "张三") == b"100"
    stats = {appliance.addresses()[i]: appliance.admin_stats(i)["groups"]["scores"] for i in range(3)}
    assert all(s["gets"] > 0 for s in stats.values()), {a: s["gets"] for a, s in stats.items()}
    others = [s for a, s in stats.items() if a != owner]
    assert sum(s["hot_hits"] for s in others) > 0  # non-owners serve it from their hot caches
    assert stats[owner]["local_loads"] == 1 and sum(s["local_loads"] for s in others) == 0
