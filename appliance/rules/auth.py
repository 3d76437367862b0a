"""Who a caller is, and whether it may do what it asks ([auth]).

Credentials are bearer tokens (sent as `authorization: Bearer <token>`
metadata, or the same HTTP header) and, with mTLS, client certificate
identities (subject CN or a subject alternative name). The box's own token
(`Layout.token_path()`, made by `appliance run`) may read and write; the
CLI sends it, and peers prove it to each other without sending it
(`GC-Proof`, peer_proofs.py).

Tokens are kept only as SHA-256 digests and a presented token is compared,
in constant time (hmac.compare_digest), against every known digest, so
neither a match nor where it is in the list shows in the timing. Nothing
here logs, returns or puts in an error the token itself.

grpc-free: the transports pass what they read off a call (`Credentials`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..cache import errors
from ..tokens import read_token
from .peer_proofs import SCHEME as PROOF_SCHEME
from .peer_proofs import WRITE, PeerProofs, ProofError

if TYPE_CHECKING:
    from ..config import AuthSettings

CLUSTER = "cluster"  # the principal of the box's own token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclasses.dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a call carried: its `authorization` value and its certificate identities."""

    authorization: str | None = None
    identities: tuple[str, ...] = ()

    @classmethod
    def from_metadata(
        cls, metadata: Iterable[tuple[str, object]] | None, identities: Iterable[str] = ()
    ) -> Credentials:
        authorization = None
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                authorization = value
                break
        return cls(authorization, tuple(identities))


NONE = Credentials()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents `token`."""
    return (("authorization", f"Bearer {token}"),)


class Authenticator:
    def __init__(
        self,
        *,
        writes_open: bool = False,
        reads_open: bool = True,
        tokens: Iterable[tuple[str, str, Iterable[str]]] = (),
        identities: Iterable[tuple[str, str, Iterable[str]]] = (),
    ) -> None:
        """`tokens` and `identities`: (name, token or identity, scopes)."""
        self.writes_open = writes_open
        self.reads_open = reads_open
        self._tokens = [(_digest(t), Principal(n, frozenset(s))) for n, t, s in tokens]
        self._identities = {i: Principal(n, frozenset(s)) for n, i, s in identities}
        cluster = [t for n, t, _ in tokens if n == CLUSTER]
        # Checks the proofs peers present (told its address once listening).
        self.proofs = PeerProofs(cluster[0]) if cluster else None
        self._cluster = next((p for _, p in self._tokens if p.name == CLUSTER), None)
        self._cluster_reading = Principal(CLUSTER, frozenset({"read"}))

    @classmethod
    def from_settings(cls, a: AuthSettings, cluster_token: str | None) -> Authenticator:
        """From the [auth] table and the cluster's own token."""
        tokens: list[tuple[str, str, Iterable[str]]] = (
            [(CLUSTER, cluster_token, ("read", "write"))] if cluster_token else []
        )
        identities: list[tuple[str, str, Iterable[str]]] = []
        for name, cred in a.credentials.items():
            if cred.token_file is not None:
                tokens.append((name, read_token(cred.token_file), cred.scopes))
            else:
                assert cred.tls_identity is not None  # CredentialSettings holds one of the two
                identities.append((name, cred.tls_identity, cred.scopes))
        return cls(writes_open=a.writes == "open", reads_open=a.reads == "open", tokens=tokens, identities=identities)

    @property
    def knows_cluster(self) -> bool:
        """Whether the box's own token is known here (`appliance run` always
        makes one; nodes built by hand may have none)."""
        return any(p.name == CLUSTER for _, p in self._tokens)

    def is_cluster(self, credentials: Credentials) -> bool:
        """Whether the call presents the box's own token (a peer's call)."""
        try:
            principal = self.authenticate(credentials)
        except errors.Unauthenticated:
            return False
        return principal is not None and principal.name == CLUSTER

    def grants(self, scope: str) -> tuple[list[tuple[bytes, bool]], list[tuple[str, bool]]]:
        """Every known token (its SHA-256 digest) and certificate identity,
        each with whether it holds `scope`: for a server that checks
        credentials itself (the engine's hit path) and asks us otherwise."""
        tokens = [(digest, scope in p.scopes) for digest, p in self._tokens]
        identities = [(identity, scope in p.scopes) for identity, p in self._identities.items()]
        return tokens, identities

    def open_to(self, scope: str) -> bool:
        return self.writes_open if scope == "write" else self.reads_open

    def authenticate(self, credentials: Credentials) -> Principal | None:
        """The principal of a valid credential; None when none was presented.
        Raises Unauthenticated for a token that matches no credential."""
        auth = credentials.authorization
        if auth is not None:
            scheme, _, token = auth.strip().partition(" ")
            if scheme == PROOF_SCHEME:
                # A read's proof is the cluster reading: it never writes.
                _, scope = self.proven(token)
                return self._cluster if scope == WRITE else self._cluster_reading
            if scheme.lower() != "bearer" or not token.strip():
                raise errors.Unauthenticated('the authorization metadata must be "Bearer <token>"')
            presented = _digest(token.strip())
            found = None
            for digest, candidate in self._tokens:  # every one: constant time
                if hmac.compare_digest(presented, digest) and found is None:
                    found = candidate
            if found is None:
                raise errors.Unauthenticated("the bearer token matches no credential")
            return found
        for identity in credentials.identities:
            principal = self._identities.get(identity)
            if principal is not None:
                return principal
        return None

    def proven(self, proof: str) -> tuple[str, str]:
        """(nonce, scope) of a valid peer proof; raises Unauthenticated saying why not."""
        if self.proofs is None:
            raise errors.Unauthenticated("a peer proof, but this node has no cluster token to check it with")
        try:
            return self.proofs.check(proof)
        except ProofError as exc:
            raise errors.Unauthenticated(f"peer proof refused: {exc}") from None

    def reply_proof(self, credentials: Credentials | None) -> tuple[tuple[str, str], ...]:
        """Reply metadata proving this node to a peer whose call carried a
        valid proof (none for anyone else: no oracle for made-up nonces)."""
        auth = credentials.authorization if credentials is not None else None
        if auth is None or self.proofs is None or not auth.startswith(PROOF_SCHEME + " "):
            return ()
        try:
            nonce, _ = self.proofs.check(auth[len(PROOF_SCHEME) + 1 :])
        except ProofError:
            return ()
        return self.proofs.reply(nonce)

    def require(self, scope: str, what: str, credentials: Credentials) -> Principal | None:
        """Let a call that needs `scope` through, or raise Unauthenticated /
        PermissionDenied naming what it needs (never the token)."""
        if self.open_to(scope):
            return None
        principal = self.authenticate(credentials)
        if principal is None:
            raise errors.Unauthenticated(
                f"{what} needs a credential with the {scope} scope: a bearer token in the authorization "
                "metadata, or a client certificate named in [auth.credentials]"
            )
        if scope not in principal.scopes:
            raise errors.PermissionDenied(f"{what} needs the {scope} scope; credential {principal.name!r} lacks it")
        return principal
