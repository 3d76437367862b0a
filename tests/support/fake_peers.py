"""A stand-in for a transport's peer client, for the pure tests of Peers."""


class FakeClient:
    """What Peers needs of a client: its address, its PeerFacts, and close()."""

    def __init__(self, addr, facts):
        self.addr, self.facts = addr, facts
        self.closed = None

    async def close(self, grace=None):
        self.closed = grace
