"""The HTTP front: a read-only API (api.py) on aiohttp."""
