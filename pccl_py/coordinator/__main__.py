"""``python -m pccl_py.coordinator``: run the coordinator (see :mod:`pccl_py.coordinator.server`)."""

import sys

from pccl_py.coordinator.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
