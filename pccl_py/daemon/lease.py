"""Which trainer connection holds a daemon's membership, and what its end means (sans I/O).

The trainer's IPC connection is the daemon's lease on its membership in the run. The
session that asks ``connect`` takes it; a daemon spawned by its client
(:attr:`Mode.SPAWNED`) gives it to its first session, the spawning client's, from the
start. While the holder's connection is open no other session may connect, nor run calls
on the membership (collectives, votes, syncs: :meth:`Lease.require`). When it ends
(the connection closes for any reason, or the holder asks ``leave``) the daemon leaves the
run, then exits or, in :attr:`Mode.SERVE_SUCCESSIVE`, opens a new membership for the next
trainer. Sessions that hold nothing (status probes, a second client reading ``info``) end
nothing when they go.

:class:`Lease` takes sessions as opaque tokens and returns decisions with their reason;
the daemon (:mod:`pccl_py.daemon.service`) carries them out.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass

from pccl_py.errors import InvalidUsage


class Mode(enum.Enum):
    SPAWNED = "spawned"  # --exit-with-client: the first session holds it; exit when it ends
    EXIT = "exit"  # started by hand (the default): connect takes it; exit when it ends
    SERVE_SUCCESSIVE = "serve-successive"  # connect takes it; a new membership when it ends

    @classmethod
    def of(cls, *, exit_with_client: bool, serve_successive: bool) -> Mode:
        if exit_with_client and serve_successive:
            raise InvalidUsage("exit_with_client and serve_successive exclude each other: a daemon that "
                               "exits with its client serves no successor")
        if exit_with_client:
            return cls.SPAWNED
        return cls.SERVE_SUCCESSIVE if serve_successive else cls.EXIT


@dataclass(frozen=True)
class Ended:
    """The lease ended: the daemon leaves the run, then exits (``exit``) or waits for the
    next trainer as a new member."""

    exit: bool
    reason: str


class Lease:
    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.holder: Hashable | None = None
        self.ended: str | None = None  # why a daemon that exits once its lease ended is done
        self._seen = False

    def opened(self, session: Hashable) -> None:
        """A connection arrived on the IPC socket."""
        if self.mode is Mode.SPAWNED and not self._seen:
            self.holder = session  # the client that spawned the daemon dials first
        self._seen = True

    def take(self, session: Hashable) -> None:
        """``session`` asks to connect: it holds the lease from now on; ``InvalidUsage`` when
        another session holds it or the daemon is done."""
        if session == self.holder:
            return
        if self.ended is not None:
            raise InvalidUsage(f"this daemon left the run and exits ({self.ended}); start a new one, or run "
                               "it with --serve-successive to serve one trainer after another")
        if self.holder is not None:
            raise InvalidUsage("this daemon is in the run for another trainer, whose IPC connection is still "
                               "open: a daemon serves one trainer at a time (start one daemon per trainer)")
        self.holder = session

    def require(self, session: Hashable) -> None:
        """``session`` runs calls on the membership (collectives, votes, syncs): only the
        holder may, so a probe or a stray connection can neither take a call's automatic
        tag from the trainer nor vote for it. ``InvalidUsage`` otherwise."""
        if session != self.holder:
            raise InvalidUsage("this connection does not hold the daemon's membership: only the trainer that "
                               "connected it runs calls on it (others may read info); a daemon serves one trainer "
                               "at a time")

    def end(self, session: Hashable, why: str) -> Ended | None:
        """``session`` closed its connection or asked to leave (``why``); None when it held
        nothing, which changes nothing."""
        if self.holder is None or session != self.holder:
            return None
        self.holder = None
        done = self.mode is not Mode.SERVE_SUCCESSIVE
        if done:
            self.ended = why
        then = "exiting" if done else "opening a new membership for the next trainer"
        return Ended(exit=done, reason=f"the lease of the trainer that connected this daemon ended ({why}): "
                                       f"leaving the run, then {then}")
