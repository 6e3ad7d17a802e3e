"""Train the EmotionClassifier, the readable way. Copy this file and change what you like.

    python examples/train_fer.py                                  # built-in faces, a few minutes on 2 cores
    python examples/train_fer.py --data path/to/fer2013           # FER2013 (folder or fer2013.csv)
    python examples/train_fer.py --data path/to/fer2013 --epochs 50 --device gpu
    python examples/train_fer.py --data path/to/fer2013 --device gpu --cuda-graph   # steps replayed as CUDA graphs

Exits non-zero if the test accuracy falls below --target (90% on the built-in
faces, 60% on FER2013 by default), like tinygrad's examples.
"""
import argparse
import sys

import minicnn
from minicnn.data import EMOTIONS, load_dataset
from minicnn.training import Recipe, Trainer, format_report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="FER2013 folder or CSV (default: $MINICNN_DATA or built-in)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--cuda-graph", action="store_true", help="with --device gpu: each step replayed as a CUDA graph")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/train_fer")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--target", type=float, default=None, help="minimum test accuracy, 0..1")
    args = parser.parse_args()
    if args.cuda_graph and args.device != "gpu":
        parser.error("--cuda-graph needs --device gpu")

    # 1. Data: uint8 faces (N, 48, 48) and labels, split into train / validation / test.
    data, description = load_dataset(args.data, seed=args.seed)
    builtin = description.startswith("built-in")
    print(f"data: {description}")

    # 2. The recipe: SGD with Nesterov momentum, cosine schedule with warm-up, label smoothing,
    #    augmentation (affine jitter, crop, flip). See minicnn/training/trainer.py.
    recipe = Recipe(epochs=args.epochs or (4 if builtin else 50), batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed)

    # 3. Train: forward, loss, backward by hand, optimizer step; checkpoints every epoch.
    trainer = Trainer(data, recipe, out_dir=args.out, device=args.device, data_description=description,
                      cuda_graph=args.cuda_graph)
    trainer.model.summary()
    trainer.fit(resume=args.resume)

    # 4. Test with the best-by-validation weights (the test split was never used to choose them).
    report = trainer.evaluate("test")
    print(format_report(report, EMOTIONS))
    target = args.target if args.target is not None else (0.90 if builtin else 0.60)
    if report["accuracy"] < target:
        print(f"FAILED: test accuracy {report['accuracy']:.2%} is below the target {target:.0%}")
        return 1
    print(f"test accuracy {report['accuracy']:.2%} (target {target:.0%}): ok")
    return 0


if __name__ == "__main__":
    print(f"minicnn {minicnn.__version__}")
    sys.exit(main())
