"""The machine the appliance runs on."""

from __future__ import annotations

import os

__all__ = ["is_root"]


def is_root() -> bool:
    return os.geteuid() == 0
