"""``python -m pccl_py``: the ``pccl`` command (see :mod:`pccl_py.tools.cli`)."""

import sys

from pccl_py.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
