"""Tools on top of the runtime: the ``pccl`` command, the demo, the benchmarks, status."""
