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
    "slurm": "velda.engines.slurm:SlurmEngine",
}
ENGINE_NAMES = ("local", *REGISTRY)


class Engines:
    """The engine of each pool: the local engine for local pools (and for a pool that left
    velda.toml while it had tasks), one engine per other pool, made on first use."""

    def __init__(self, local: Engine, registry: Registry, events: EngineEvents) -> None:
        self.local = local
        self.registry = registry
        self.events = events
        self._built: dict[str, Engine] = {}

    def of(self, pool: Pool | None) -> Engine:
        if pool is None or pool.engine == "local":
            return self.local
        key = f"{pool.engine}:{pool.name}"
        if key not in self._built:
            self._built[key] = build_engine(self.registry, pool, self.events)
        return self._built[key]

    def all(self) -> list[Engine]:
        return [self.local, *self._built.values()]


def build_engine(registry: Registry, pool: Pool, events: EngineEvents) -> Engine:
    """The engine of a pool whose engine is not the local one."""
    where = registry.get(pool.engine)
    if where is None:
        names = ", ".join(("local", *registry))
        raise EngineError(f"pool {pool.name}: unknown engine '{pool.engine}' ({names})")
    module, _, cls = where.partition(":")
    engine: Engine = getattr(importlib.import_module(module), cls)(pool, events)
    return engine
