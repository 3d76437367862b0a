"""The appliance configuration (design contract 4).

One TOML file, overridden by environment variables
(``APPLIANCE_NODE__WORKERS=5``), validated by pydantic models.

Public API:

- ``Settings`` (with ``ClusterSettings``, ``NodeSettings``, ``GroupSettings``):
  the typed configuration. ``Settings(...)`` with keyword arguments builds one
  from code (environment variables still apply; no file is read).
- ``find_config(explicit)``: which file to read (or ``None`` for the built-in
  default).
- ``load_settings(path)``: read, merge, validate, resolve directories. Raises
  ``ConfigError`` whose ``str()`` is the complete message for the user, one
  problem per line, each naming the file (or environment variable), the dotted
  key and what was expected.
- ``resolve_dirs(settings)``, ``Settings.state_path()``,
  ``Settings.runtime_path()``, ``Settings.expand_origin(group)``.
- ``check_file(path)``: one-line summary for ``appliance config check``.
- ``split_hostport`` / ``join_hostport``: the ``host:port`` form used by
  ``cluster.etcd`` and by node addresses (IPv6 as ``[::1]:2379``).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.resources
import ipaddress
import json
import os
import re
import tomllib
import types
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from .addr import HOSTNAME
from .addr import is_loopback as _is_loopback
from .addr import join as join_hostport
from .addr import split as split_hostport
from .messages import show as _show
from .origins import grammar
from .units import (
    ByteSize,
    Duration,
    format_bytes,
    format_duration,
    parse_bytes,
    parse_duration,
)

__all__ = [
    "DEFAULT_CONFIG_RESOURCE",
    "ENV_PREFIX",
    "SYSTEM_CONFIG",
    "ClusterSettings",
    "ConfigError",
    "GroupSettings",
    "NodeSettings",
    "OpsSettings",
    "Settings",
    "TlsSettings",
    "builtin_config_path",
    "check_file",
    "default_runtime_dir",
    "default_state_dir",
    "find_config",
    "join_hostport",
    "load_settings",
    "resolve_dirs",
    "split_hostport",
]

ENV_PREFIX = "APPLIANCE_"
ENV_DELIMITER = "__"
CONFIG_ENV = "APPLIANCE_CONFIG"
SYSTEM_CONFIG = Path("/etc/appliance/appliance.toml")
DEFAULT_CONFIG_RESOURCE = "defaults/appliance.toml"



class ConfigError(Exception):
    """The configuration cannot be used. ``str(err)`` is the whole message.

    ``errors`` holds one line per problem. The CLI prints ``str(err)`` and
    exits with ``exit_code`` (2).
    """

    exit_code = 2

    def __init__(self, errors: list[str] | str, path: Path | None = None):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.path = path
        super().__init__("\n".join(self.errors))


class FieldError(ValueError):
    """Raised by validators to point at a key below the model being validated.

    ``loc`` is relative to that model; ``message`` None means "describe what
    the field expects".
    """

    def __init__(self, loc: tuple[str | int, ...], message: str | None):
        self.loc = tuple(loc)
        self.message = message
        super().__init__(message or "invalid value")


# --------------------------------------------------------------------------
# host:port helpers



def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _may_share_ports(a: str, b: str) -> bool:
    """Whether sockets bound on hosts a and b would compete for the same ports."""
    if a.lower() == b.lower() or _is_wildcard(a) or _is_wildcard(b):
        return True
    return _is_loopback(a) and _is_loopback(b)


# --------------------------------------------------------------------------
# models


def _lower(v: Any) -> Any:
    return v.strip().lower() if isinstance(v, str) else v


def _path(v: Any) -> Any:
    """Expand ``~``; the path must then be absolute (services do not share a cwd)."""
    if v is None or v == "":
        return None
    if isinstance(v, (str, Path)):
        p = Path(v).expanduser()
        if not p.is_absolute():
            raise ValueError(f"expected an absolute path (or one starting with ~), got {_show(str(v))}")
        return p
    return v


AbsPath = Annotated[Path, BeforeValidator(_path)]


def _etcd_list(v: Any) -> Any:
    """Accept a list, a JSON list, or a comma-separated string (handy in env vars)."""
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                return json.loads(s)
            except ValueError:
                raise ValueError(f'expected a JSON list like ["127.0.0.1:2379"], got {_show(v)}') from None
        return [p.strip() for p in s.split(",") if p.strip()]
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic would take `workers = true` as 1; in a config that is a mistake.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(v, bool) and field is not None and field.annotation in (int, float):
            raise FieldError((), None)
        return v


class ClusterSettings(_Model):
    """How nodes find each other: etcd."""

    service: str = Field(
        "groupcache",
        json_schema_extra={"expected": 'a non-empty etcd key prefix without a leading or trailing "/", like "groupcache"'},
    )
    etcd: Annotated[list[str], NoDecode, BeforeValidator(_etcd_list)] = Field(
        default_factory=lambda: ["127.0.0.1:2379"],
        json_schema_extra={"expected": 'a non-empty list of "host:port" endpoints, like ["127.0.0.1:2379"]'},
    )
    embedded_etcd: bool = True
    etcd_peer_port: int = Field(0, ge=0, le=65535)
    lease_ttl: int = Field(5, ge=1, le=3600)
    etcd_user: str | None = None
    etcd_password: str | None = None
    etcd_ca: AbsPath | None = None
    etcd_cert: AbsPath | None = None
    etcd_key: AbsPath | None = None

    @field_validator("service")
    @classmethod
    def _service(cls, v: str) -> str:
        v = v.strip()
        if not v or v.startswith("/") or v.endswith("/") or any(c.isspace() for c in v):
            raise FieldError((), f'expected a non-empty etcd key prefix without a leading or trailing "/" '
                                 f"or spaces, like \"groupcache\", got {_show(v)}")
        return v

    @field_validator("etcd")
    @classmethod
    def _etcd(cls, v: list[str]) -> list[str]:
        if not v:
            raise FieldError((), 'expected at least one "host:port" endpoint, like ["127.0.0.1:2379"]')
        out = []
        for i, ep in enumerate(v):
            try:
                host, port = split_hostport(ep)
            except ValueError as e:
                raise FieldError((i,), str(e)) from None
            out.append(join_hostport(host, port))
        return out

    @model_validator(mode="after")
    def _pairs(self) -> ClusterSettings:
        if (self.etcd_user is None) != (self.etcd_password is None):
            missing = "etcd_password" if self.etcd_password is None else "etcd_user"
            raise FieldError((missing,), "expected etcd_user and etcd_password together (set both or neither)")
        if (self.etcd_cert is None) != (self.etcd_key is None):
            missing = "etcd_key" if self.etcd_key is None else "etcd_cert"
            raise FieldError((missing,), "expected etcd_cert and etcd_key together (set both or neither)")
        return self

    def endpoints(self) -> list[tuple[str, int]]:
        """The etcd endpoints as ``(host, port)`` pairs."""
        return [split_hostport(e) for e in self.etcd]


class NodeSettings(_Model):
    """This box: its worker processes and their limits."""

    workers: int = Field(3, ge=1, le=256)
    host: str = Field(
        "127.0.0.1",
        json_schema_extra={"expected": "a host name or IP address without a port (the port is base_port + i)"},
    )
    base_port: int = Field(9999, ge=1, le=65535)
    replicas: int = Field(50, ge=1)
    ring_hash: Annotated[Literal["seed", "groupcache"], BeforeValidator(_lower)] = "seed"
    max_key_bytes: int = Field(250, ge=1)
    max_group_bytes: int = Field(250, ge=1)
    max_value_bytes: ByteSize = Field(parse_bytes("4MiB"), gt=0)
    peer_timeout: Duration = Field(parse_duration("5s"), gt=0)
    drain_timeout: Duration = Field(parse_duration("10s"), ge=0)
    hot_cache_fraction: float = Field(0.125, ge=0, le=0.5)
    hot_cache_mirror: float = Field(0.1, ge=0, le=1)
    state_dir: AbsPath | None = None
    runtime_dir: AbsPath | None = None
    log_level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        h = v.strip()
        if h.startswith("[") and h.endswith("]"):
            h = h[1:-1]
        try:
            ipaddress.ip_address(h.split("%", 1)[0])
            return h
        except ValueError:
            pass
        if not h or not HOSTNAME.match(h):
            extra = " (the port is base_port + i)" if ":" in h else ""
            raise FieldError((), f"expected a host name or IP address without a port, got {_show(v)}{extra}")
        return h

    @model_validator(mode="after")
    def _port_range(self) -> NodeSettings:
        last = self.base_port + self.workers - 1
        if last > 65535:
            raise FieldError(
                ("base_port",),
                f"expected worker ports within 1..65535, but {self.workers} workers from "
                f"base_port {self.base_port} need ports up to {last}; lower base_port or workers",
            )
        return self

    @property
    def ports(self) -> range:
        """Worker i serves ``ports[i]``."""
        return range(self.base_port, self.base_port + self.workers)

    def address(self, i: int) -> str:
        """The ``host:port`` that worker ``i`` serves and advertises."""
        if not 0 <= i < self.workers:
            raise IndexError(f"worker {i} out of range 0..{self.workers - 1}")
        return join_hostport(self.host, self.base_port + i)

    def addresses(self) -> list[str]:
        return [self.address(i) for i in range(self.workers)]


class OpsSettings(_Model):
    """Operations: metrics, the HTTP read API, slow-load logging, rate limiting."""

    metrics_addr: str = Field(
        "127.0.0.1:9101",
        json_schema_extra={"expected": '"host:port" for the box\'s Prometheus endpoint, like "127.0.0.1:9101", or "" to disable it'},
    )
    metrics_tls: bool = False
    http_base_port: int = Field(0, ge=0, le=65535)
    slow_load: Duration = Field(parse_duration("1s"), ge=0)
    rate_limit: float = Field(0.0, ge=0)
    rate_burst: int = Field(0, ge=0)

    @field_validator("metrics_addr")
    @classmethod
    def _metrics_addr(cls, v: str) -> str:
        v = v.strip()
        if not v:
            return ""
        try:
            host, port = split_hostport(v)
        except ValueError as e:
            raise FieldError((), f'{e}, or "" to disable the metrics endpoint') from None
        return join_hostport(host, port)

    def metrics_endpoint(self) -> tuple[str, int] | None:
        """``(host, port)`` of the metrics endpoint, or None when disabled."""
        return split_hostport(self.metrics_addr) if self.metrics_addr else None

    def burst(self) -> int:
        """Tokens a client address may spend at once (rate_burst, or one second's worth)."""
        return self.rate_burst or max(1, int(self.rate_limit + 0.999999))


class TlsSettings(_Model):
    """TLS (and mTLS) on the data port, between peers, for clients and the HTTP API."""

    cert: AbsPath | None = None
    key: AbsPath | None = None
    ca: AbsPath | None = None
    client_auth: bool = False
    server_name: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.cert is None) != (self.key is None):
            missing = "key" if self.key is None else "cert"
            raise FieldError((missing,), "expected tls.cert and tls.key together (set both or neither)")
        if self.cert is None:
            for name in ("ca", "server_name"):
                if getattr(self, name):
                    raise FieldError((name,), f"tls.{name} applies only with tls.cert and tls.key (TLS is off without them)")
            if self.client_auth:
                raise FieldError(("client_auth",), "client_auth = true needs tls.cert, tls.key and tls.ca")
            return self
        if self.client_auth and self.ca is None:
            raise FieldError(("ca",), "client_auth = true needs tls.ca, the CA that signs client certificates")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is None:
                continue
            try:
                with open(path, "rb") as f:
                    head = f.read(4096)
            except OSError as e:
                raise FieldError((name,), f"cannot read {str(path)!r}: {e.strerror or e}") from None
            if b"-----BEGIN " not in head:
                raise FieldError((name,), f"expected a PEM file, {str(path)!r} has no \"-----BEGIN\" line")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert is not None


