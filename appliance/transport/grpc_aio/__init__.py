"""The grpcio backend (grpc.aio server), and the peer client both backends use."""
