"""The gRPC front on the engine: the Rust front (appliance_engine) and the Python it hands calls to (server.py)."""
