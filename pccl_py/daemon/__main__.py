"""``python -m pccl_py.daemon``: run one peer daemon (see :mod:`pccl_py.daemon.service`)."""

import sys

from pccl_py.daemon.service import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
