"""Addresses: which data-plane address a daemon advertises, and the one that cannot work.

Shared by the daemon, which advertises its address to the coordinator, and the client,
which refuses a setting that cannot work before it spawns a daemon.
"""

from __future__ import annotations

import ipaddress
import socket

from pccl_py.errors import InvalidUsage
from pccl_py.transport.zmq_io import parse_addr

WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def refuse_unreachable(listen_host: str, coordinator: str, advertise: str | None = None) -> None:
    """A loopback listen address (and nothing advertised instead) with a coordinator that is
    not on this machine's loopback cannot work: no peer on another machine could dial it.
    ``InvalidUsage`` saying what to set."""
    if advertise or listen_host in WILDCARD_HOSTS or not is_loopback(listen_host):
        return
    if is_loopback(parse_addr(coordinator)[0]):
        return
    raise InvalidUsage(
        f"this daemon listens on {listen_host}, a loopback address, but the coordinator "
        f"{coordinator} is not on this machine's loopback: peers on other machines could "
        f"never reach it. Listen on an address they can reach (Client(listen=\"0.0.0.0:PORT\"), "
        f"pccl daemon --listen 0.0.0.0:PORT) or name the address they dial "
        f"(Client(advertise=HOST), --advertise HOST)")


def advertised_host(listen_host: str, coordinator: str, advertise: str | None = None) -> str:
    """The data-plane host the coordinator hands to the other peers.

    ``advertise`` wins; a specific listen address is its own answer; a daemon bound to every
    interface (0.0.0.0, ::) advertises the local address its traffic to the coordinator
    leaves from: the address of the interface that faces the other machines of the run.
    """
    if advertise:
        return advertise
    if listen_host not in WILDCARD_HOSTS:
        refuse_unreachable(listen_host, coordinator)
        return listen_host
    host, port = parse_addr(coordinator)
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)  # a UDP connect only picks the route: nothing is sent
            return s.getsockname()[0]
    except OSError as exc:
        raise InvalidUsage(
            f"listening on {listen_host or 'every interface'!r}, the daemon cannot tell which address "
            f"the other peers reach it at (no route to the coordinator {coordinator}: {exc}); "
            f"pass --advertise HOST") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) means this machine's loopback. A name that
    does not resolve counts as not loopback: the check then stays out of the way."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)
