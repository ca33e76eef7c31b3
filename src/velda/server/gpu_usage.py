"""GPU figures from NVML (the optional `nvidia-ml-py`), for the usage of GPU pools' tasks.

Loaded on first use and only where NVML loads: without the package, a driver or a GPU,
`devices` gives nothing and the rest of velda is unchanged. Indices are those the scheduler
hands out (CUDA_VISIBLE_DEVICES of the task), which are NVML's indices on this machine.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

_nvml: Any = None
_loaded = False
_why_not = ""


def _load() -> Any:
    global _nvml, _loaded, _why_not
    if not _loaded:
        _loaded = True
        try:
            pynvml = importlib.import_module("pynvml")
        except ImportError:
            _why_not = "nvidia-ml-py is not installed (pip install 'velda[gpu]')"
            return None
        try:
            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception as e:  # no driver, no device: no GPU figures
            _why_not = f"NVML did not load ({e}): no NVIDIA driver or GPU here"
    return _nvml


def available() -> bool:
    return _load() is not None


def why_unavailable() -> str:
    """Why there are no GPU figures here, in words; empty when there are."""
    _load()
    return "" if _nvml is not None else _why_not


def devices(indices: tuple[int, ...]) -> list[dict[str, Any]]:
    """Utilisation (% of the last sample period) and memory used of each device."""
    nvml = _load()
    if nvml is None:
        return []
    found = []
    for index in indices:
        with contextlib.suppress(Exception):  # a device that went away
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            found.append({"index": index, "utilization_percent": int(rates.gpu),
                          "memory_bytes": int(memory.used),
                          "memory_total_bytes": int(memory.total)})
    return found
