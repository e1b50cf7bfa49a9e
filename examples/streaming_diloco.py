"""Streaming DiLoCo: the model in fragments, each exchanged once per outer step at its
own offset, overlapping a few inner steps, merged with a mixing factor.

    python examples/streaming_diloco.py                  # 3 fragments, overlap 5 steps
    python examples/streaming_diloco.py --quant uint4    # 4-bit exchange
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm import main, outer  # noqa: E402


def options(p):
    p.add_argument("--fragments", type=int, default=3)
    p.add_argument("--overlap", type=int, default=5, help="inner steps an exchange overlaps")
    p.add_argument("--mix", type=float, default=0.5, help="weight of the local parameters in the merge")


def make(client, model, inner, args):
    from pccl_py.diloco import StreamingDiLoCo

    return StreamingDiLoCo(client, model, fragments=args.fragments, sync_every=args.inner_steps,
                           overlap=args.overlap, mix=args.mix, **outer(args, 0.7, 0.9),
                           quant=args.quant, algorithm=args.algorithm, inner_optimizer=inner)


if __name__ == "__main__":
    sys.exit(main("streaming", make, __doc__.split("\n\n")[0], options))
