"""How a node reaches its peers: the peer client (peer_client), the engine's
own channel (engine_channel) and the circuit breaker that wraps any peer
client (breaker)."""
