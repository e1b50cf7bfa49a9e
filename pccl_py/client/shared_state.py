"""Client-side shared state: named tensors in one shared-memory segment plus a revision.

    state = SharedState({"w": model_w, "opt_m": m}, revision=0,
                        allow_content_inequality={"rng_state"})
    state["w"]            # a view backed by the segment, same kind as given (numpy / torch CPU)
    state.describe()      # msgpack-able description the daemon maps (see below)
    state.save(path)      # the tensors and revision on disk, atomically; state.load(path) fills them back
    state.close()         # unmaps and unlinks the segment

The constructor copies each tensor's content into the segment once; from then on the
trainer works on ``state[name]`` (or ``state.tensors``) and the daemon reads and writes
the same bytes through its own mapping, so a sync moves no tensor through a socket on
this host. Offsets are 64-byte aligned. ``revision`` is the revision of the last
successful sync (or the one given); the user advances it by one before each
``sync_shared_state()``, which offers ``revision`` and sets it to the elected revision
when it returns.

``describe()`` returns::

    {"segment": str, "size": int, "revision": int,
     "tensors": [[name, offset, nbytes, dtype, shape(list[int]), allow_content_inequality], ...]}
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from pccl_py.client import state_file
from pccl_py.errors import InvalidUsage
from pccl_py.transport import segments
from pccl_py.wire import ipc

ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_numpy(t: Any) -> tuple[np.ndarray, bool]:
    """(C-contiguous numpy view or copy of t's content, is_torch)."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t), False
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is optional
        torch = None
    if torch is not None and isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            t = t.detach().to("cpu")
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy(), True  # raw 2-byte words
        return t.numpy(), True
    raise InvalidUsage(f"shared state holds numpy arrays or torch tensors, got {type(t).__name__}")


class SharedState:
    """Named tensors copied into one shared-memory segment; see the module docstring."""

    def __init__(self, tensors: Mapping[str, Any], *, revision: int = 0,
                 allow_content_inequality: Iterable[str] = (), name: str | None = None) -> None:
        if not tensors:
            raise InvalidUsage("shared state needs at least one tensor")
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise InvalidUsage(f"revision must be an int >= 0, got {revision!r}")
        unequal = set(allow_content_inequality)
        unknown = unequal - set(tensors)
        if unknown:
            raise InvalidUsage(f"allow_content_inequality names unknown tensors {sorted(unknown)}")
        self.revision = revision
        self._layout: list[list[Any]] = []
        sources: list[tuple[str, np.ndarray, bool, Any]] = []
        offset = 0
        for tname, t in tensors.items():
            if not isinstance(tname, str) or not tname or len(tname.encode()) > 256:
                raise InvalidUsage(f"tensor names are non-empty strings of <= 256 bytes, got {tname!r}")
            arr, is_torch = _as_numpy(t)
            torch_dtype = t.dtype if is_torch else None
            sources.append((tname, arr, is_torch, torch_dtype))
            self._layout.append(ipc.state_row(tname, offset, int(arr.nbytes), _dtype_name(arr, torch_dtype),
                                              arr.shape, tname in unequal))
            offset = _align(offset + arr.nbytes)
        size = max(offset, ALIGN)
        self._shm = segments.create_segment(size, name=name, prefix="pccl_ss_")
        self._closed = False
        buf = self._shm.buf
        self.tensors: dict[str, Any] = {}
        for (tname, arr, is_torch, torch_dtype), row in zip(sources, self._layout, strict=True):
            off = row[1]
            view = np.ndarray(arr.shape, dtype=arr.dtype, buffer=buf, offset=off)
            np.copyto(view, arr)
            if is_torch:
                import torch

                tv = torch.from_numpy(view)
                if torch_dtype == torch.bfloat16:
                    tv = tv.view(torch.bfloat16)
                self.tensors[tname] = tv
            else:
                self.tensors[tname] = view
        self.allow_content_inequality = frozenset(unequal)

    # mapping-like access
    def __getitem__(self, name: str) -> Any:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def segment_name(self) -> str:
        return self._shm.name

    @property
    def nbytes(self) -> int:
        return sum(row[2] for row in self._layout)

    def buffer(self) -> memoryview:
        """The whole segment (what the daemon maps by name)."""
        return self._shm.buf

    def views(self) -> dict[str, memoryview]:
        """Byte views of each tensor inside the segment."""
        buf = self._shm.buf
        return {row[0]: buf[row[1]:row[1] + row[2]] for row in self._layout}

    def describe(self) -> dict[str, Any]:
        return ipc.describe_state(self._shm.name, self._shm.size, self.revision, self._layout)

    def save(self, path: str | os.PathLike) -> int:
        """Write the tensors and ``revision`` to ``path`` atomically (a temporary file in the
        same directory, fsync, rename): an error or a crash leaves the previous file intact.
        Call it between syncs, when no sync writes into the tensors. Returns the file's size.
        Format: :mod:`pccl_py.client.state_file`."""
        self._require_open()
        return state_file.save(path, self.revision, state_file.entries_of(self._layout), list(self.views().values()))

    def load(self, path: str | os.PathLike) -> int:
        """Fill the tensors in place from a file :meth:`save` wrote and set ``revision`` to the
        saved one (returned). The file must hold the same tensors in the same order, with
        the same dtypes, shapes and ``allow_content_inequality`` (``InvalidUsage`` naming the
        first that differs); a truncated or corrupted file raises ``CorruptStateFile``.
        Either way nothing is changed. Meant for a state that has not synced in this run:
        the next ``sync_shared_state`` may then offer ``revision`` (or one more)."""
        self._require_open()
        self.revision = state_file.load_into(path, state_file.entries_of(self._layout), list(self.views().values()))
        return self.revision

    def _require_open(self) -> None:
        if self._closed:
            raise InvalidUsage("this shared state is closed")

    def close(self) -> None:
        """Drop the views and unlink the segment (the tensors must no longer be used)."""
        if self._closed:
            return
        self._closed = True
        self.tensors.clear()
        _close_segment(self._shm)
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> SharedState:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _close_segment(shm: shared_memory.SharedMemory) -> None:
    """Close our mapping; if views of it are still alive, let the mapping go when they do."""
    try:
        shm.close()
    except BufferError:
        # SharedMemory.close() refuses while views exist; drop our references (the mmap is
        # unmapped when the last view dies) and close the file descriptor.
        shm._buf = None  # type: ignore[attr-defined]
        shm._mmap = None  # type: ignore[attr-defined]
        shm.close()


def _dtype_name(arr: np.ndarray, torch_dtype: Any) -> str:
    if torch_dtype is not None:
        return str(torch_dtype).replace("torch.", "")
    return str(arr.dtype)