_HEADER_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_ENVVAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class GroupSettings(_Model):
    """One cache group: its budget, eviction, and where misses are loaded from."""

    cache_bytes: ByteSize = Field(parse_bytes("64MiB"), gt=0)
    policy: Annotated[Literal["lru", "lfu", "fifo"], BeforeValidator(_lower)] = "lru"
    ttl: Duration = Field(0.0, ge=0)
    origin: str = Field(json_schema_extra={"expected": grammar.EXPECTED})
    query: str | None = None
    timeout: Duration = Field(parse_duration("5s"), gt=0)
    max_concurrent_loads: int = Field(64, ge=1)
    headers: dict[str, str] = Field(default_factory=dict)
    headers_from_env: dict[str, str] = Field(default_factory=dict)
    demo_seed: bool = False

    @field_validator("origin")
    @classmethod
    def _origin(cls, v: str) -> str:
        try:
            return grammar.validate(v)
        except ValueError as e:
            raise FieldError((), str(e)) from None

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _HEADER_RE.match(name):
                raise FieldError((name,), f"expected an HTTP header name (letters, digits, '-'), got {_show(name)}")
        return v

    @field_validator("headers_from_env")
    @classmethod
    def _headers_from_env(cls, v: dict[str, str]) -> dict[str, str]:
        for name, var in v.items():
            if not _HEADER_RE.match(name):
                raise FieldError((name,), f"expected an HTTP header name (letters, digits, '-'), got {_show(name)}")
            if not _ENVVAR_RE.match(var):
                raise FieldError((name,), f"expected the name of an environment variable, got {_show(var)}")
        return v

    @model_validator(mode="after")
    def _origin_options(self) -> GroupSettings:
        kind = self.kind
        if kind == "sql":
            if self.query is None or not self.query.strip():
                raise FieldError(
                    ("query",),
                    'expected a SQL query for this SQL origin, with ":key" where the key goes, '
                    'like "SELECT value FROM items WHERE id = :key"',
                )
            if not re.search(r":key\b", self.query):
                raise FieldError(
                    ("query",), f'expected a query with the bind parameter ":key", got {_show(self.query)}'
                )
        elif self.query is not None:
            raise FieldError(("query",), f"query applies only to SQL origins; remove it for {_a(kind)} origin")
        if kind != "http":
            for name in ("headers", "headers_from_env"):
                if getattr(self, name):
                    raise FieldError((name,), f"{name} applies only to http(s) origins; remove it for {_a(kind)} origin")
        if self.demo_seed and not self.origin.lower().startswith("sqlite"):
            raise FieldError(("demo_seed",), "demo_seed applies only to sqlite origins; remove it or set it to false")
        return self

    @property
    def kind(self) -> grammar.Kind:
        """``"sql"``, ``"http"``, ``"file"`` or ``"python"``."""
        return grammar.kind(self.origin)


