"""Pure cache logic: ring, eviction, singleflight and group. No I/O here.

Everything that talks to the network or disk sits above this package and
hands it callables (a loader, a peer picker).
"""
