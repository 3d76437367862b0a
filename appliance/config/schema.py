"""The settings schema (design contract 4): the tables, their fields and the validation parsing does.

``Settings`` holds ``ClusterSettings``, ``NodeSettings``, ``GroupSettings``
(one per group), ``OpsSettings``, ``TlsSettings`` and ``AuthSettings``.
``Settings(...)`` with keyword arguments builds one from code (environment
variables still apply, keyword arguments win; no file is read).
``appliance.config.load`` reads the TOML file.

Each table validates its own keys; what only the tables together can break
(a port used twice, the etcd topology, TLS off loopback) is ``checks``,
Settings' last validator. A table keeps the small values derived from it
alone (``NodeSettings.ports``, ``TlsSettings.enabled``); what the settings
imply across tables (ports, endpoints, paths) is ``layout``, and what
``config check`` says of them is ``report``.

Validators say what they expected in their messages; ``FieldError`` lets
one point at a key below the model it checks.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ..addr import HOSTNAME
from ..addr import join as join_hostport
from ..addr import split as split_hostport
from ..origins import grammar
from ..quoting import show
from ..units import ByteSize, Duration, parse_bytes, parse_duration
from . import checks
from .problems import ENV_DELIMITER, ENV_PREFIX, FieldError

__all__ = [
    "AuthSettings",
    "ClusterSettings",
    "CredentialSettings",
    "GroupSettings",
    "NodeSettings",
    "OpsSettings",
    "Settings",
    "TlsSettings",
]

# A stopping worker drains (drain_timeout), then gives calls in flight
# peer_timeout; this is what its process may take beyond the two.
STOP_MARGIN = 5.0


def _lower(v: Any) -> Any:
    return v.strip().lower() if isinstance(v, str) else v


def _server(v: Any) -> Any:
    v = _lower(v)
    if v == "native":
        raise ValueError('"native" (pygrpc-native) was removed: the engine serves what it did; use "auto" or "engine"')
    return v


def _path(v: Any) -> Any:
    """Expand ``~``; the path must then be absolute (services do not share a cwd)."""
    if v is None or v == "":
        return None
    if isinstance(v, (str, Path)):
        p = Path(v).expanduser()
        if not p.is_absolute():
            raise ValueError(f"expected an absolute path (or one starting with ~), got {show(str(v))}")
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
                raise ValueError(f'expected a JSON list like ["127.0.0.1:2379"], got {show(v)}') from None
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
        description='a non-empty etcd key prefix without a leading or trailing "/", like "groupcache"',
    )
    etcd: Annotated[list[str], NoDecode, BeforeValidator(_etcd_list)] = Field(
        default_factory=lambda: ["127.0.0.1:2379"],
        description='a non-empty list of "host:port" endpoints, like ["127.0.0.1:2379"]',
    )
    embedded_etcd: bool = True
    # The embedded etcd of one box listens on unix sockets only (0700). False:
    # on TCP at etcd[0] too, for other boxes or tools (then use etcd TLS/auth).
    etcd_private: bool = True
    etcd_peer_port: int = Field(0, ge=0, le=65535)
    lease_ttl: int = Field(5, ge=1, le=3600)
    # This etcd also serves the seed's Go nodes (a mixed cluster): each worker
    # also keeps "clusters/<host:port>" (the peer list a Go node reads once,
    # at start).
    seed_interop: bool = False
    # Peers on other machines talk without TLS: the cluster token (sent with
    # every peer call) and every value cross the network in clear. Only for
    # a network you trust; otherwise a non-loopback node.host needs [tls].
    plaintext_peers: bool = False
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
            raise FieldError(
                (),
                f'expected a non-empty etcd key prefix without a leading or trailing "/" '
                f'or spaces, like "groupcache", got {show(v)}',
            )
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
        description="a host name or IP address without a port (the port is base_port + i)",
    )
    base_port: int = Field(9999, ge=1, le=65535)
    replicas: int = Field(50, ge=1)
    ring_hash: Annotated[Literal["seed", "groupcache"], BeforeValidator(_lower)] = "seed"
    max_key_bytes: int = Field(250, ge=1)
    max_group_bytes: int = Field(250, ge=1)
    max_value_bytes: ByteSize = Field(parse_bytes("4MiB"), gt=0)
    peer_timeout: Duration = Field(parse_duration("5s"), gt=0)
    drain_timeout: Duration = Field(parse_duration("10s"), ge=0)
    # Membership changes keep the cache warm: a planned stop hands its main
    # cache (at most handoff_bytes, within handoff_timeout and the drain) to
    # the keys' new owners; for peek_window after a ring change a miss first
    # asks the key's previous owner (peek_timeout). 0 turns each off.
    handoff_bytes: ByteSize = Field(parse_bytes("256MiB"), ge=0)
    handoff_timeout: Duration = Field(parse_duration("5s"), ge=0)
    peek_window: Duration = Field(parse_duration("20s"), ge=0)
    peek_timeout: Duration = Field(parse_duration("250ms"), gt=0)
    hot_cache_fraction: float = Field(0.125, ge=0, le=0.5)
    hot_cache_mirror: float = Field(0.1, ge=0, le=1)
    # How a value fetched from its owner earns a hot copy: "rate" (its
    # request rate beats the coldest hot entry's) or "random" (with
    # probability hot_cache_mirror). hot_cache_mirror = 0 turns hot copies off.
    hot_cache_promotion: Annotated[Literal["rate", "random"], BeforeValidator(_lower)] = "rate"
    # Answers of a Peer/Forward stream not yet taken by the caller; past it
    # no more requests are read from that stream (memory stays bounded).
    forward_window: int = Field(256, ge=1, le=65536)
    state_dir: AbsPath | None = None
    runtime_dir: AbsPath | None = None
    log_level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    # Which gRPC server library serves the data port (appliance.fronts).
    server: Annotated[Literal["auto", "engine", "grpcio"], BeforeValidator(_server)] = "auto"
    # Limits the engine enforces at the socket (server = "engine").
    max_concurrent_streams: int = Field(1024, ge=1, le=2**31 - 1)
    max_header_list_size: ByteSize = Field(parse_bytes("16KiB"), ge=1024, le=2**31 - 1)
    max_connections: int = Field(4096, ge=1)

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
            raise FieldError((), f"expected a host name or IP address without a port, got {show(v)}{extra}")
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

    @property
    def fence_window(self) -> float:
        """How long a Remove or Set refuses handed-off and peeked values: the
        longest such a value travels, plus the longest a fan-out lags."""
        return max(self.handoff_timeout, self.peek_timeout) + self.peer_timeout + 1.0

    @property
    def stop_grace(self) -> float:
        """Seconds a worker may take from SIGTERM to exit: the drain, the
        grace for calls in flight, and a margin. The supervisor kills it after."""
        return self.drain_timeout + self.peer_timeout + STOP_MARGIN


class OpsSettings(_Model):
    """Operations: metrics, the HTTP read API, slow-load logging, rate limiting."""

    metrics_addr: str = Field(
        "127.0.0.1:9101",
        description='"host:port" for the box\'s Prometheus endpoint, like "127.0.0.1:9101", or "" to disable it',
    )
    metrics_tls: bool = False
    # Scrapes served at once (one thread each); more connections are closed
    # at once. A connection idle this long is closed. Workers are asked at
    # most once a second whatever the scrape rate.
    metrics_connections: int = Field(4, ge=1, le=1024)
    http_base_port: int = Field(0, ge=0, le=65535)
    # An HTTP API connection idle this long between requests is closed.
    http_idle_timeout: Duration = Field(parse_duration("15s"), gt=0)
    # HTTP API connections open at once per worker; more are closed at accept
    # (they share the worker's file descriptors with the data port).
    http_max_connections: int = Field(256, ge=1, le=65536)
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
                    raise FieldError(
                        (name,), f"tls.{name} applies only with tls.cert and tls.key (TLS is off without them)"
                    )
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
                raise FieldError((name,), f'expected a PEM file, {str(path)!r} has no "-----BEGIN" line')
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
    origin: str = Field(description=grammar.EXPECTED)
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
                raise FieldError((name,), f"expected an HTTP header name (letters, digits, '-'), got {show(name)}")
        return v

    @field_validator("headers_from_env")
    @classmethod
    def _headers_from_env(cls, v: dict[str, str]) -> dict[str, str]:
        for name, var in v.items():
            if not _HEADER_RE.match(name):
                raise FieldError((name,), f"expected an HTTP header name (letters, digits, '-'), got {show(name)}")
            if not _ENVVAR_RE.match(var):
                raise FieldError((name,), f"expected the name of an environment variable, got {show(var)}")
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
                raise FieldError(("query",), f'expected a query with the bind parameter ":key", got {show(self.query)}')
        elif self.query is not None:
            raise FieldError(("query",), f"query applies only to SQL origins; remove it for {_a(kind)} origin")
        if kind != "http":
            for name in ("headers", "headers_from_env"):
                if getattr(self, name):
                    raise FieldError(
                        (name,), f"{name} applies only to http(s) origins; remove it for {_a(kind)} origin"
                    )
        if self.demo_seed and not self.origin.lower().startswith("sqlite"):
            raise FieldError(("demo_seed",), "demo_seed applies only to sqlite origins; remove it or set it to false")
        return self

    @property
    def kind(self) -> grammar.Kind:
        """``"sql"``, ``"http"``, ``"file"`` or ``"python"``."""
        return grammar.kind(self.origin)


SCOPES = ("read", "write")


def _read_scope() -> list[Literal["read", "write"]]:
    return ["read"]


class CredentialSettings(_Model):
    """One named credential: a bearer token (from a file) or a client
    certificate identity (with mTLS), and what it may do."""

    token_file: AbsPath | None = Field(
        None, description="an absolute path to a file holding the bearer token (mode 0600, at least 16 characters)"
    )
    tls_identity: str | None = Field(
        None,
        description="a client certificate's subject common name or a DNS/URI/email subject alternative name "
        "(needs [tls] client_auth = true)",
    )
    scopes: list[Literal["read", "write"]] = Field(
        default_factory=_read_scope, description='a list of scopes: "read", "write"'
    )

    @model_validator(mode="after")
    def _one_kind(self) -> CredentialSettings:
        if (self.token_file is None) == (self.tls_identity is None):
            raise FieldError((), "expected token_file or tls_identity (one of them, not both)")
        if not self.scopes:
            raise FieldError(("scopes",), 'expected at least one scope: "read", "write"')
        return self


class AuthSettings(_Model):
    """Who may change (and read) what the cache serves, on the data port and
    the HTTP API."""

    # "authenticated": Set and Remove need a credential with the write scope.
    writes: Annotated[Literal["authenticated", "open"], BeforeValidator(_lower)] = "authenticated"
    # "authenticated": Get, GetMany and the HTTP API need the read scope too.
    reads: Annotated[Literal["open", "authenticated"], BeforeValidator(_lower)] = "open"
    # The box's (or, copied to each box, the cluster's) own token: peers send
    # it to each other and the CLI uses it. None: <state_dir>/auth/cluster.token,
    # made at the first `appliance run`.
    token_file: AbsPath | None = None
    credentials: dict[str, CredentialSettings] = Field(
        default_factory=dict, description="a table of named credentials, like [auth.credentials.app]"
    )

    @field_validator("credentials")
    @classmethod
    def _names(cls, v: dict[str, CredentialSettings]) -> dict[str, CredentialSettings]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise FieldError(
                    (name,), f"expected a credential name of letters, digits, '.', '_' or '-', got {show(name)}"
                )
        return v


def _a(kind: str) -> str:
    return ("an " if kind in ("sql", "http") else "a ") + kind


def _group_names(v: Any) -> Any:
    if isinstance(v, Mapping):
        for name in v:
            if not isinstance(name, str) or not name or any(c.isspace() for c in name) or "/" in name:
                raise FieldError((str(name),), f'expected a group name without "/" or whitespace, got {show(name)}')
    return v


class Settings(BaseSettings):
    """The whole configuration. Sources, strongest first: keyword arguments,
    ``APPLIANCE_*`` environment variables, the defaults below. (Loaded from a
    file, the file's contents come after the environment: see
    ``appliance.config.load``.)"""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        case_sensitive=False,
    )

    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)
    groups: Annotated[dict[str, GroupSettings], BeforeValidator(_group_names)] = Field(
        default_factory=dict, description="a table of groups, like [groups.scores]"
    )
    ops: OpsSettings = Field(default_factory=OpsSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)

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
        return init_settings, env_settings

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        checks.cross_checks(self)
        return self
