"""Protobuf and gRPC code generated from proto/ by grpcio-tools (`make proto`; `make proto-check` fails when it is stale)."""
