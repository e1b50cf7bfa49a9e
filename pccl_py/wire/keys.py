"""Keys derived from the run secret, sans-I/O.

Every key of the runtime comes from the run secret through HKDF-SHA256 (RFC 5869, from
``cryptography``), with a label per use, so no two uses share a key:

* the coordinator's CURVE key pair (``"coordinator"``) and the one key pair every member
  presents to it (``"member"``): a coordinator that cannot prove the secret cannot
  complete the CURVE handshake with a daemon, and the coordinator's authentication
  handler admits only the member key, so a process without the secret cannot talk to it;
* per connection, two link keys (one per direction) from the secret and both sides'
  fresh handshake nonces: a recorded session is worth nothing in another one.

With an empty secret every key is still derived (from the empty string), so the
protocol is the same, but anyone who runs this software has the keys: an empty secret
protects nothing and is meant for one machine or a closed network.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LINK_KEY_BYTES = 32  # AES-256-GCM


def derive(secret: bytes, label: str, *, salt: bytes | None = None, length: int = 32) -> bytes:
    """``length`` bytes for the use ``label`` from the run secret (and a per-session salt)."""
    kdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=b"pccl-py/" + label.encode())
    return kdf.derive(secret)


def curve_keypair(secret: bytes, role: str) -> tuple[bytes, bytes]:
    """The zmq CURVE (public, secret) key pair, Z85-encoded, of ``role`` ("coordinator" or
    "member") in the run with this secret."""
    import zmq  # only the control plane needs it
    from zmq.utils import z85

    secret_key = z85.encode(derive(secret, f"curve/{role}"))
    return zmq.curve_public(secret_key), secret_key


def link_keys(secret: bytes, nonce_a: bytes, nonce_c: bytes, connector: str, acceptor: str,
              stream: int, session: int) -> tuple[bytes, bytes]:
    """The two keys of one data-plane connection: (connector -> acceptor, acceptor ->
    connector). Both nonces are fresh per connection (the acceptor's challenge and the
    connector's hello), so no two connections share keys."""
    info = b"|".join((b"link", connector.encode(), acceptor.encode(), struct.pack("<QQ", stream, session)))
    k = derive(secret, "link/" + info.hex(), salt=nonce_a + nonce_c, length=2 * LINK_KEY_BYTES)
    return k[:LINK_KEY_BYTES], k[LINK_KEY_BYTES:]


def transfer_keys(secret: bytes, nonce_s: bytes, nonce_c: bytes, server: str, client: str) -> tuple[bytes, bytes]:
    """The two keys of one state-transfer connection: (client -> server, server -> client)."""
    info = b"|".join((b"transfer", server.encode(), client.encode()))
    k = derive(secret, "transfer/" + info.hex(), salt=nonce_s + nonce_c, length=2 * LINK_KEY_BYTES)
    return k[:LINK_KEY_BYTES], k[LINK_KEY_BYTES:]
