"""The gRPC front on grpcio (a grpc.aio server): the portable path."""
