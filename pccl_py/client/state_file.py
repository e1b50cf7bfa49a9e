"""A shared state on disk, so that a run can start again after every peer has gone.

One file per saved state::

    magic     8 bytes   b"PCCLSTAT"
    version   u32 LE    FORMAT_VERSION
    length    u32 LE    bytes of the table that follows (at most MAX_TABLE)
    table     JSON      {"revision": int, "tensors": [[name, dtype, shape, nbytes,
                                                      allow_content_inequality], ...]}
    payload             each tensor's bytes, in table order, back to back
    digest    32 bytes  SHA-256 of everything before it

:func:`encode_table`, :func:`parse_prefix`, :func:`parse_table` and :func:`check_layout`
are the format and its checks, without files. :func:`save` writes a file atomically (a
temporary file in the same directory, fsync, ``os.replace``, fsync of the directory): a
crash or an error leaves the previous file as it was. :func:`load_into` checks the whole
file (size, then digest, then layout) before it writes a byte into the caller's buffers,
and :func:`read` builds new arrays from a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from pccl_py.errors import CorruptStateFile, InvalidUsage

MAGIC = b"PCCLSTAT"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, table length
DIGEST = 32  # SHA-256
MAX_TABLE = 16 << 20  # a table of many thousands of tensors stays far below
CHUNK = 8 << 20  # bytes read per step while the digest is checked


@dataclass(frozen=True)
class Entry:
    """One tensor of a saved state, as the table holds it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    allow_content_inequality: bool

    def describe(self) -> str:
        flag = ", allow_content_inequality" if self.allow_content_inequality else ""
        return f"{self.dtype} {list(self.shape)} ({self.nbytes} bytes{flag})"


@dataclass(frozen=True)
class Table:
    revision: int
    entries: tuple[Entry, ...]

    @property
    def payload_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def entries_of(layout: Sequence[Sequence[Any]]) -> tuple[Entry, ...]:
    """The entries of a :class:`~pccl_py.client.shared_state.SharedState` layout (rows of
    ``[name, offset, nbytes, dtype, shape, allow_content_inequality]``)."""
    return tuple(Entry(str(r[0]), str(r[3]), tuple(int(d) for d in r[4]), int(r[2]), bool(r[5])) for r in layout)


def encode_table(revision: int, entries: Sequence[Entry]) -> bytes:
    """Magic, version, length and table: the bytes before the payload."""
    table = json.dumps({"revision": revision,
                        "tensors": [[e.name, e.dtype, list(e.shape), e.nbytes, e.allow_content_inequality]
                                    for e in entries]},
                       separators=(",", ":")).encode()
    if len(table) > MAX_TABLE:
        raise InvalidUsage(f"the tensor table takes {len(table)} bytes; a state file holds at most {MAX_TABLE}")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(table)) + table


def parse_prefix(prefix: bytes, path: str) -> int:
    """The table length the first bytes of a file announce (``CorruptStateFile`` if they
    are not those of a state file of this version)."""
    if len(prefix) < _PREFIX.size:
        raise CorruptStateFile(f"{path}: truncated: {len(prefix)} bytes, shorter than a state file's header")
    magic, version, length = _PREFIX.unpack(prefix[:_PREFIX.size])
    if magic != MAGIC:
        raise CorruptStateFile(f"{path}: not a shared-state file (it starts with {magic!r}, not {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CorruptStateFile(f"{path}: format version {version}; this pccl_py reads version {FORMAT_VERSION} "
                               f"(or the header is corrupted)")
    if length > MAX_TABLE:
        raise CorruptStateFile(f"{path}: corrupted header: a tensor table of {length} bytes (at most {MAX_TABLE})")
    return length


def parse_table(raw: bytes, path: str) -> Table:
    """The table's JSON, every field checked (``CorruptStateFile`` otherwise)."""
    try:
        obj = json.loads(raw.decode())
        revision, rows = obj["revision"], obj["tensors"]
        entries = []
        for name, dtype, shape, nbytes, unequal in rows:
            ok = (isinstance(name, str) and isinstance(dtype, str) and isinstance(shape, list)
                  and all(_count(d) for d in shape) and _count(nbytes) and isinstance(unequal, bool))
            if not ok:
                raise ValueError(f"bad row {[name, dtype, shape, nbytes, unequal]!r}")
            entries.append(Entry(name, dtype, tuple(shape), nbytes, unequal))
        if not _count(revision):
            raise ValueError(f"bad revision {revision!r}")
    except (ValueError, KeyError, TypeError) as exc:  # (json's and unicode errors are ValueErrors)
        raise CorruptStateFile(f"{path}: corrupted tensor table: {exc}") from None
    return Table(revision, tuple(entries))


