"""velda: run any command as a tracked task on a compute pool.

`velda.Client` is the Python client of the HTTP API. Importing this package imports nothing
else, so the command-line tools start fast.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time: it slows every vbatch
if TYPE_CHECKING:
    from typing import Any


__version__ = "0.1.0"
__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from velda.client import Client

        return Client
    raise AttributeError(name)
