"""TLS and mTLS from the `[tls]` table: credentials for gRPC and SSL contexts for HTTP.

One certificate per box (or per node) serves three roles:

* the data port's server certificate (`grpc.ssl_server_credentials`); with
  ``client_auth = true`` the port accepts only clients whose certificate the
  CA signed (mTLS);
* the client certificate a node presents when it forwards a Get to a peer,
  and that the CLI presents (the box's config holds the paths);
* the HTTP read API's (and, with ``ops.metrics_tls``, the metrics
  endpoint's) certificate, so that no data surface is left in clear text.

Peers dial `host:port` from the ring, so the certificate must name the
node's ``host`` (an IP SAN for an address, a DNS SAN for a name), or set
``server_name`` to the one name every node's certificate carries. Give the
certificates both the serverAuth and the clientAuth extended key usage (or
none) when ``client_auth`` is on, since nodes are clients of each other.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from .config import TlsSettings

# Each function takes the [tls] table, or None (some callers have no settings).


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def server_credentials(tls: TlsSettings | None) -> grpc.ServerCredentials | None:
    """Credentials for the data port; None when TLS is off."""
    if tls is None or not tls.enabled:
        return None
    return grpc.ssl_server_credentials(
        [(_read(tls.key), _read(tls.cert))],
        root_certificates=_read(tls.ca) if tls.client_auth else None,
        require_client_auth=bool(tls.client_auth),
    )


class TlsFiles:
    """The PEM files behind channel credentials, for the engine's client
    (rustls reads files; grpc's credentials objects are opaque). `ca` None
    means the system's roots, which only grpc's client trusts."""

    def __init__(self, ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None) -> None:
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs both cert and key")
        self.ca = str(ca) if ca else None
        self.cert = str(cert) if cert else None
        self.key = str(key) if key else None


def files_of(credentials: grpc.ChannelCredentials | None) -> TlsFiles | None:
    """The files behind credentials this module made (None for others)."""
    return getattr(credentials, "tls_files", None)


def _with_files(credentials: grpc.ChannelCredentials, files: TlsFiles) -> grpc.ChannelCredentials:
    credentials.tls_files = files
    return credentials


def channel_credentials(tls: TlsSettings | None) -> grpc.ChannelCredentials | None:
    """Credentials to dial nodes (peers, the CLI, Client.from_settings);
    None when TLS is off. The node's own certificate doubles as the client
    certificate, which mTLS needs and plain TLS ignores."""
    if tls is None or not tls.enabled:
        return None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca), private_key=_read(tls.key), certificate_chain=_read(tls.cert)
    )
    return _with_files(credentials, TlsFiles(tls.ca, tls.cert, tls.key))


def channel_options(tls: TlsSettings | None) -> list[tuple[str, object]]:
    """Extra channel options: the name to expect in the nodes' certificates."""
    if tls is not None and tls.enabled and tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []


def server_ssl_context(tls: TlsSettings | None) -> ssl.SSLContext | None:
    """An SSL context for an HTTP server (the read API, metrics); None when TLS is off."""
    if tls is None or not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.client_auth:
        context.load_verify_locations(cafile=str(tls.ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def credentials_from_files(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials for applications: `Client(peers, credentials=...)`.

    ``ca`` None trusts the system's roots; ``cert`` and ``key`` are needed
    only when the nodes require client certificates."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(Path(ca)) if ca else None,
        private_key=_read(Path(key)) if key else None,
        certificate_chain=_read(Path(cert)) if cert else None,
    )
    return _with_files(credentials, TlsFiles(ca, cert, key))
