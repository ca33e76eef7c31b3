"""Engines: what places and starts the processes of tasks. See base.py."""

from __future__ import annotations

from velda.engines.base import Engine, EngineError, EngineEvents
from velda.models import Pool


def load_engine(pool: Pool, events: EngineEvents) -> Engine:
    """The engine of a remote pool. Imported only when such a pool is used, so the core
    install never imports Ray."""
    if pool.engine == "ray":
        from velda.engines.ray import RayEngine

        return RayEngine(pool, events)
    raise EngineError(f"pool {pool.name}: unknown engine '{pool.engine}' (local, ray)")
