"""Moving bytes between processes: data streams (TCP or Unix sockets), their I/O threads,
shared-memory segments and the zmq socket pump. No protocol decisions live here."""
