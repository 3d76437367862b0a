"""One cache node, composed: its rules (appliance.rules) served by a front
(appliance.fronts), its peers reached through appliance.peering, plus the
admin service and the node's metrics (serving.py, metrics.py)."""
