"""Every byte format of the runtime, sans-I/O: encoders, decoders and validators only.

* :mod:`~pccl_py.wire.control` -- daemon <-> coordinator messages (msgpack over zmq)
* :mod:`~pccl_py.wire.frames` -- daemon <-> daemon data frames and their handshake
* :mod:`~pccl_py.wire.ipc` -- trainer <-> daemon messages (msgpack over a Unix socket)
* :mod:`~pccl_py.wire.state_transfer` -- shared-state transfer between daemons
"""
