"""How a value the user gave is quoted in an error message."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

LIMIT = 80  # characters; longer values are cut with "..."


def show(value: Any) -> str:
    """``value`` as the user wrote it in TOML terms: true/false, a table, a quoted string."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "nothing"
    elif isinstance(value, Mapping):
        text = "a table"
    elif isinstance(value, Path):
        text = repr(str(value))
    else:
        text = repr(value)
    return text if len(text) <= LIMIT else text[: LIMIT - 3] + "..."
