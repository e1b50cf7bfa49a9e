"""pccl_py: fault-tolerant peer-to-peer collectives for training over the internet."""

from pccl_py.errors import (
    Aborted,
    AuthenticationFailed,
    CoordinatorUnavailable,
    CorruptStateFile,
    DeadlineExceeded,
    Diverged,
    InternalError,
    InvalidUsage,
    PcclError,
    PeerLost,
    ProtocolError,
    RemoteError,
    RevisionError,
    SegmentLost,
    Unauthenticated,
)

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AuthenticationFailed",
    "CoordinatorUnavailable",
    "CorruptStateFile",
    "DeadlineExceeded",
    "Diverged",
    "InternalError",
    "InvalidUsage",
    "PcclError",
    "PeerLost",
    "ProtocolError",
    "RemoteError",
    "RevisionError",
    "SegmentLost",
    "Unauthenticated",
    "__version__",
]


def __getattr__(name: str):
    # Client pulls in zmq/msgpack; import it lazily so kernel-only users stay light.
    if name == "Client":
        from pccl_py.client.client import Client

        return Client
    raise AttributeError(name)
