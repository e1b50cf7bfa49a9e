"""Frame integrity on data-plane connections: one AES-256-GCM tag per frame.

After the handshake, each direction of a connection has its own key (``wire.keys.link_keys``,
from the run secret and both sides' fresh nonces) and counts its frames from 0. Frame ``n``
is followed by a 16-byte tag: AES-256-GCM with IV ``n`` (8 bytes little-endian, 4 zero
bytes) and the frame's header as associated data. The payload is associated data too (the
tag is then a GMAC and nothing is encrypted), or, with encryption on, the GCM plaintext:
it travels encrypted. The receiver absorbs (or decrypts) the bytes as they arrive and
checks the tag before it acts on the frame, so a changed, dropped, replayed or reordered
frame fails the check: its link is closed with a logged reason and the call fails with a
typed error, never a wrong result.

:func:`new_seal` gives the C seal of the native extension (OpenSSL's libcrypto, used with
the GIL released by the I/O threads, see ``native/seal.h``) and otherwise
:class:`PySeal`, the same cipher from ``cryptography``; both make the same tags.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

TAG_BYTES = 16

try:
    from pccl_py.kernels._native import SEAL_UNAVAILABLE, Seal
except ImportError:  # pragma: no cover - only without the extension
    Seal, SEAL_UNAVAILABLE = None, "the C extension is not built"


def iv(seq: int) -> bytes:
    return seq.to_bytes(8, "little") + bytes(4)


class PySeal:
    """The seal of one direction through ``cryptography`` (the interface of the C ``Seal``)."""

    def __init__(self, key: bytes, sending: bool, encrypting: bool = False):
        self._algorithm = algorithms.AES(bytes(key))
        self.sending = sending
        self.encrypting = encrypting
        self._ctx = None

    def begin(self, seq: int) -> None:
        mode = modes.GCM(iv(seq))
        cipher = Cipher(self._algorithm, mode)
        self._ctx = cipher.encryptor() if self.sending else cipher.decryptor()
        self._tag = None

    def absorb(self, data) -> None:
        self._ctx.authenticate_additional_data(data)

    def crypt(self, data, out=None):
        """Payload bytes encrypted (sending) or decrypted: into ``out`` (as long as
        ``data``; may be ``data``), else returned."""
        res = self._ctx.update(bytes(data))
        if out is None:
            return res
        memoryview(out).cast("B")[:] = res
        return None

    def tag(self) -> bytes:
        if self._tag is None:
            self._ctx.finalize()
            self._tag = self._ctx.tag
        return self._tag

    def check(self, tag) -> bool:
        ctx, self._ctx = self._ctx, None
        try:
            ctx.finalize_with_tag(bytes(tag))
        except InvalidTag:
            return False
        return True


def new_seal(key: bytes, sending: bool, encrypting: bool = False):
    """The fastest seal this process has for one direction of a connection."""
    if Seal is not None and SEAL_UNAVAILABLE is None:
        return Seal(key, sending, encrypting)
    return PySeal(key, sending, encrypting)


def native(seal) -> bool:
    """Whether the C I/O loops can absorb into ``seal`` with the GIL released."""
    return Seal is not None and isinstance(seal, Seal)
