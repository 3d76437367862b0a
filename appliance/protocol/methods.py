"""The gRPC services we serve, by name (every backend registers these)."""

GET_SERVICE = "groupcachepb.GroupCache"  # the seed's
CACHE_SERVICE = "appliance.cache.Cache"
PEER_SERVICE = "appliance.cache.Peer"
