"""Member vetting: an etcd member key joins the ring only once the address
it names proves to be a worker of this cluster.

Whoever can write to etcd can add a key; without this, its address would
own a share of the keys and receive the cluster's forwards. The controller
asks each new address for a Health/Check carrying a peer proof
(node/peer_proofs.py); a worker of this cluster answers with its own proof,
which only the cluster token can make. An address that does not is kept out
and asked again, backing off to RETRY_MAX_S. An address already in the ring
whose registration changed (a restarted worker: a new lease) stays in while
it is asked again, and leaves only if it fails.

MemberVetting is the bookkeeping (no I/O, an injectable clock); HealthProver
makes the calls on grpc's threads and reports each outcome through a
callback, for the controller's thread to record.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from .. import tls as tlsmod
from ..rules.peer_proofs import PeerProofs

if TYPE_CHECKING:
    from ..config import TlsSettings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
RETRY_MIN_S = 0.5
RETRY_MAX_S = 5.0

# (addr, lease, proven, why not) -> None; called on any thread.
Outcome = Callable[[str, int, bool, str], None]


@dataclasses.dataclass
class _State:
    lease: int
    proven: bool = False
    was_proven: bool = False  # an earlier registration at this address proved itself
    failed: str = ""  # why the last probe failed ("" if none did)
    probing: bool = False
    retry_at: float = 0.0
    backoff: float = RETRY_MIN_S


class MemberVetting:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _State] = {}

    def admitted(self, members: Iterable[tuple[str, int]]) -> list[str]:
        """The addresses of (addr, lease) registrations that may be in the
        ring now, sorted (every controller must hand out one order)."""
        current: dict[str, int] = {}
        for addr, lease in members:
            current[addr] = max(lease, current.get(addr, 0))
        for addr in set(self._states) - set(current):
            del self._states[addr]
        out = []
        for addr, lease in current.items():
            state = self._states.get(addr)
            if state is None or state.lease != lease:
                was = state is not None and (state.proven or state.was_proven) and not state.failed
                state = self._states[addr] = _State(lease, was_proven=was)
            if state.proven or (state.was_proven and not state.failed):
                out.append(addr)
        return sorted(out)

    def due(self) -> list[tuple[str, int]]:
        """(addr, lease) to ask now; each is marked as being asked."""
        now = self._clock()
        out = []
        for addr, state in self._states.items():
            if not state.proven and not state.probing and now >= state.retry_at:
                state.probing = True
                out.append((addr, state.lease))
        return out

    def record(self, addr: str, lease: int, proven: bool, why: str = "") -> bool:
        """A probe's outcome; True when it changes what admitted() gives."""
        state = self._states.get(addr)
        if state is None or state.lease != lease:
            return False  # gone, or registered anew meanwhile: asked again
        state.probing = False
        before = state.proven or (state.was_proven and not state.failed)
        if proven:
            if state.failed:
                log.info("member %s (lease %x) proved it is a worker of this cluster: joining the ring", addr, lease)
            state.proven, state.failed = True, ""
        else:
            if not state.failed:
                log.warning(
                    "member %s (lease %x) did not prove it is a worker of this cluster (%s): "
                    "kept out of the ring, asked again every %.0fs at most",
                    addr,
                    lease,
                    why,
                    RETRY_MAX_S,
                )
            state.failed = why or "no proof"
            state.retry_at = self._clock() + state.backoff
            state.backoff = min(state.backoff * 2, RETRY_MAX_S)
        return before != (state.proven or (state.was_proven and not state.failed))

    def first_answers_pending(self) -> bool:
        """Whether a member has not answered its first probe yet (a fresh
        controller waits for these before its first ring)."""
        return any(not s.proven and not s.failed and not s.was_proven for s in self._states.values())

    def unproven(self) -> list[str]:
        """Addresses kept out of the ring: their last probe failed."""
        return sorted(a for a, s in self._states.items() if s.failed)


class HealthProver:
    """Asks an address for Health/Check with a peer proof; the outcome says
    whether the reply carried the callee's proof."""

    def __init__(self, token: str, tls: TlsSettings | None, *, timeout: float = PROBE_TIMEOUT_S) -> None:
        self._proofs = PeerProofs(token)
        self._credentials = tlsmod.channel_credentials(tls)
        self._options = tlsmod.channel_options(tls)
        self._timeout = timeout

    def __call__(self, addr: str, lease: int, outcome: Outcome) -> None:
        if self._credentials is not None:
            channel = grpc.secure_channel(addr, self._credentials, options=self._options)
        else:
            channel = grpc.insecure_channel(addr, options=self._options)
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        authorization, nonce = self._proofs.make(addr)
        future = check.future(
            health_pb2.HealthCheckRequest(), metadata=(("authorization", authorization),), timeout=self._timeout
        )

        def done(f: grpc.Future) -> None:
            try:
                f.result()
                proven = self._proofs.replied(nonce, f.trailing_metadata())
                why = "" if proven else "its answer carries no proof of the cluster token"
            except grpc.RpcError as err:
                code = err.code() if callable(getattr(err, "code", None)) else None
                proven, why = False, f"no answer: {code.name if code else err}"
            except Exception as err:  # cancelled with its channel
                proven, why = False, f"no answer: {type(err).__name__}"
            channel.close()
            outcome(addr, lease, proven, why)

        future.add_done_callback(done)