def check_layout(saved: Sequence[Entry], mine: Sequence[Entry], path: str) -> None:
    """``InvalidUsage`` naming the first tensor whose name, dtype, shape or flag differs."""
    for i in range(max(len(saved), len(mine))):
        s = saved[i] if i < len(saved) else None
        m = mine[i] if i < len(mine) else None
        if s is None:
            raise InvalidUsage(f"{path} holds {len(saved)} tensors; this state has more, from {m.name!r} on")
        if m is None:
            raise InvalidUsage(f"{path} holds {len(saved)} tensors; this state has {len(mine)}, "
                               f"so the file's {s.name!r} has no place here")
        if s.name != m.name:
            raise InvalidUsage(f"{path}: tensor #{i} is {s.name!r} in the file and {m.name!r} here "
                               f"(the tensors must be given in the same order)")
        if s != m:
            raise InvalidUsage(f"{path}: tensor {s.name!r} is {s.describe()} in the file and {m.describe()} here")


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# -- files -------------------------------------------------------------------------------
def save(path: str | os.PathLike, revision: int, entries: Sequence[Entry], views: Sequence[memoryview]) -> int:
    """Write ``views`` (one per entry) atomically to ``path``; returns the file's size."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    head = encode_table(revision, entries)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            for part in (head, *views):
                digest.update(part)
                f.write(part)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)  # the rename itself survives a crash
    return size


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verify(f: BinaryIO, path: str) -> Table:
    """The table of the open file ``f`` once its size and digest are right."""
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(_PREFIX.size)
    length = parse_prefix(prefix, path)
    raw = f.read(length)
    if len(raw) < length:
        raise CorruptStateFile(f"{path}: truncated: {size} bytes, inside the tensor table")
    table = parse_table(raw, path)
    expected = _PREFIX.size + length + table.payload_bytes + DIGEST
    if size != expected:
        what = "truncated" if size < expected else "longer than its table says"
        raise CorruptStateFile(f"{path}: {what}: {size} bytes, the table says {expected} (or the table is corrupted)")
    digest = hashlib.sha256(prefix)
    digest.update(raw)
    left = table.payload_bytes
    buf = bytearray(min(CHUNK, max(left, 1)))
    view = memoryview(buf)
    while left > 0:
        got = f.readinto(view[:min(left, len(buf))])
        if not got:
            raise CorruptStateFile(f"{path}: truncated while it was read (did something else write it?)")
        digest.update(view[:got])
        left -= got
    if f.read(DIGEST) != digest.digest():
        raise CorruptStateFile(f"{path}: SHA-256 mismatch: the file's bytes are not those saved (corrupted)")
    return table


def load_into(path: str | os.PathLike, entries: Sequence[Entry], views: Sequence[memoryview]) -> int:
    """Check the file at ``path`` whole, then its layout against ``entries``, then read its
    payload into ``views`` (one writable byte view per entry); returns the saved revision.
    Nothing is written into ``views`` unless every check passed."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        table = _verify(f, path)
        check_layout(table.entries, entries, path)
        _fill(f, table, views, path)
    return table.revision


def _fill(f: BinaryIO, table: Table, views: Sequence[memoryview], path: str) -> None:
    f.seek(len(encode_table(table.revision, table.entries)))
    for entry, view in zip(table.entries, views, strict=True):
        _read_exactly(f, view, path, entry.name)


def _read_exactly(f: BinaryIO, view: memoryview, path: str, name: str) -> None:
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise CorruptStateFile(f"{path}: truncated inside tensor {name!r} (did something else write it?)")
        done += got


@dataclass
class Saved:
    """A state read from a file without a model at hand: give ``tensors`` (numpy arrays;
    bfloat16 as torch tensors) to ``client.shared_state(tensors, revision=revision,
    allow_content_inequality=allow_content_inequality)``."""

    revision: int
    tensors: dict[str, Any]
    allow_content_inequality: frozenset[str]


def read(path: str | os.PathLike) -> Saved:
    """New arrays holding the state saved at ``path`` (checked as :func:`load_into` does)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        table = _verify(f, path)
        arrays = {e.name: _empty(e, path) for e in table.entries}
        _fill(f, table, [memoryview(a.reshape(-1).view(np.uint8)) for a in arrays.values()], path)
    tensors: dict[str, Any] = {}
    for e in table.entries:
        a = arrays[e.name]
        if e.dtype == "bfloat16":
            import torch

            tensors[e.name] = torch.from_numpy(a).view(torch.bfloat16)
        else:
            tensors[e.name] = a
    return Saved(table.revision, tensors, frozenset(e.name for e in table.entries if e.allow_content_inequality))


def _empty(e: Entry, path: str) -> np.ndarray:
    try:
        dtype = np.dtype(np.int16) if e.dtype == "bfloat16" else np.dtype(e.dtype)
    except TypeError:
        raise CorruptStateFile(f"{path}: tensor {e.name!r} has an unknown dtype {e.dtype!r}") from None
    if math.prod(e.shape) * dtype.itemsize != e.nbytes:  # checked before anything is allocated
        raise CorruptStateFile(f"{path}: tensor {e.name!r}: {e.dtype} {list(e.shape)} is not {e.nbytes} bytes")
    return np.empty(e.shape, dtype)
