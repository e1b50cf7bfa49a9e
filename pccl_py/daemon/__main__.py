"""``python -m pccl_py.daemon``: run one peer daemon (see :mod:`pccl_py.daemon.service`)."""

from pccl_py.daemon.service import main

if __name__ == "__main__":
    main()
