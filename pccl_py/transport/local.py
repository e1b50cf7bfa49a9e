"""Where same-host data links listen: Unix sockets in a directory only this user can enter.

A daemon listens on a Unix socket next to its TCP port, and a peer on the same host (in the
same network namespace) dials it instead of TCP. The socket lives in a directory of this
user's with mode 0700 (``$PCCL_SOCKET_DIR``, else ``$XDG_RUNTIME_DIR/pccl_py``, else
``<tmp>/pccl_py-<uid>``): another local user can neither connect to it nor put a socket of
their own in its place (an abstract socket name, by contrast, is open to every process of
the network namespace, and whoever binds it first owns it). A directory that exists but is
not this user's alone is not used: same-host links are then off, and peers use TCP.

The file name is a hash of the network namespace and the address peers dial, so daemons in
different namespaces of one host (the stress harness's emulated hosts) never meet here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import tempfile

log = logging.getLogger("pccl.dataplane")


def _owned_privately(path: str) -> str | None:
    """None if ``path`` is a directory (not a link) of this user's that nobody else may enter;
    otherwise what is wrong with it."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return str(e)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not {os.geteuid()}"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):o} lets other users in (want 700)"
    return None


def candidates() -> list[str]:
    env = os.environ.get("PCCL_SOCKET_DIR")
    if env:
        return [env]
    out = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        out.append(os.path.join(runtime, "pccl_py"))
    out.append(os.path.join(tempfile.gettempdir(), f"pccl_py-{os.geteuid()}"))
    return out


def private_dir() -> str | None:
    """The first candidate directory that is (or could be made) this user's alone; None,
    with the reasons logged, if there is none."""
    why = []
    for d in candidates():
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            why.append(f"{d}: {e}")
            continue
        bad = _owned_privately(d)
        if bad is None:
            return d
        why.append(f"{d}: {bad}")
    _warn_once("; ".join(why))
    return None


@functools.lru_cache(maxsize=8)
def _warn_once(why: str) -> None:
    log.warning("same-host links are off (peers on this host use TCP): no private socket directory (%s)", why)


@functools.lru_cache(maxsize=1)
def _netns() -> str:
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "-"


def socket_path(host: str, port: int) -> str | None:
    """The Unix socket of the daemon whose data plane peers dial at ``host:port``; None
    where this user has no private directory for it."""
    d = private_dir()
    if d is None:
        return None
    name = hashlib.sha256(f"{_netns()}|{host}:{port}".encode()).hexdigest()[:32]
    return os.path.join(d, f"dp-{name}.sock")
