"""Train the EmotionClassifier, the readable way. Copy this file and change what you like.

    python examples/train_fer.py                                  # built-in faces, a few minutes on 2 cores
    python examples/train_fer.py --data path/to/fer2013           # FER2013 (folder or fer2013.csv)
    python examples/train_fer.py --data path/to/fer2013 --epochs 50 --device gpu
    python examples/train_fer.py --data path/to/fer2013 --device gpu --cuda-graph   # steps replayed as CUDA graphs
    mpiexec -n 4 python examples/train_fer.py --distributed --batch-size 256 --bn sync   # data-parallel, 4 ranks

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
    parser.add_argument("--distributed", action="store_true",
                        help="one data-parallel run over mpiexec's processes (--batch-size is the global batch)")
    parser.add_argument("--bn", default="local", choices=["local", "sync"],
                        help="with --distributed: each rank's BatchNorm statistics, or the global batch's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/train_fer")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--target", type=float, default=None, help="minimum test accuracy, 0..1")
    args = parser.parse_args()
    if args.cuda_graph and args.device != "gpu":
        parser.error("--cuda-graph needs --device gpu")
    if args.distributed and args.cuda_graph:
        parser.error("--cuda-graph with --distributed is not supported yet")
    comm = None
    if args.distributed:
        # Every rank runs this script. MPI starts them; an exception on one ends them all.
        from minicnn.distributed import init
        comm = init(args.device)
    speaks = comm is None or comm.rank == 0          # rank 0 alone prints
    say = print if speaks else (lambda *a, **k: None)
    say(f"minicnn {minicnn.__version__}")

    # 1. Data: uint8 faces (N, 48, 48) and labels, split into train / validation / test.
    data, description = load_dataset(args.data, seed=args.seed)
    builtin = description.startswith("built-in")
    say(f"data: {description}")

    # 2. The recipe: SGD with Nesterov momentum, cosine schedule with warm-up, label smoothing,
    #    augmentation (affine jitter, crop, flip). See minicnn/training/trainer.py.
    recipe = Recipe(epochs=args.epochs or (4 if builtin else 50), batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed)

    # 3. Train: forward, loss, backward by hand, optimizer step; checkpoints every epoch.
    if comm is None:
        trainer = Trainer(data, recipe, out_dir=args.out, device=args.device, data_description=description,
                          cuda_graph=args.cuda_graph)
    else:   # each rank trains on its slice of every global batch; gradients summed in one all-reduce
        from minicnn.distributed import DistributedTrainer
        trainer = DistributedTrainer(data, recipe, comm=comm, bn=args.bn, out_dir=args.out, device=args.device,
                                     data_description=description)
    if speaks:
        trainer.model.summary()
    trainer.fit(resume=args.resume)

    # 4. Test with the best-by-validation weights (the test split was never used to choose them).
    report = trainer.evaluate("test")
    say(format_report(report, EMOTIONS))
    target = args.target if args.target is not None else (0.90 if builtin else 0.60)
    if report["accuracy"] < target:
        say(f"FAILED: test accuracy {report['accuracy']:.2%} is below the target {target:.0%}")
        return 1
    say(f"test accuracy {report['accuracy']:.2%} (target {target:.0%}): ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
