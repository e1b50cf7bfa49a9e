"""One exception hierarchy for the whole runtime.

Families:
  * remote failure: something outside this process failed (``PeerLost``, ``Aborted``,
    ``SegmentLost``, ``CoordinatorUnavailable``, ``DeadlineExceeded``). Retrying on the
    new membership is the usual answer.
  * caller misuse: ``InvalidUsage`` (and ``RevisionError``, ``AuthenticationFailed``).
    Retrying the same call fails the same way.
  * bad input from the wire: ``ProtocolError`` (and ``Unauthenticated``; a corrupted
    saved state, ``CorruptStateFile``).
  * internal bug: ``InternalError``.

Errors cross process boundaries (daemon -> client, coordinator -> daemon) as
``{"error": <class name>, "message": <text>}`` (``SegmentLost`` adds ``"segment"``: which
segment); :func:`to_wire` and :func:`from_wire` are the one place that mapping lives.
"""

from __future__ import annotations


class PcclError(Exception):
    """Base of every error raised by pccl_py."""


class RemoteError(PcclError):
    """Something outside this process failed; the call may succeed when retried."""


class PeerLost(RemoteError):
    """A peer taking part in the operation died or was removed from the run."""


class Aborted(RemoteError):
    """The operation was aborted (membership changed, a peer failed, or the run stopped)."""


class SegmentLost(Aborted):
    """A shared-memory segment the operation named is gone from /dev/shm (another process or
    a tmpfs cleaner removed its name, or its owner retired it after a failed call), or could
    not be mapped by name. ``segment`` names it. The membership did not change: the client
    that owns the segment replaces it, so a retry runs at once on a fresh one."""

    def __init__(self, message: str = "", segment: str | None = None) -> None:
        super().__init__(message)
        self.segment = segment


class CoordinatorUnavailable(RemoteError):
    """The coordinator could not be reached within the operation's deadline."""


class DeadlineExceeded(RemoteError):
    """The operation did not finish within its deadline."""


class InvalidUsage(PcclError):
    """The caller used the API wrongly (wrong order, mismatched peers, bad arguments)."""


class Diverged(InvalidUsage):
    """This peer retried a call that the other peers had completed without it (it lost
    their last confirmation with a link). The call counts as done here too, so the next
    call goes on with theirs, but this peer's state lacks its result: bring the peers in
    step (``sync_shared_state``)."""


class AuthenticationFailed(InvalidUsage):
    """The control plane's CURVE handshake with the coordinator failed: this process and
    the one at the coordinator's address do not hold the same run secret (``PCCL_SECRET``),
    or that process is not this run's coordinator. Retrying fails the same way until the
    secrets match (or the run's coordinator is back on its address)."""


class RevisionError(InvalidUsage):
    """A shared-state revision broke the rule 'exactly one more than the last sync'."""


class ProtocolError(PcclError):
    """Malformed or unexpected input arrived from the wire."""


class Unauthenticated(ProtocolError):
    """A peer did not prove the run secret, proved it under another identity than the one
    expected (a shared-state source that is not the peer the sync plan named), or sent a
    message whose authentication tag does not verify. Nothing it sent was used; the message
    names it. A fetch goes on with its other sources and fails with this error only when
    none is left: check that every daemon of the run has the same secret (``PCCL_SECRET``)
    and that nothing else answers on the source's address. (``AuthenticationFailed`` is
    this daemon failing to authenticate to the coordinator: a setting to fix, not a peer's
    bad input.)"""


class CorruptStateFile(ProtocolError):
    """A saved shared state (``SharedState.save``) cannot be used: the file is truncated,
    its bytes do not match their SHA-256, or it is not a state file of this format. The
    message names the file and what failed; the state it was to fill is untouched. Load an
    older copy, or start the state afresh."""


class InternalError(PcclError):
    """A bug in pccl_py; please report it with the log."""


_BY_NAME: dict[str, type[PcclError]] = {
    cls.__name__: cls
    for cls in (
        PcclError,
        RemoteError,
        PeerLost,
        Aborted,
        SegmentLost,
        CoordinatorUnavailable,
        DeadlineExceeded,
        InvalidUsage,
        AuthenticationFailed,
        Diverged,
        RevisionError,
        ProtocolError,
        Unauthenticated,
        CorruptStateFile,
        InternalError,
    )
}


def to_wire(exc: BaseException) -> dict[str, str]:
    """Describe ``exc`` as a msgpack-able map; non-pccl errors travel as ``InternalError``."""
    name = type(exc).__name__ if isinstance(exc, PcclError) else "InternalError"
    text = str(exc) if isinstance(exc, PcclError) else f"{type(exc).__name__}: {exc}"
    out = {"error": name, "message": text}
    if isinstance(exc, SegmentLost) and exc.segment is not None:
        out["segment"] = exc.segment
    return out


def from_wire(obj: dict) -> PcclError:
    """Rebuild an exception from :func:`to_wire`'s map (unknown names become ``PcclError``)."""
    cls = _BY_NAME.get(str(obj.get("error")), PcclError)
    text = str(obj.get("message", ""))
    if cls is SegmentLost:
        segment = obj.get("segment")
        return SegmentLost(text, segment=segment if isinstance(segment, str) else None)
    return cls(text)


# ---- in data-plane ERROR frames: one number per family (pccl_py/wire/frames.py) ----------

ERR_ABORTED = 1
ERR_INVALID_USAGE = 2
ERR_PEER_LOST = 3
ERR_DEADLINE = 4
ERR_DIVERGED = 5
ERR_CODES = (ERR_ABORTED, ERR_INVALID_USAGE, ERR_PEER_LOST, ERR_DEADLINE, ERR_DIVERGED)
_CODE_OF = ((Diverged, ERR_DIVERGED), (InvalidUsage, ERR_INVALID_USAGE), (PeerLost, ERR_PEER_LOST),
            (DeadlineExceeded, ERR_DEADLINE))  # subclasses before their bases


def error_code(exc: PcclError) -> int:
    """The code an ERROR frame carries to tell the other peers of a call why it failed here."""
    for cls, code in _CODE_OF:
        if isinstance(exc, cls):
            return code
    return ERR_ABORTED


def peer_failure(code: int, text: str) -> PcclError:
    """What a peer's ERROR frame means for this peer's side of the call: the caller's own
    misuse or a divergence is the same error here; anything else (the peer lost a link,
    ran out of time, was aborted) aborts this side."""
    if code == ERR_INVALID_USAGE:
        return InvalidUsage(text)
    if code == ERR_DIVERGED:
        return Diverged(text)
    return Aborted(text)
