"""Moving bytes between processes, with no protocol decisions: the I/O threads of a data
stream (:mod:`~pccl_py.transport.pump`), shared-memory segments
(:mod:`~pccl_py.transport.segments`) and zmq sockets on an asyncio loop
(:mod:`~pccl_py.transport.zmq_io`)."""
