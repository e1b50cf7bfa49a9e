"""One trainer's session with its daemon: the IPC requests (:mod:`pccl_py.wire.ipc`) it sends
over the daemon's Unix socket, checked and turned into calls on the :class:`Daemon`.

A request is checked here before anything runs: its shape against the one table of what
each request may carry (:func:`pccl_py.wire.ipc.check_request`), then the meaning of its
values (:mod:`pccl_py.calls`). A client may be buggy or of another version, or not our
client at all, and a bad request must fail alone, answered with ``InvalidUsage``, never
take the daemon down, end the session or use up a call's automatic tag. Only the session
that holds the lease runs calls on the membership (``MEMBER_OPS``): a probe cannot. A
process of another user (not root) is refused at once (SO_PEERCRED); the socket file is
mode 0600 besides. A message that
is not even a msgpack map is answered the same way (with no ``id``); only a broken
framing (a length over the limit) closes the connection. The session also owns the shared-memory segments its trainer
had mapped: a request names them, and they are unmapped when the trainer goes. A segment
whose name is gone from /dev/shm (removed by another process or a tmpfs cleaner) is
reported as ``SegmentLost`` naming it, so the client replaces it (see :meth:`TrainerSession.map`
and :func:`own_segment_lost`). The
session that asks ``connect`` holds the daemon's lease on its membership: when its
connection closes, the daemon leaves the run (see :mod:`pccl_py.daemon.service`).

All-reduces, latency-bound when small, are served without a task; every other request
gets one, so a slow request (connect, a state sync) never holds up the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pccl_py import calls
from pccl_py.errors import Aborted, InvalidUsage, PcclError, ProtocolError, SegmentLost, to_wire
from pccl_py.transport import segments
from pccl_py.wire import ipc

if TYPE_CHECKING:
    from pccl_py.daemon.service import Daemon

log = logging.getLogger("pccl.daemon")

# requests that run calls on the membership: only the session holding the lease may send them
MEMBER_OPS = frozenset({"update_topology", "optimize_topology", "are_peers_pending", "all_reduce", "all_gather", "sync_shared_state"})


def own_segment_lost(exc: PcclError, names: tuple[str, ...]) -> PcclError:
    """The error a failed all-reduce reports to its trainer: when it was aborted (a peer could
    not map our segment, or stopped in the middle) and one of ``names``, the trainer's own
    segments that the call used, is gone from /dev/shm, a ``SegmentLost`` naming it, so the
    trainer replaces that segment before the retry. Otherwise ``exc`` itself."""
    if not isinstance(exc, Aborted):
        return exc
    for name in dict.fromkeys(names):
        if not segments.named(name):
            err = SegmentLost(f"this trainer's shared memory {name} is gone from /dev/shm (another process "
                              f"or a cleaner removed it), so the peers could not map it: {exc}", segment=name)
            err.__cause__ = exc
            return err
    return exc


def trusted_uids() -> frozenset[int]:
    """The users whose processes may talk to this daemon: its own, and root."""
    return frozenset({os.geteuid(), 0})


def peer_uid(transport) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), None where
    the system cannot tell."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    except (OSError, struct.error):
        return None
    return uid


class TrainerSession(asyncio.Protocol):
    """One trainer's connection on the daemon's IPC socket."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.frames = ipc.FrameBuffer(lenient=True)
        self.transport: asyncio.Transport | None = None
        self.segments: dict = {}
        self.tasks: set[asyncio.Task] = set()
        self.refused = False  # a connection from another user, closed at once

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        uid = peer_uid(transport)
        if uid is not None and uid not in trusted_uids():
            # another user of this host: it gets nothing, not even the lease of a daemon
            # whose first connection holds it (the socket file's mode already keeps it out)
            log.warning("refusing an IPC connection from uid %d: only this daemon's user may connect", uid)
            self.refused = True
            transport.abort()
            return
        self.daemon.session_opened(self)

    def data_received(self, data: bytes) -> None:
        try:
            msgs = self.frames.feed(data)
        except ProtocolError as exc:
            log.warning("closing the trainer's IPC connection: %s", exc)
            self.transport.close()
            return
        for msg in msgs:
            if isinstance(msg, ProtocolError):  # framed, but not a msgpack map: no id to answer to
                self._reply(None, None, None, InvalidUsage(f"bad request: {msg}"))
                continue
            try:
                req = ipc.check_request(msg)
            except InvalidUsage as exc:
                self._reply(ipc.request_id(msg), msg.get("op"), None, exc)
                continue
            if req["op"] == "all_reduce":  # the hot path: no task
                rid = req["id"]
                try:
                    self._all_reduce(req, lambda info, exc, rid=rid: self._reply(rid, "all_reduce", info, exc))
                except Exception as exc:
                    self._reply(rid, "all_reduce", None, exc)
                continue
            t = asyncio.ensure_future(self._serve(req))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    def connection_lost(self, exc) -> None:
        if self.refused:
            self.transport = None
            return
        for t in self.tasks:
            t.cancel()
        for name in list(self.segments):
            self.unmap(name)
        self.transport = None
        # the end of the lease when this session held it (its daemon leaves the run), else nothing
        self.daemon.session_closed(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- requests --------------------------------------------------------------------
    async def _serve(self, req: dict) -> None:
        """Answer ``req`` (``ipc.check_request``'s: every field there, of its type)."""
        try:
            reply = await self._handle(req)
        except Exception as exc:
            self._reply(req["id"], req["op"], None, exc)
            return
        self._reply(req["id"], req["op"], reply, None)

    async def _handle(self, req: dict) -> dict:
        op = req["op"]
        timeout = calls.request_timeout(req["timeout"])
        daemon = self.daemon
        if op in MEMBER_OPS:
            daemon.require_holder(self)
        if op == "hello":
            await daemon.settled(timeout)  # the last trainer's membership closed: the next one's id
            return {"peer_id": daemon.peer_id, "pid": os.getpid()}
        if op == "connect":
            return await daemon.connect(timeout, session=self)
        if op == "update_topology":
            return await daemon.update_topology(timeout)
        if op == "optimize_topology":
            return await daemon.optimize_topology(timeout)
        if op == "are_peers_pending":
            return {"pending": await daemon.are_peers_pending(timeout)}
        if op == "info":
            return daemon.summary()
        if op == "map":
            self.map(req["name"], req["size"])
            return {}
        if op == "unmap":
            self.unmap(req["name"])
            return {}
        if op == "all_gather":
            tag = None if req["tag"] is None else calls.user_tag(req["tag"])
            return await daemon.all_gather(req["data"], user_tag=tag, timeout=timeout)
        if op == "sync_shared_state":
            return await self._sync(req, timeout)
        if op == "leave":  # a session that never connected holds nothing to leave
            return {"left": await daemon.release(self)}
        raise InvalidUsage(f"unknown request {op!r}")

    async def _sync(self, req: dict, timeout: float) -> dict:
        desc = req["state"]
        strategy = req["strategy"] or "enforce_popular"
        calls.check_strategy(strategy)
        seg = self.segment(desc["segment"])
        views = ipc.layout_views(desc, seg.buf)
        progress = self.progress_reporter(req["id"]) if req["progress"] else None
        return await self.daemon.sync_shared_state(views, revision=desc["revision"], strategy=strategy,
                                                   timeout=timeout, progress=progress)

    def _all_reduce(self, req: dict, finish: Callable[[dict | None, PcclError | None], None]) -> None:
        """Post a client's all-reduce; ``finish(info, None)`` or ``finish(None, error)`` when it
        ends. No task per call: small all-reduces are latency-bound and every loop iteration
        counts. Bad requests raise here, before the call takes a tag."""
        timeout = calls.request_timeout(req["timeout"])
        self.daemon.require_holder(self)
        dtype, op = req["dtype"], req["reduce"] or "sum"
        quant, algorithm = req["quant"], req["algorithm"] or "auto"
        calls.check_all_reduce(dtype, op, quant, algorithm)
        tag = None if req["tag"] is None else calls.user_tag(req["tag"])
        nbytes = req["nbytes"]
        calls.check_whole_elements(nbytes, dtype)
        inline = req["data"]
        if inline is not None:  # a small call carries its bytes; the result goes back in the reply
            calls.check_inline(inline, nbytes)
            src, dst, refs = inline, bytearray(nbytes), None
        else:
            seg = self.segment(req["shm"])
            in_seg = self.segment(req["in_shm"] or req["shm"])
            in_off, out_off = req["in_off"], req["out_off"]
            calls.check_shm_ranges(nbytes, (in_seg.size, in_off), (seg.size, out_off), in_seg is seg)
            src = in_seg.buf[in_off:in_off + nbytes]
            dst = seg.buf[out_off:out_off + nbytes]
            refs = (in_seg.name.lstrip("/"), in_off, seg.name.lstrip("/"), out_off)

        def done(info: dict | None, exc: PcclError | None) -> None:
            if info is not None and inline is not None:
                info["data"] = dst
            if exc is not None and refs is not None:
                exc = own_segment_lost(exc, (refs[0], refs[2]))
            finish(info, exc)

        self.daemon.start_all_reduce(
            src,
            dst,
            dtype=dtype,
            op=op,
            quant=quant,
            algorithm=algorithm,
            user_tag=tag,
            timeout=timeout,
            shm_refs=refs,
            done=done,
        )

    # -- replies ---------------------------------------------------------------------
    def _reply(self, rid, op, reply: dict | None, exc: BaseException | None) -> None:
        if exc is None:
            reply["ok"] = True
        elif isinstance(exc, PcclError):
            reply = {"ok": False, **to_wire(exc)}
        else:  # a bug (every bad request is an InvalidUsage): logged, and never kills the daemon
            log.error("request %s failed", str(op)[:40], exc_info=exc)
            reply = {"ok": False, **to_wire(exc)}
        reply["id"] = rid
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ipc.pack(reply))

    def progress_reporter(self, rid, interval: float = 0.1):
        """A callback sending ``{"id": rid, "progress": [done, total]}`` to the client, throttled."""
        last = [0.0]

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if (now - last[0] >= interval or done >= total) and self.transport is not None:
                last[0] = now
                self.transport.write(ipc.pack({"id": rid, "progress": [int(done), int(total)]}))

        return report

    # -- shared-memory segments ------------------------------------------------------
    def map(self, name: str, size: int) -> None:
        """Map the trainer's segment ``name``. One whose name is not in /dev/shm (removed
        before we got to it) raises ``SegmentLost``: the client makes a fresh one."""
        if name in self.segments:
            return
        try:
            seg = segments.attach_segment(name)
        except FileNotFoundError:
            raise SegmentLost(f"shared-memory segment {name!r} is not in /dev/shm (removed before the daemon "
                              f"mapped it)", segment=name) from None
        except OSError as exc:
            raise InvalidUsage(f"cannot map shared-memory segment {name!r}: {exc}") from None
        if seg.size < size:
            seg.close()
            raise InvalidUsage(f"segment {name} is {seg.size} bytes, expected {size}")
        self.segments[name] = seg

    def unmap(self, name: str) -> None:
        seg = self.segments.pop(name, None)
        if seg is not None:
            # a view may still be alive (an op, a transfer's buffers): the mapping then goes
            # with the last view
            seg.close()

    def segment(self, name: str):
        seg = self.segments.get(name)
        if seg is None:
            raise InvalidUsage(f"unknown shared-memory segment {name!r}; map it first")
        return seg
