"""The ``pccl`` command: coordinator, daemon, status, bench, demo."""

from __future__ import annotations

import sys

USAGE = """usage: pccl <command> [options]

commands:
  coordinator   run the coordinator of a run          (pccl coordinator --listen HOST:PORT)
  daemon        run a peer daemon                     (pccl daemon --coordinator HOST:PORT --group G)
  status        show who is in a run                  (pccl status --coordinator HOST:PORT [--json])
  bench         benchmarks: kernels|allreduce|sync  (pccl bench allreduce --world 2 --compare gloo)
  demo          local DiLoCo run with peers killed and rejoining

'pccl <command> --help' describes each command's options.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "coordinator":
        from pccl_py.coordinator.server import main as run
    elif cmd == "daemon":
        from pccl_py.daemon.service import main as run
    elif cmd == "status":
        from pccl_py.tools.status import main as run
    elif cmd == "demo":
        from pccl_py.tools.demo import main as run
    elif cmd == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            print("usage: pccl bench {kernels,allreduce,sync} [options]")
            return 0 if rest else 2
        kind, rest = rest[0], rest[1:]
        if kind == "kernels":
            from pccl_py.tools.bench.kernels import main as run
        elif kind == "allreduce":
            from pccl_py.tools.bench.allreduce import main as run
        elif kind == "sync":
            from pccl_py.tools.bench.sync import main as run
        else:
            print(f"pccl bench: unknown benchmark {kind!r} (kernels, allreduce, sync)", file=sys.stderr)
            return 2
    else:
        print(f"pccl: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
