"""The trainer's side: :class:`Client` (a thin client of its peer daemon) and what it hands over.

Runs in the trainer process. Everything networked happens in the daemon; this package
sends small requests over a Unix socket (:mod:`pccl_py.wire.ipc`) and copies tensors
into and out of shared memory.
"""

from pccl_py.client.client import Client, Handle
from pccl_py.client.shared_state import SharedState

__all__ = ["Client", "Handle", "SharedState"]
