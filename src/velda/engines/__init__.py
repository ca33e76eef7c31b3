"""Engines: what places and starts the processes of tasks. See base.py.

A pool's `engine` key names an entry of REGISTRY; the local engine serves local pools and
every pool that is not in velda.toml any more. An engine's module is imported only when a
pool uses it, so the core install never imports Ray.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from velda.engines.base import Engine, EngineError, EngineEvents
from velda.models import Pool

Registry = Mapping[str, str]  # engine name -> "module:class", the class taking (pool, events)

REGISTRY: Registry = {
    "ray": "velda.engines.ray:RayEngine",
}
ENGINE_NAMES = ("local", *REGISTRY)


def build_engine(registry: Registry, pool: Pool, events: EngineEvents) -> Engine:
    """The engine of a pool whose engine is not the local one."""
    where = registry.get(pool.engine)
    if where is None:
        names = ", ".join(("local", *registry))
        raise EngineError(f"pool {pool.name}: unknown engine '{pool.engine}' ({names})")
    module, _, cls = where.partition(":")
    engine: Engine = getattr(importlib.import_module(module), cls)(pool, events)
    return engine