def _a(kind: str) -> str:
    return ("an " if kind in ("sql", "http") else "a ") + kind


def _group_names(v: Any) -> Any:
    if isinstance(v, Mapping):
        for name in v:
            if not isinstance(name, str) or not name or any(c.isspace() for c in name) or "/" in name:
                raise FieldError(
                    (str(name),), f'expected a group name without "/" or whitespace, got {_show(name)}'
                )
    return v


_toml_file: ContextVar[Path | None] = ContextVar("appliance_config_toml_file", default=None)


class Settings(BaseSettings):
    """The whole configuration. Sources, strongest first: keyword arguments,
    ``APPLIANCE_*`` environment variables, the TOML file given to
    ``load_settings`` (none when built directly), the defaults below."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        case_sensitive=False,
    )

    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)
    groups: Annotated[dict[str, GroupSettings], BeforeValidator(_group_names)] = Field(default_factory=dict)
    ops: OpsSettings = Field(default_factory=OpsSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets dir: an appliance should not read files from its cwd.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_file.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        limit = self.node.max_group_bytes
        for name in self.groups:
            n = len(name.encode())
            if n > limit:
                raise FieldError(("groups", name), f"expected a group name of at most node.max_group_bytes = {limit} bytes, got {n} bytes")
        ports = self.node.ports
        c = self.cluster
        if c.embedded_etcd:
            ehost, eport = split_hostport(c.etcd[0])
            if eport in ports and _may_share_ports(ehost, self.node.host):
                raise FieldError(
                    ("node", "base_port"),
                    f"worker ports {ports[0]}-{ports[-1]} clash with the embedded etcd's client port {eport} "
                    f"(cluster.etcd[0] = {c.etcd[0]}); move base_port or the etcd endpoint",
                )
            peer = c.etcd_peer_port
            if peer:
                if peer in ports and _may_share_ports(ehost, self.node.host):
                    raise FieldError(
                        ("cluster", "etcd_peer_port"),
                        f"etcd_peer_port {peer} clashes with the worker ports {ports[0]}-{ports[-1]}; "
                        "pick another port, or 0 for a free one",
                    )
                if peer == eport:
                    raise FieldError(
                        ("cluster", "etcd_peer_port"),
                        f"etcd_peer_port {peer} is the etcd client port (cluster.etcd[0] = {c.etcd[0]}); "
                        "pick another port, or 0 for a free one",
                    )
        self._ops_port_checks()
        return self

    def _ops_port_checks(self) -> None:
        """The HTTP API and metrics ports against each other, the workers and etcd."""
        n, o, c = self.node, self.ops, self.cluster
        http = self.http_ports()
        if http is not None and http[-1] > 65535:
            raise FieldError(
                ("ops", "http_base_port"),
                f"expected HTTP ports within 1..65535, but {n.workers} workers from http_base_port "
                f"{o.http_base_port} need ports up to {http[-1]}; lower http_base_port",
            )
        # (key, description, host, ports), checked pairwise.
        used: list[tuple[tuple[str, ...], str, str, range]] = [
            (("node", "base_port"), f"worker ports {_span(n.ports)}", n.host, n.ports)
        ]
        if c.embedded_etcd:
            ehost, eport = split_hostport(c.etcd[0])
            used.append((("cluster", "etcd"), f"the embedded etcd's client port {eport}", ehost, range(eport, eport + 1)))
            if c.etcd_peer_port:
                p = c.etcd_peer_port
                used.append((("cluster", "etcd_peer_port"), f"etcd_peer_port {p}", ehost, range(p, p + 1)))
        if http is not None:
            used.append((("ops", "http_base_port"), f"HTTP ports {_span(http)}", n.host, http))
        metrics = o.metrics_endpoint()
        if metrics is not None:
            mhost, mport = metrics
            used.append((("ops", "metrics_addr"), f"the metrics port {mport}", mhost, range(mport, mport + 1)))
        for i, (_, what_a, host_a, ports_a) in enumerate(used):
            for key, what_b, host_b, ports_b in used[i + 1:]:
                if key[0] != "ops":
                    continue  # worker/etcd clashes are reported above
                if set(ports_a) & set(ports_b) and _may_share_ports(host_a, host_b):
                    verb = "clash" if what_b.startswith("HTTP ports") else "clashes"
                    raise FieldError(key, f"{what_b} {verb} with {what_a}; pick ports that do not overlap")

    def http_ports(self) -> range | None:
        """Worker i serves the HTTP read API on ``http_ports()[i]``; None when off."""
        base = self.ops.http_base_port
        return range(base, base + self.node.workers) if base else None

    # ---- derived values -------------------------------------------------

    def state_path(self) -> Path:
        """node.state_dir, or the default (see ``default_state_dir``)."""
        return self.node.state_dir or default_state_dir()

    def runtime_path(self) -> Path:
        """node.runtime_dir, or the default (see ``default_runtime_dir``)."""
        return self.node.runtime_dir or default_runtime_dir()

    def admin_socket(self, index: int) -> Path:
        """Unix socket of worker ``index``'s admin service (the controller
        finds every ``worker-*.sock`` in the runtime dir)."""
        return self.runtime_path() / f"worker-{index}.sock"

    def expand_origin(self, group: str | GroupSettings) -> str:
        """The group's origin with ``{state_dir}`` replaced by the state
        directory (what ``build_origin`` loads from); ``{key}`` is left for
        each load."""
        g = self.groups[group] if isinstance(group, str) else group
        return grammar.expand(g.origin, self.state_path())

    def summary(self) -> str:
        """One line for humans (used by ``check_file``)."""
        n = self.node
        ports = n.ports
        port_text = f"{ports[0]}" if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"
        workers = f"{n.workers} worker{'s' if n.workers != 1 else ''} on {join_hostport(n.host, port_text)}"
        etcd = f"etcd {', '.join(self.cluster.etcd)}" + (" (embedded)" if self.cluster.embedded_etcd else "")
        if self.groups:
            parts = []
            for name, g in self.groups.items():
                extra = f", ttl {format_duration(g.ttl)}" if g.ttl else ""
                parts.append(f"{name} ({format_bytes(g.cache_bytes)} {g.policy}{extra}, {g.kind} origin)")
            groups = ", ".join(parts)
        else:
            groups = "none"
        ops = []
        if self.ops.metrics_addr:
            ops.append(f"metrics on {self.ops.metrics_addr}")
        http = self.http_ports()
        if http is not None:
            ops.append(f"HTTP API on {join_hostport(n.host, _span(http))}")
        if self.tls.enabled:
            ops.append("mTLS" if self.tls.client_auth else "TLS")
        if self.ops.rate_limit:
            ops.append(f"rate limit {self.ops.rate_limit:g}/s (burst {self.ops.burst()}) per client")
        extra = "; " + ", ".join(ops) if ops else ""
        return f"{workers}, {etcd}, groups: {groups}{extra}"


# --------------------------------------------------------------------------
# directories


def _span(ports: range) -> str:
    return f"{ports[0]}" if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"


def _first_dir(value: str | None) -> Path | None:
    """systemd sets $STATE_DIRECTORY to a colon-separated list; take the first."""
    if not value:
        return None
    first = value.split(":", 1)[0]
    return Path(first) if first and os.path.isabs(first) else None


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_state_dir(environ: Mapping[str, str] | None = None, root: bool | None = None) -> Path:
    """$STATE_DIRECTORY, else /var/lib/appliance as root, else
    $XDG_STATE_HOME/appliance, else ~/.local/state/appliance."""
    env = os.environ if environ is None else environ
    root = _is_root() if root is None else root
    p = _first_dir(env.get("STATE_DIRECTORY"))
    if p:
        return p
    if root:
        return Path("/var/lib/appliance")
    xdg = _first_dir(env.get("XDG_STATE_HOME"))
    if xdg:
        return xdg / "appliance"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "state" / "appliance"


def default_runtime_dir(environ: Mapping[str, str] | None = None, root: bool | None = None) -> Path:
    """$RUNTIME_DIRECTORY, else /run/appliance as root, else
    $XDG_RUNTIME_DIR/appliance, else /tmp/appliance-<uid>."""
    env = os.environ if environ is None else environ
    root = _is_root() if root is None else root
    p = _first_dir(env.get("RUNTIME_DIRECTORY"))
    if p:
        return p
    if root:
        return Path("/run/appliance")
    xdg = _first_dir(env.get("XDG_RUNTIME_DIR"))
    if xdg:
        return xdg / "appliance"
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(f"/tmp/appliance-{uid}")


def resolve_dirs(settings: Settings) -> Settings:
    """A copy with node.state_dir and node.runtime_dir filled in. Creates nothing."""
    node = settings.node.model_copy(
        update={"state_dir": settings.state_path(), "runtime_dir": settings.runtime_path()}
    )
    return settings.model_copy(update={"node": node})


# --------------------------------------------------------------------------
# finding and loading


def builtin_config_path() -> Path:
    """Path of the built-in default config shipped in the package."""
    ref = importlib.resources.files("appliance").joinpath(DEFAULT_CONFIG_RESOURCE)
    return Path(str(ref))


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to use: ``explicit``, else $APPLIANCE_CONFIG, else
    /etc/appliance/appliance.toml if it exists, else None (the built-in default).

    An explicit path or $APPLIANCE_CONFIG is returned even if the file is
    missing, so that loading it reports the problem.
    """
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG
    return None


