"""SparseLoCo-style sparse exchange: the top 2% of each chunk of the pseudo-gradient, in
4 bits, with error feedback, exchanged with all_gather.

    python examples/sparse_loco.py
    python examples/sparse_loco.py --density 0.01 --bits 2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm import main, outer  # noqa: E402


def options(p):
    p.add_argument("--density", type=float, default=0.02)
    p.add_argument("--bits", type=int, choices=[2, 4], default=4)


def make(client, model, inner, args):
    from pccl_py.diloco import SparseLoCo

    return SparseLoCo(client, model, density=args.density, bits=args.bits, chunk=4096, **outer(args, 1.0, 0.0),
                      inner_optimizer=inner)


if __name__ == "__main__":
    sys.exit(main("sparse", make, __doc__.split("\n\n")[0], options))
