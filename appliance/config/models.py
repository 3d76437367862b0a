"""The settings models (design contract 4) and their cross-checks.

``Settings`` holds ``ClusterSettings``, ``NodeSettings``, ``GroupSettings``
(one per group), ``OpsSettings`` and ``TlsSettings``. ``Settings(...)`` with
keyword arguments builds one from code (environment variables still apply,
keyword arguments win; no file is read). ``appliance.config.load`` reads the
TOML file.

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
from ..addr import is_loopback as _is_loopback
from ..addr import join as join_hostport
from ..addr import split as split_hostport
from ..origins import grammar
from ..quoting import show
from ..tokens import TokenFileError, read_token
from ..units import ByteSize, Duration, format_bytes, format_duration, parse_bytes, parse_duration
from . import dirs
from .backend import choose
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
    "resolve_dirs",
]

# A stopping worker drains (drain_timeout), then gives calls in flight
# peer_timeout; this is what its process may take beyond the two.
STOP_MARGIN = 5.0
# What an etcd others can write gives them (appended to etcd_warning).
ETCD_EXPOSES = (
    "; a member key whose address does not prove the cluster token stays out of the ring "
    "(groupcache_controller_unproven_members) and never receives the token, but such a client can delete "
    "workers' keys (taking them out of the ring), and Clients that follow etcd dial any address a key names"
)
SEED_ETCD_EXPOSES = (
    "; with seed_interop a member joins unproven (the seed's Go nodes cannot prove the cluster token), so a "
    "fake member owns a share of the keys and may answer forwards with values of its choosing; it never "
    "receives the token"
)


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


def seed_accepts(host: str) -> bool:
    """Whether the seed's Go nodes accept host:port as a node address: its
    utils.ValidPerrAddr wants "localhost" or a first label of 4 characters."""
    first = host.split(".", 1)[0]
    return ":" not in host and (first == "localhost" or len(first) == 4)


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
        limit = self.node.max_group_bytes
        for name in self.groups:
            n = len(name.encode())
            if n > limit:
                raise FieldError(
                    ("groups", name),
                    f"expected a group name of at most node.max_group_bytes = {limit} bytes, got {n} bytes",
                )
        ports = self.node.ports
        c = self.cluster
        if c.embedded_etcd and len(c.etcd) > 1:
            hosts = [h for h, _ in c.endpoints()]
            if len(set(hosts)) != len(hosts):
                raise FieldError(
                    ("cluster", "etcd"), "expected one endpoint per box (hosts differ) for an embedded etcd cluster"
                )
            if self.node.host not in hosts:
                raise FieldError(
                    ("node", "host"),
                    f"with several cluster.etcd endpoints and embedded_etcd, each box runs the member whose "
                    f"endpoint host is its node.host; node.host {self.node.host!r} is none of "
                    f"{', '.join(c.etcd)}",
                )
        if c.embedded_etcd:
            member = self.etcd_member_endpoint()
            ehost, eport = split_hostport(member)
            if eport in ports and _may_share_ports(ehost, self.node.host):
                raise FieldError(
                    ("node", "base_port"),
                    f"worker ports {ports[0]}-{ports[-1]} clash with the embedded etcd's client port {eport} "
                    f"({member}); move base_port or the etcd endpoint",
                )
            peer = self.etcd_peer_port()  # 2380 for a cluster unless set
            if peer:
                where = "etcd_peer_port" if c.etcd_peer_port else "the etcd cluster's peer port (etcd_peer_port = 0)"
                if peer in ports and _may_share_ports(ehost, self.node.host):
                    raise FieldError(
                        ("cluster", "etcd_peer_port"),
                        f"{where} {peer} clashes with the worker ports {ports[0]}-{ports[-1]}; "
                        "pick another port" + ("" if self.etcd_clustered() else ", or 0 for a free one"),
                    )
                if peer == eport:
                    raise FieldError(
                        ("cluster", "etcd_peer_port"),
                        f"{where} {peer} is the etcd client port ({member}); "
                        "pick another port" + ("" if self.etcd_clustered() else ", or 0 for a free one"),
                    )
        if self.cluster.seed_interop and not seed_accepts(self.node.host):
            raise FieldError(
                ("node", "host"),
                f"cluster.seed_interop needs a host the seed's Go nodes accept (utils.ValidPerrAddr): "
                f'"localhost" or a name whose first label has 4 characters, like "box1"; got {self.node.host!r}',
            )
        if not self.tls.enabled and not c.plaintext_peers and not _is_loopback(self.node.host):
            raise FieldError(
                ("node", "host"),
                f"node.host {self.node.host!r} is reachable from other machines and [tls] is off: peers would send "
                "the cluster token (with every call) and every value in clear; set [tls] cert, key and ca, or, on "
                "a network you trust, [cluster] plaintext_peers = true",
            )
        for name, cred in self.auth.credentials.items():
            if cred.tls_identity is not None and not self.tls.client_auth:
                raise FieldError(
                    ("auth", "credentials", name, "tls_identity"),
                    "a tls_identity is checked only with mTLS: set [tls] client_auth = true (and tls.ca)",
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
            ehost, eport = split_hostport(self.etcd_member_endpoint())
            used.append(
                (("cluster", "etcd"), f"the embedded etcd's client port {eport}", ehost, range(eport, eport + 1))
            )
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
            for key, what_b, host_b, ports_b in used[i + 1 :]:
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
        """node.state_dir, or the default (see ``dirs.default_state_dir``)."""
        return self.node.state_dir or dirs.default_state_dir()

    def runtime_path(self) -> Path:
        """node.runtime_dir, or the default (see ``dirs.default_runtime_dir``)."""
        return self.node.runtime_dir or dirs.default_runtime_dir()

    def etcd_clustered(self) -> bool:
        """Whether this box runs one member of a cluster of embedded etcds
        (several endpoints, one per box)."""
        return self.cluster.embedded_etcd and len(self.cluster.etcd) > 1

    def etcd_member_endpoint(self) -> str:
        """The client endpoint this box's embedded etcd serves: the one whose
        host is node.host in a cluster, else etcd[0]."""
        c = self.cluster
        if self.etcd_clustered():
            return next(e for e in c.etcd if split_hostport(e)[0] == self.node.host)
        return c.etcd[0]

    def etcd_peer_port(self) -> int:
        """The members' peer port: etcd_peer_port, or 2380 for a cluster (0
        for one box: a free port at each start)."""
        return self.cluster.etcd_peer_port or (2380 if self.etcd_clustered() else 0)

    def etcd_member_name(self, host: str) -> str:
        """The etcd member name of the box whose node.host is `host`."""
        return f"appliance-{host}"

    def etcd_peer_url(self, host: str) -> str:
        """The peer URL of the member on `host` (https when the cluster uses TLS)."""
        scheme = "https" if self.etcd_clustered() and self.tls.enabled else "http"
        return f"{scheme}://{join_hostport(host, self.etcd_peer_port())}"

    def etcd_tls(self) -> tuple[Path | None, Path | None, Path | None] | None:
        """(ca, cert, key) to talk to etcd over TLS, or None: the cluster's
        own etcd_ca/etcd_cert/etcd_key, else, for an embedded cluster with
        [tls], the box's [tls] files (its members serve TLS with them)."""
        c = self.cluster
        if c.etcd_ca or c.etcd_cert:
            return c.etcd_ca, c.etcd_cert, c.etcd_key
        if self.etcd_clustered() and self.tls.enabled:
            return self.tls.ca, self.tls.cert, self.tls.key
        return None

    def private_etcd(self) -> bool:
        """Whether the embedded etcd serves this box alone: then it listens on
        unix sockets in the runtime directory (0700) and on no TCP port, so
        no other local user can join the ring. The seed's Go nodes need TCP."""
        c = self.cluster
        return c.embedded_etcd and c.etcd_private and len(c.etcd) == 1 and not c.seed_interop

    def etcd_socket(self) -> Path | None:
        """The embedded etcd's client socket when it is private, else None."""
        return self.runtime_path() / dirs.ETCD_DIR / dirs.ETCD_CLIENT_SOCKET if self.private_etcd() else None

    def secret_problems(self) -> list[str]:
        """What is wrong with the token files, one line each (checked by
        `config check` and `appliance run`, which read them; loading the
        config does not, so users without access to them can still load it)."""
        out = []
        files = [(f"auth.credentials.{n}.token_file", c.token_file) for n, c in self.auth.credentials.items()]
        if self.auth.token_file is not None:
            files.append(("auth.token_file", self.auth.token_file))
        for key, path in files:
            if path is None:
                continue
            try:
                read_token(path)
            except TokenFileError as exc:
                out.append(f"{key}: {exc}")
        return out

    def token_path(self) -> Path:
        """auth.token_file, or the one `appliance run` makes in the state dir."""
        return self.auth.token_file or self.state_path() / dirs.TOKEN_FILE

    def admin_socket(self, index: int) -> Path:
        """Unix socket of worker ``index``'s admin service."""
        return self.runtime_path() / dirs.admin_socket_name(index)

    def admin_sockets(self) -> list[str]:
        """The admin sockets present in the runtime dir now (workers that run, or ran)."""
        return sorted(str(p) for p in self.runtime_path().glob(dirs.admin_socket_glob()))

    def expand_origin(self, group: str | GroupSettings) -> str:
        """The group's origin with ``{state_dir}`` replaced by the state
        directory (what ``build_origin`` loads from); ``{key}`` is left for
        each load."""
        g = self.groups[group] if isinstance(group, str) else group
        return grammar.expand(g.origin, self.state_path())

    def notes(self) -> list[str]:
        """Lines for `appliance config check` beyond the summary: what the
        settings do not show by themselves."""
        out = [w for w in (self.etcd_warning(), self.token_warning()) if w]
        if self.auth.writes == "open":
            out.append("writes are open: any client that reaches a data port can Set and Remove values")
        if self.cluster.seed_interop or (self.node.host == "localhost"):
            out.append(
                "mixed cluster with the seed's Go nodes: every member named localhost:P or with a 4-character "
                'first label, ring_hash = "seed" and replicas = 50 on both sides, etcd without auth or TLS, '
                "cluster.seed_interop = true, and Go nodes restarted after each membership change "
                "(they read clusters/ once, at start)"
                + ("" if self.cluster.seed_interop else "; seed_interop is off here")
            )
        return out

    def token_warning(self) -> str | None:
        """What a box-made cluster token means when there are several boxes
        (logged at start and printed by `config check`)."""
        if self.auth.token_file is not None:
            return None
        if self.etcd_clustered():
            return (
                "each box makes its own cluster token: set [auth] token_file to the same 0600 file on every box, "
                "or the boxes keep each other's workers out of the ring (they cannot prove the token to each other)"
            )
        if not self.cluster.embedded_etcd:
            return "if several boxes share this etcd, set [auth] token_file to the same 0600 file on every box"
        return None

    def etcd_warning(self) -> str | None:
        """What an etcd anyone can write means, if this one is such (logged at
        start and printed by `config check`): the line says what it exposes."""
        warning = self._open_etcd()
        if not warning:
            return None
        return f"{warning}{SEED_ETCD_EXPOSES if self.cluster.seed_interop else ETCD_EXPOSES}"

    def _open_etcd(self) -> str | None:
        c = self.cluster
        if self.private_etcd():
            return None
        if self.etcd_clustered():
            if c.etcd_user is not None or (self.tls.enabled and self.tls.ca and self.tls.client_auth):
                return None
            if self.tls.enabled:
                return (
                    "the embedded etcd cluster takes clients without a certificate (tls.client_auth is off): "
                    "any etcd client that reaches it can write the ring's member keys"
                )
            return (
                "the embedded etcd cluster serves TCP without TLS or auth: "
                "any etcd client can write the ring's member keys"
            )
        if c.embedded_etcd:
            where = (
                "the embedded etcd listens on TCP (for the seed's Go nodes)"
                if c.seed_interop
                else ("the embedded etcd listens on TCP (etcd_private = false) without auth")
            )
            if c.etcd_user is None and c.etcd_cert is None:
                return f"{where}: any etcd client can write the ring's member keys"
            return None
        if c.etcd_user is None and c.etcd_cert is None:
            return "the external etcd is used without TLS or auth: any etcd client can write the ring's member keys"
        return None

    def summary(self) -> str:
        """One line for humans (used by ``check_file``)."""
        n = self.node
        ports = n.ports
        port_text = f"{ports[0]}" if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"
        workers = f"{n.workers} worker{'s' if n.workers != 1 else ''} on {join_hostport(n.host, port_text)}"
        if self.private_etcd():
            etcd = "etcd embedded, private (a unix socket in the runtime directory)"
        elif self.etcd_clustered():
            etcd = (
                f"etcd cluster of {len(self.cluster.etcd)} embedded members ({', '.join(self.cluster.etcd)}; "
                f"this box's: {self.etcd_member_endpoint()}, peer port {self.etcd_peer_port()}"
                + (", TLS" if self.etcd_tls() else "")
                + ")"
            )
        else:
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
        a = self.auth
        creds = ", ".join(f"{name} [{', '.join(c.scopes)}]" for name, c in a.credentials.items())
        ops.append(f"writes {a.writes}, reads {a.reads}" + (f" (credentials: {creds})" if creds else ""))
        extra = "; " + ", ".join(ops) if ops else ""
        return f"{workers}, {etcd}, groups: {groups}{extra}; server: {self.server_choice()}"

    def server_choice(self) -> str:
        """Which server backend the workers will run, and why."""
        try:
            backend, why = choose(self)
        except (RuntimeError, ValueError) as exc:
            return f"none ({exc})"
        return f"{backend} ({why})"


def _span(ports: range) -> str:
    return f"{ports[0]}" if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"


def resolve_dirs(settings: Settings) -> Settings:
    """A copy with node.state_dir and node.runtime_dir filled in. Creates nothing."""
    node = settings.node.model_copy(update={"state_dir": settings.state_path(), "runtime_dir": settings.runtime_path()})
    return settings.model_copy(update={"node": node})
