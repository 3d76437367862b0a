"""Membership through etcd: registration of workers, the ring controller."""
