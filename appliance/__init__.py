"""groupcache-appliance: a distributed read-through cache."""

__version__ = "0.1.0"
