"""DiLoCo: every 20 inner steps the peers average their pseudo-gradients and take an
outer Nesterov step; the model then holds the run's parameters on every peer.

    python examples/diloco.py                       # 4 trainers on this machine
    python examples/diloco.py --quant uint8         # the exchange in 8 bits
    python examples/diloco.py --kill-at 10 --join-at 15
    python examples/diloco.py --coordinator HOST:PORT   # one trainer of a run elsewhere
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm import main, outer  # noqa: E402


def make(client, model, inner, args):
    from pccl_py.diloco import DiLoCo

    return DiLoCo(client, model, **outer(args, 0.7, 0.9), quant=args.quant, algorithm=args.algorithm,
                  inner_optimizer=inner)


if __name__ == "__main__":
    sys.exit(main("diloco", make, __doc__.split("\n\n")[0]))
