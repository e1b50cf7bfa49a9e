"""The coordinator: the run's membership service, one process per run.

Run it as ``python -m pccl_py.coordinator`` or ``pccl coordinator``.
:mod:`~pccl_py.coordinator.server` moves bytes and time; the decisions are made by the
sans-I/O cores :mod:`~pccl_py.coordinator.membership`, :mod:`~pccl_py.coordinator.state_sync`
and :mod:`~pccl_py.coordinator.election`.
"""
