"""One cache node: the gRPC data service, the admin service and the peer
clients, around the pure groups of appliance.cache."""
