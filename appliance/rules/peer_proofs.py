"""Peer proofs: workers show each other the cluster token without sending it.

A bearer token goes to whoever listens on the address called, and a local
user who binds a stopped worker's port would catch it. A proof is an HMAC,
keyed by the token, over the address called, the time, a nonce and what
the call may do (READ, or WRITE: Set, Remove, Handoff):

    authorization: GC-Proof <ms>.<nonce>.<r|w>.<mac>

The callee accepts it only for the one address it serves (the ring's name
for it; no alias a local user could bind beside it), made no earlier than
it began listening, and within WINDOW_S of its clock (so the boxes' clocks
must agree to within that: NTP). What a squatter catches on a dead worker's
port is therefore refused by every worker, the next one on that port
included, and a read's proof never writes. Where a reply carries values
(Get, GetMany, Peek, the Forward stream) or vouches for a member
(Health/Check), the callee adds `x-groupcache-proof: HMAC(token, nonce)`:
only a worker that knows the token can make it, so a caller takes values
only from such a worker.

Pure: no I/O, no RPC library; the clock is injectable for tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Iterable

SCHEME = "GC-Proof"
REPLY_KEY = "x-groupcache-proof"
READ, WRITE = "r", "w"
# How far a proof's time may be from the callee's clock (boxes' clocks
# differ a little; a squatter's catch is refused by the listening time).
WINDOW_S = 60.0
# Proofs checked lately: one call's proof is looked at several times (is it
# a peer's, may it read, what to reply), an HMAC each without this.
_RECENT = 4096
_CONTEXT = b"groupcache-appliance peer proof v1\0"


class ProofError(ValueError):
    """A proof that does not hold; the message says why, never the token."""


class PeerProofs:
    def __init__(self, token: str, *, clock: Callable[[], float] = time.time) -> None:
        self._key = hashlib.sha256(_CONTEXT + token.encode()).digest()
        self._clock = clock
        self.addr: str | None = None  # the callee's own address in the ring
        self.since = math.inf  # when it began listening (epoch seconds)
        self._since_ms = math.inf
        self._recent: dict[str, tuple[str, str, int]] = {}  # proof -> (nonce, scope, ms made)

    def _mac(self, text: str) -> str:
        return base64.urlsafe_b64encode(hmac.digest(self._key, text.encode(), "sha256")[:24]).decode()

    # Caller side -----------------------------------------------------------

    def make(self, target: str, scope: str = READ) -> tuple[str, str]:
        """(authorization value, nonce) for one call to the worker at `target`
        that may do `scope` (READ or WRITE)."""
        ms = int(self._clock() * 1000)
        nonce = secrets.token_urlsafe(12)
        return f"{SCHEME} {ms}.{nonce}.{scope}.{self._mac(f'call|{target}|{ms}|{nonce}|{scope}')}", nonce

    def replied(self, nonce: str, metadata: Iterable[tuple[str, object]] | None) -> bool:
        """Whether reply metadata carries the callee's proof for `nonce`."""
        expected = self._mac(f"reply|{nonce}")
        for key, value in metadata or ():
            if key == REPLY_KEY and isinstance(value, str) and hmac.compare_digest(value, expected):
                return True
        return False

    # Callee side -----------------------------------------------------------

    def listening(self, addr: str, since: float) -> None:
        """Accept proofs for `addr` made at or after `since` (taken just
        before the port was bound)."""
        self.addr, self.since = addr, since
        # Proofs carry whole milliseconds: one made in the millisecond of
        # the bind (truncated below `since`) is not from before it.
        self._since_ms = math.floor(since * 1000)
        self._recent.clear()

    def callee(self) -> tuple[bytes, str, int] | None:
        """(HMAC key, address, listening since in ms) for a server that
        checks proofs itself (the engine's hit path); None until listening."""
        if self.addr is None or math.isinf(self._since_ms):
            return None
        return self._key, self.addr, int(self._since_ms)

    def check(self, proof: str) -> tuple[str, str]:
        """(nonce, scope) of a valid proof (the part after the scheme); raises ProofError."""
        recent = self._recent.get(proof)
        if recent is not None:
            nonce, scope, made = recent
            self._fresh(made)
            return nonce, scope
        parts = proof.strip().split(".")
        if len(parts) != 4 or not parts[0].isdigit() or parts[2] not in (READ, WRITE) or len(proof) > 200:
            raise ProofError(f'a peer proof is "{SCHEME} <ms>.<nonce>.<r|w>.<mac>"')
        ms_text, nonce, scope, mac = parts
        if self.addr is None:
            raise ProofError("this worker is not listening yet")
        if not hmac.compare_digest(mac, self._mac(f"call|{self.addr}|{ms_text}|{nonce}|{scope}")):
            raise ProofError(f"the proof is not for this worker ({self.addr}) or not made with the cluster token")
        made = int(ms_text)
        self._fresh(made)
        if len(self._recent) >= _RECENT:
            self._recent.clear()
        self._recent[proof] = (nonce, scope, made)
        return nonce, scope

    def _fresh(self, made: int) -> None:
        """`made`: the proof's time in milliseconds."""
        if made < self._since_ms:
            raise ProofError("the proof was made before this worker began listening")
        if abs(self._clock() - made / 1000.0) > WINDOW_S:
            raise ProofError(
                f"the proof's time is more than {WINDOW_S:.0f}s from this worker's clock "
                "(are the boxes' clocks synced?)"
            )

    def reply(self, nonce: str) -> tuple[tuple[str, str], ...]:
        """The reply metadata that proves this callee to the caller of `nonce`."""
        return ((REPLY_KEY, self._mac(f"reply|{nonce}")),)
