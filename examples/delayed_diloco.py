"""One-step-delayed DiLoCo: an outer step's all-reduce runs while the next inner steps
do; it is applied at the end of them.

    python examples/delayed_diloco.py
    python examples/delayed_diloco.py --kill-at 10 --join-at 15
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm import main, outer  # noqa: E402


def make(client, model, inner, args):
    from pccl_py.diloco import DelayedDiLoCo

    return DelayedDiLoCo(client, model, **outer(args, 0.7, 0.0), quant=args.quant,
                         algorithm=args.algorithm, inner_optimizer=inner)


if __name__ == "__main__":
    sys.exit(main("delayed", make, __doc__.split("\n\n")[0]))
