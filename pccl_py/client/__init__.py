"""The trainer's side: :class:`Client` (a thin client of its peer daemon) and what it hands over.

Runs in the trainer process. Everything networked happens in the daemon; this package
sends small requests over a Unix socket (:mod:`pccl_py.wire.ipc`) and copies tensors
into and out of shared memory:

* :mod:`~pccl_py.client.client`: the :class:`Client` API;
* :mod:`~pccl_py.client.rpc`: requests and replies over the socket, from several threads;
* :mod:`~pccl_py.client.allreduce`: where an all-reduce's bytes travel, and its :class:`Handle`;
* :mod:`~pccl_py.client.segments`: the segment pool and the ``alloc()`` arrays with their twins;
* :mod:`~pccl_py.client.copies`: copies into and out of shared memory (kernel, threads);
* :mod:`~pccl_py.client.spawn`: starting and stopping a private daemon;
* :mod:`~pccl_py.client.shared_state` and :mod:`~pccl_py.client.state_file` (a shared
  state saved to disk and loaded back);
* :mod:`~pccl_py.client.tensors`, :mod:`~pccl_py.client.progress`.
"""

from pccl_py.client.client import Client, Handle
from pccl_py.client.shared_state import SharedState

__all__ = ["Client", "Handle", "SharedState"]
