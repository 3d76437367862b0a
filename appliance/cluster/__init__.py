"""Membership through etcd: registration of workers, the ring controller,
and the controller process that runs it (``run.run_controller``)."""
