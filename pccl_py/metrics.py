"""Prometheus metrics of a coordinator or a daemon, served on an opt-in port.

``pccl coordinator --metrics-port P`` / ``pccl daemon --metrics-port P`` (for a daemon a
``Client`` spawns: the environment variable ``PCCL_METRICS_PORT``) serve ``http://127.0.0.1:P/metrics`` (``--metrics-host``
to listen elsewhere: the numbers name peers and addresses); without the option no port is
opened and nothing is counted. It needs ``prometheus-client`` (``pip install
"pccl_py[metrics]"``).

Each process gets its own registry (never the library's global one), so a test or a
program that runs several of them in one process keeps their numbers apart.
"""

from __future__ import annotations

from typing import Any

from pccl_py.errors import InvalidUsage


def _lib():
    try:
        import prometheus_client
    except ImportError:
        raise InvalidUsage("metrics need prometheus-client: pip install 'pccl_py[metrics]' "
                           "(or prometheus-client), or leave --metrics-port out") from None
    return prometheus_client


class Metrics:
    """The numbers of one process; ``role`` is "coordinator" or "daemon"."""

    def __init__(self, role: str) -> None:
        pc = _lib()
        self.role = role
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.epoch = pc.Gauge("pccl_epoch", "membership epoch this process knows", registry=r)
        self.members = pc.Gauge("pccl_members", "peers of the run, by state", ["state"], registry=r)
        self.heartbeat_age = pc.Gauge("pccl_heartbeat_age_seconds", "seconds since each peer was last heard",
                                      ["peer"], registry=r)
        self.removals = pc.Counter("pccl_removals", "peers removed from the run, by reason", ["reason"],
                                   registry=r)
        self.world_size = pc.Gauge("pccl_world_size", "peers in this daemon's group", registry=r)
        self.calls = pc.Counter("pccl_calls", "collective calls, by operation, algorithm and outcome",
                                ["op", "algorithm", "outcome"], registry=r)
        self.call_seconds = pc.Histogram("pccl_call_seconds", "duration of collective calls", ["op"],
                                         buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0, 60.0), registry=r)
        self.bytes = pc.Counter("pccl_bytes", "payload bytes on the data plane, by direction",
                                ["direction"], registry=r)
        self.link_losses = pc.Counter("pccl_link_losses", "data links to peers that broke", registry=r)
        self.recovery_seconds = pc.Histogram(
            "pccl_recovery_seconds", "from a failed call to the next call that succeeds",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0), registry=r)
        self.sync_bytes = pc.Counter("pccl_sync_bytes", "shared-state bytes received by syncs", registry=r)
        # connections a listener refused or that failed before their handshake, by listener
        # and reason: the coordinator's port "control" (coordinator/handshakes.py: wrong_secret,
        # denied, no_curve, malformed, incomplete); a daemon's "state" and "data" ports
        # (transport/limits.py)
        self.rejected_connections = pc.Counter(
            "pccl_rejected_connections", "connections a listener refused or closed before or for bad input, "
            "by listener and reason", ["port", "reason"], registry=r)
        self._failed_at: float | None = None
        self._states: set[str] = set()
        self._peers: set[str] = set()
        self._server: Any = None

    # -- what the coordinator reports --------------------------------------------------
    def status(self, st: dict) -> None:
        """The coordinator's status map (``Membership.status``): epoch, members by state and
        every member's heartbeat age; peers that left lose their series."""
        self.epoch.set(st["epoch"])
        counts: dict[str, int] = {}
        ages = {}
        for m in st["members"]:
            counts[m["state"]] = counts.get(m["state"], 0) + 1
            ages[m["peer_id"]] = m["hb_age"]
        for state in set(counts) | self._states:
            self.members.labels(state).set(counts.get(state, 0))
        self._states |= set(counts)
        for gone in self._peers - set(ages):
            self.heartbeat_age.remove(gone)
        for pid, age in ages.items():
            self.heartbeat_age.labels(pid).set(age)
        self._peers = set(ages)

    # -- what a daemon reports ---------------------------------------------------------
    def call_done(self, op: str, info: dict | None, exc: BaseException | None, seconds: float, now: float) -> None:
        """One collective call ended (``info``: its result's info; ``exc``: its error)."""
        algorithm = (info or {}).get("algorithm", "-")
        outcome = "ok" if exc is None else type(exc).__name__
        self.calls.labels(op, algorithm, outcome).inc()
        self.call_seconds.labels(op).observe(seconds)
        if info:
            self.bytes.labels("tx").inc(info.get("tx_bytes", 0))
            self.bytes.labels("rx").inc(info.get("rx_bytes", 0))
        if exc is not None:
            if self._failed_at is None:
                self._failed_at = now
        elif self._failed_at is not None:
            self.recovery_seconds.observe(now - self._failed_at)
            self._failed_at = None

    def link_traffic(self, source) -> None:
        """Serve ``pccl_link_bytes_total{peer,direction}`` from ``source()``: peer id ->
        [bytes sent, bytes received] (the data plane's ``traffic``), read at each scrape.
        Rates per link (throughput) are ``rate()`` of it in the monitoring system."""
        _lib()
        from prometheus_client.core import CounterMetricFamily

        class _Links:
            def collect(self):
                fam = CounterMetricFamily("pccl_link_bytes", "bytes to and from each peer, headers included",
                                          labels=["peer", "direction"])
                for pid, (tx, rx) in list(source().items()):
                    fam.add_metric([pid, "tx"], tx)
                    fam.add_metric([pid, "rx"], rx)
                yield fam

        self.registry.register(_Links())

    def rejected(self, port: str):
        """A ``count(reason)`` for a daemon listener's :class:`~pccl_py.transport.limits.Gate`
        (``port`` "state" or "data"): ``pccl_rejected_connections_total{port=port,reason}``."""
        return lambda reason: self.rejected_connections.labels(port, reason).inc()

    # -- serving ---------------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` (0: any free port) from a thread; the port."""
        pc = _lib()
        server, thread = pc.start_http_server(port, addr=host, registry=self.registry)
        self._server = (server, thread)
        return server.server_port

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._server = None

    def text(self) -> str:
        """The exposition text, as a scrape would get it."""
        return _lib().generate_latest(self.registry).decode()

