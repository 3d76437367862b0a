"""Box-level operations above the nodes: the per-box metrics endpoint.

Per-worker features (node metrics, the HTTP read API, rate limiting) live
in appliance.node."""
