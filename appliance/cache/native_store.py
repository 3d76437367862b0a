"""The store in Rust (appliance_engine.Store): the API of store.Store, with
its bytes where the engine's server answers hits without the GIL."""

from __future__ import annotations

import functools

from .store import Entry, StoreFactory


def native_store() -> StoreFactory | None:
    """A factory of the engine's stores; None where the engine is not built."""
    try:
        from appliance_engine import Store as EngineStore
    except ImportError:
        return None
    return functools.partial(EngineStore, entry=Entry)