@contextlib.contextmanager
def _builtin_file() -> Iterator[Path]:
    ref = importlib.resources.files("appliance").joinpath(DEFAULT_CONFIG_RESOURCE)
    with importlib.resources.as_file(ref) as p:
        yield Path(p)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read ``path`` (None: the built-in default), apply environment overrides,
    validate, and fill in the state and runtime directories.

    ``path`` is used as given; call ``find_config`` first to apply the search
    order. Raises ``ConfigError`` and nothing else for a bad configuration.
    """
    if path is None:
        with _builtin_file() as p:
            return _load_file(p)
    return _load_file(Path(path).expanduser())


def _load_file(path: Path) -> Settings:
    label = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"cannot read config file {label}: {reason}", path) from None
    try:
        file_data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label}: not UTF-8 text (byte {e.start})", path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_toml_error(label, raw.decode("utf-8"), e), path) from None

    token = _toml_file.set(path)
    try:
        settings = Settings()
    except ValidationError as e:
        raise ConfigError(_format_errors(e, label, file_data), path) from None
    except SettingsError as e:
        raise ConfigError(_env_decode_errors(e), path) from None
    except (OSError, tomllib.TOMLDecodeError) as e:  # the file changed under us
        raise ConfigError(f"cannot read config file {label}: {e}", path) from None
    finally:
        _toml_file.reset(token)
    return resolve_dirs(settings)


def check_file(path: str | os.PathLike[str] | None) -> str:
    """Validate a config file; return ``"OK: <summary>"`` or raise ``ConfigError``."""
    settings = load_settings(path)
    return f"OK: {settings.summary()}"


# --------------------------------------------------------------------------
# error messages


def _toml_error(label: str, text: str, e: Exception) -> str:
    msg = str(e)
    line = getattr(e, "lineno", None)
    col = getattr(e, "colno", None)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", msg)
    if m:
        line, col = int(m.group(1)), int(m.group(2))
        msg = msg[: m.start()]
    else:
        m = re.search(r"\s*\(at end of document\)\s*$", msg)
        if m:
            msg = msg[: m.start()]
            lines = text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
    msg = getattr(e, "msg", None) or msg
    if line is not None:
        return f"{label}: line {line}, column {col}: invalid TOML: {msg}"
    return f"{label}: invalid TOML: {msg}"


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            s = str(part)
            if not re.fullmatch(r"[A-Za-z0-9_-]+", s):
                s = json.dumps(s)
            out += ("." if out else "") + s
    return out


def _unwrap(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """Strip Annotated and Optional, collecting metadata."""
    metadata = list(metadata)
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *meta = get_args(annotation)
            metadata.extend(meta)
            continue
        if origin is Union or isinstance(annotation, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation, metadata


def _lookup(loc: tuple[Any, ...]) -> tuple[Any, list[Any], dict[str, Any], type[BaseModel] | None]:
    """Walk Settings along ``loc``.

    Returns (annotation, metadata, json_schema_extra, model holding the last
    key). The annotation is None when the path leaves the schema (e.g. an
    unknown key); the model is then the one that has no such key.
    """
    ann: Any = Settings
    meta: list[Any] = []
    extra: dict[str, Any] = {}
    parent: type[BaseModel] | None = None
    for part in loc:
        ann, _ = _unwrap(ann, [])
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            field: FieldInfo | None = ann.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None, [], {}, ann
            parent = ann
            ann, meta = field.annotation, list(field.metadata)
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        elif get_origin(ann) is dict:
            ann, meta, extra, parent = get_args(ann)[1], [], {}, None
        elif get_origin(ann) is list:
            ann, meta, extra, parent = get_args(ann)[0], [], {}, None
        else:
            return None, [], {}, None
    ann, more = _unwrap(ann, [])
    return ann, meta + more, extra, parent


def _bounds(meta: list[Any]) -> tuple[Any, Any, Any, Any]:
    ge = gt = le = lt = None
    for m in meta:
        if isinstance(m, Ge):
            ge = m.ge
        elif isinstance(m, Gt):
            gt = m.gt
        elif isinstance(m, Le):
            le = m.le
        elif isinstance(m, Lt):
            lt = m.lt
    return ge, gt, le, lt


def _range_text(meta: list[Any]) -> str:
    ge, gt, le, lt = _bounds(meta)
    lo = f"from {ge}" if ge is not None else (f"greater than {gt}" if gt is not None else "")
    hi = f"to {le}" if le is not None else (f"less than {lt}" if lt is not None else "")
    if ge is not None and le is not None:
        return f" from {ge} to {le}"
    if ge is not None and not hi:
        return f" of at least {ge}"
    if le is not None and not lo:
        return f" of at most {le}"
    parts = [p for p in (lo, hi) if p]
    return (" " + " and ".join(parts)) if parts else ""


def _describe(loc: tuple[Any, ...]) -> str:
    ann, meta, extra, _ = _lookup(loc)
    if extra.get("expected"):
        return str(extra["expected"])
    funcs = {getattr(m, "func", None) for m in meta}
    rng = _range_text(meta)
    if parse_bytes in funcs:
        return f'a size{rng} like "64MiB" or a number of bytes'
    if parse_duration in funcs:
        return f'a duration{rng} like "5s" or "500ms", or a number of seconds'
    if ann is bool:
        return "true or false"
    if ann is int:
        return f"an integer{rng}"
    if ann is float:
        return f"a number{rng}"
    if ann is str:
        return "a string"
    if ann is Path:
        return "an absolute path"
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in get_args(ann))
    if get_origin(ann) is list:
        return "a list"
    if get_origin(ann) is dict:
        val = get_args(ann)[1]
        if val is str:
            return "a table of strings"
        if val is GroupSettings:
            return "a table of groups, like [groups.scores]"
        return "a table"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        key = _dotted(loc)
        if ann is GroupSettings:
            return f"a table [{key}] with at least origin = …"
        return f"a table [{key}]" if key else "a table"
    return "a valid value"


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _error_lines(e: ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    out: list[tuple[tuple[Any, ...], str]] = []
    seen: set[tuple[Any, ...]] = set()
    for err in e.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        typ = err.get("type", "")
        ctx = err.get("ctx") or {}
        inp = err.get("input")
        cause = ctx.get("error")
        if isinstance(cause, FieldError):
            loc = loc + cause.loc
            if cause.message is None:
                msg = f"expected {_describe(loc)}, got {_show(inp)}"
            else:
                msg = cause.message
        elif typ == "extra_forbidden":
            _, _, _, parent = _lookup(loc)
            names = _field_names(parent) if parent is not None else []
            close = difflib.get_close_matches(str(loc[-1]), names, n=1) if names else []
            hint = f"did you mean {close[0]!r}? " if close else ""
            msg = f"unknown key ({hint}expected one of: {', '.join(names)})" if names else "unknown key"
        elif typ == "missing":
            msg = f"missing required key (expected {_describe(loc)})"
        elif typ == "value_error":
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            if not msg.startswith("expected") and "expected" not in msg:
                msg = f"expected {_describe(loc)}: {msg}"
        else:
            msg = f"expected {_describe(loc)}, got {_show(inp)}"
        if loc in seen:
            continue
        seen.add(loc)
        out.append((loc, msg))
    return out


def _env_values() -> dict[str, Any]:
    try:
        return EnvSettingsSource(Settings)()
    except Exception:
        return {}


def _from_env(loc: tuple[Any, ...], env_data: Mapping[str, Any]) -> bool:
    cur: Any = env_data
    for part in loc:
        if isinstance(cur, Mapping):
            key = part.lower() if isinstance(part, str) else part
            match = next((k for k in cur if (k.lower() if isinstance(k, str) else k) == key), None)
            if match is None:
                return False
            cur = cur[match]
        elif isinstance(cur, list) and isinstance(part, int):
            if not 0 <= part < len(cur):
                return False
            cur = cur[part]
        else:
            return True  # a raw env string that pydantic looked into
    return True


def _env_var_for(loc: tuple[Any, ...]) -> tuple[str, int] | None:
    """The environment variable that set ``loc`` (or a parent of it), and its depth."""
    want = [str(p).lower() for p in loc]
    best: tuple[str, int] | None = None
    for name in os.environ:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = _env_path(name)
        if want[: len(path)] == path and (best is None or len(path) > best[1]):
            best = (name, len(path))
    return best


def _in_data(loc: tuple[Any, ...], data: Mapping[str, Any]) -> bool:
    cur: Any = data
    for part in loc:
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        else:
            return False
    return True


def _format_errors(e: ValidationError, label: str, file_data: Mapping[str, Any] | None = None) -> list[str]:
    have_env = any(n.upper().startswith(ENV_PREFIX) for n in os.environ)
    env_data = _env_values() if have_env else {}
    lines = []
    for loc, msg in _error_lines(e):
        key = _dotted(loc)
        source = label
        if have_env:
            if msg.startswith("missing required key"):
                # Blame the env only when it alone created the table that lacks the key.
                parent = loc[:-1]
                if parent and _from_env(parent, env_data) and not (
                    file_data is not None and _in_data(parent, file_data)
                ):
                    names = sorted(n for n in os.environ if _env_path(n)[: len(parent)] == [str(p).lower() for p in parent])
                    if names:
                        source = ", ".join(names)
            elif _from_env(loc, env_data):
                var = _env_var_for(loc)
                if var is not None:
                    if var[1] == len(loc):
                        lines.append(f"{var[0]}: {msg}")
                        continue
                    source = var[0]
        lines.append(f"{source}: {key}: {msg}" if key else f"{source}: {msg}")
    return lines


def _env_path(name: str) -> list[str]:
    if not name.upper().startswith(ENV_PREFIX):
        return []
    return name[len(ENV_PREFIX):].lower().split(ENV_DELIMITER)


def _env_decode_errors(e: SettingsError) -> list[str]:
    """A complex env value (table or list) that is not valid JSON."""
    lines = []
    for name, value in os.environ.items():
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV:
            continue
        loc = tuple(name[len(ENV_PREFIX):].lower().split(ENV_DELIMITER))
        ann, _, _, _ = _lookup(loc)
        complex_ = get_origin(ann) in (dict, list) or (isinstance(ann, type) and issubclass(ann, BaseModel))
        if not complex_:
            continue
        try:
            json.loads(value)
        except ValueError as err:
            lines.append(f"{name}: expected a JSON {'list' if get_origin(ann) is list else 'object'} "
                         f"({err.msg} at column {err.colno}), got {_show(value)}")
    return lines or [f"environment: {e}"]
