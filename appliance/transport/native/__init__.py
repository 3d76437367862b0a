"""The pygrpc-native backend (see server.py)."""
