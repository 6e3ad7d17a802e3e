"""The ``minicnn`` command: ``minicnn summary``, ``minicnn demo`` (more subcommands as they land)."""
import argparse
import sys
import time

import numpy as np


def _cmd_summary(args):
    from .models import EmotionClassifier
    EmotionClassifier(num_classes=args.num_classes).summary()
    return 0


def _cmd_demo(args):
    """Build the seed network, print its summary and take a few training steps on random faces."""
    import minicnn
    from .models import EmotionClassifier
    minicnn.manual_seed(args.seed)
    model = EmotionClassifier().to(args.device)
    model.summary()
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch_size, 1, 48, 48)).astype(np.float32)
    y = rng.integers(0, 7, args.batch_size)
    from .backend import to_device
    x = to_device(x, args.device)
    crit = minicnn.nn.CrossEntropyLoss()
    opt = minicnn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = crit(model(x), y)
        model.backward(crit.backward())
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - t0
        print(f"step {step + 1}: loss {loss:.4f}  ({args.batch_size / dt:.0f} images/s)")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="minicnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="print the EmotionClassifier's layers, shapes and parameters")
    p.add_argument("--num-classes", type=int, default=7)
    p.set_defaults(func=_cmd_summary)
    p = sub.add_parser("demo", help="build the model and run a few training steps on random data")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .backend import DeviceError
    try:
        return args.func(args)
    except DeviceError as exc:
        print(f"minicnn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
