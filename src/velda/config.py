"""Where velda keeps its state, and the pools read from velda.toml (at start and on change)."""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velda.models import Pool, Resources

DEFAULT_POOL = "shell"
_BUILTIN = re.compile(r"^(cpu|gpu)-([1-9][0-9]{0,3})$")
MAX_REQUEST_BYTES = 10 * 1024 * 1024
_POOL_KEYS = {"engine", "cpus", "gpus", "memory", "resources", "capacity"}


class ConfigError(ValueError):
    """velda.toml (or a VELDA_* setting in the server's environment) says something velda
    cannot use."""


def env_seconds(name: str, default: float) -> float:
    """A duration in seconds from the environment variable `name`; `default` where it is
    unset or empty. A ConfigError naming it where it is not a number of seconds."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):  # NaN fails this too
        raise ConfigError(f"{name}={text!r} is not a number of seconds")
    return seconds


def config_path(home: Path) -> Path | None:
    explicit = os.environ.get("VELDA_CONFIG")
    if explicit:
        return Path(explicit)
    candidate = home / "velda.toml"
    return candidate if candidate.exists() else None


def config_file(home: Path, given: Path | None = None) -> Path:
    """The file a server reads, whether it exists yet or not: --config, else VELDA_CONFIG,
    else $VELDA_HOME/velda.toml."""
    if given is not None:
        return given
    explicit = os.environ.get("VELDA_CONFIG")
    return Path(explicit) if explicit else home / "velda.toml"


@dataclass
class Config:
    default_pool: str = DEFAULT_POOL
    pools: dict[str, Pool] = field(default_factory=dict)
    local_cpus: float | None = None  # machine capacity override
    local_gpus: int | None = None
    server_url: str | None = None  # how nodes of remote engines reach the server
    allowed_hosts: list[str] = field(default_factory=list)  # public names of a team server
    max_request_bytes: int = MAX_REQUEST_BYTES  # larger request bodies are refused (413)
    source: Path | None = None

    def pool(self, name: str) -> Pool | None:
        """A configured pool, or a built-in one (`shell`, `cpu-N`, `gpu-N`)."""
        if name in self.pools:
            return self.pools[name]
        return builtin_pool(name)

    def known_pools(self) -> list[str]:
        names = set(self.pools) | {DEFAULT_POOL}
        return sorted(names) + ["cpu-N", "gpu-N"]


@functools.lru_cache(maxsize=256)  # read several times for each task; a Pool is frozen
def builtin_pool(name: str) -> Pool | None:
    if name == DEFAULT_POOL:
        return Pool(DEFAULT_POOL, "local", Resources(cpus=1))
    match = _BUILTIN.match(name)
    if not match:
        return None
    n = int(match.group(2))
    if match.group(1) == "cpu":
        return Pool(name, "local", Resources(cpus=n))
    return Pool(name, "local", Resources(cpus=1, gpus=n))


def load_config(path: Path | None) -> Config:
    if path is None:
        return Config()
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from e
    config = Config(source=path)
    config.default_pool = str(data.get("default_pool", DEFAULT_POOL))
    local = _table(data, "local", path)
    config.local_cpus = _number(local, "cpus", path, "local")
    gpus = _number(local, "gpus", path, "local")
    config.local_gpus = None if gpus is None else int(gpus)
    server = _table(data, "server", path)
    config.server_url = server.get("url") if isinstance(server.get("url"), str) else None
    config.allowed_hosts = _names(server, "allowed_hosts", path)
    body_limit = _number(server, "max_request_bytes", path, "server")
    config.max_request_bytes = MAX_REQUEST_BYTES if body_limit is None else int(body_limit)
    for name, table in _table(data, "pools", path).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [pools.{name}] must be a table")
        config.pools[name] = _pool(name, table, path)
    return config


def _table(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: '{key}' must be a table")
    return value


def _names(table: dict[str, Any], key: str, path: Path) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path}: [server] {key} must be a list of host names")
    return value


def _run_as(name: str, engine: str, table: dict[str, Any], path: Path) -> None:
    """`user = "NAME"`: the pool's tasks run as that Unix user. Only root can switch users,
    and only the local engine runs tasks on this machine."""
    user = table.get("user")
    if user is None:
        return
    where = f"{path}: [pools.{name}] user"
    if not isinstance(user, str) or not user:
        raise ConfigError(f"{where} must be a user name")
    if engine != "local":
        raise ConfigError(f"{where}: only local pools can run tasks as another user")
    if os.geteuid() != 0:
        raise ConfigError(
            f"{where} = {user!r}: running tasks as another user needs the server to run as "
            f"root (it runs as uid {os.geteuid()})"
        )
    import pwd
    import shutil

    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"{where} = {user!r}: no such user on this machine") from None
    if shutil.which("setpriv") is None:
        raise ConfigError(f"{where} = {user!r}: needs setpriv (util-linux) on the PATH")


def _number(table: dict[str, Any], key: str, path: Path, where: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{path}: [{where}] {key} must be a number >= 0, not {value!r}")
    return float(value)


def _pool(name: str, table: dict[str, Any], path: Path) -> Pool:
    engine = table.get("engine", "local")
    if not isinstance(engine, str):
        raise ConfigError(f"{path}: [pools.{name}] engine must be a string")
    where = f"pools.{name}"
    _run_as(name, engine, table, path)
    cpus = _number(table, "cpus", path, where)
    gpus = _number(table, "gpus", path, where)
    memory = _number(table, "memory", path, where)
    custom = table.get("resources", {})
    if not isinstance(custom, dict) or not all(
        isinstance(v, int | float) for v in custom.values()
    ):
        raise ConfigError(f"{path}: [{where}] resources must map names to numbers")
    capacity = _number(table, "capacity", path, where)
    resources = Resources(
        cpus=1.0 if cpus is None else cpus,
        gpus=int(gpus or 0),
        memory_mb=int(memory or 0),
        custom=tuple(sorted((str(k), float(v)) for k, v in custom.items())),
    )
    options = {k: v for k, v in table.items() if k not in _POOL_KEYS}
    return Pool(name, engine, resources, options, None if capacity is None else int(capacity))
