"""Fine-tuning against training from scratch on a small new label set.

    python examples/finetune_valence.py --fer ../shared/data/fer2013 [--per-class 150] [--seeds 0 1 2]

Builds a 3-class "valence" data set -- positive (happy, surprise), negative (angry, disgust, fear,
sad), neutral -- from FER2013's test/ folder (PublicTest: faces the shipped weights were never
trained on), with ``--per-class`` training images per class and 100 test images per class (disjoint),
in the folder layout ``minicnn finetune`` reads. Then trains the same network three ways, each for
the same epochs, and prints the test accuracy of each (mean over seeds):

* from scratch (``minicnn train``'s recipe);
* fine-tuned, features frozen (``minicnn finetune --freeze features``);
* fine-tuned, everything, the features at 0.1 of the rate (``minicnn finetune``).
"""
import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

from minicnn.data import load_dataset
from minicnn.training import Recipe, Trainer
from minicnn.weights import default_weights_path

VALENCE = {"positive": ("happy", "surprise"), "negative": ("angry", "disgust", "fear", "sad"),
           "neutral": ("neutral",)}


def build(fer, out, per_class, test_per_class=100, seed=0):
    rng = np.random.default_rng(seed)
    for label, emotions in VALENCE.items():
        files = sorted(os.path.join(fer, "test", e, f) for e in emotions
                       for f in os.listdir(os.path.join(fer, "test", e)))
        files = [files[i] for i in rng.permutation(len(files))]
        if len(files) < per_class + test_per_class:
            raise SystemExit(f"{label}: only {len(files)} faces")
        for split, chosen in (("train", files[:per_class]), ("test", files[per_class:per_class + test_per_class])):
            d = os.path.join(out, split, label)
            os.makedirs(d, exist_ok=True)
            for f in chosen:
                shutil.copy(f, os.path.join(d, os.path.basename(os.path.dirname(f)) + "_" + os.path.basename(f)))


def run(data, how, seed, epochs, out):
    base = dict(epochs=epochs, batch_size=32, seed=seed, lr=0.01, warmup_epochs=1.0)
    if how == "scratch":
        recipe = Recipe(**dict(base, lr=0.02))
    elif how == "frozen":
        recipe = Recipe(**base, init=default_weights_path(), freeze="features")
    else:
        recipe = Recipe(**base, init=default_weights_path(), features_lr_scale=0.1)
    trainer = Trainer(data, recipe, out_dir=out, progress=False, log=lambda m: None, overwrite=True)
    trainer.fit()
    return trainer.evaluate("test")["accuracy"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fer", default=os.environ.get("MINICNN_DATA", "../shared/data/fer2013"))
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        build(args.fer, os.path.join(tmp, "valence"), args.per_class)
        data, desc = load_dataset(os.path.join(tmp, "valence"), val_fraction=0.2, seed=0, progress=False,
                                  classes="any")
        print(f"{desc}: {len(data['train'][1])} train / {len(data['val'][1])} validation / "
              f"{len(data['test'][1])} test; {args.epochs} epochs; seeds {args.seeds}", file=sys.stderr)
        rows = []
        for how in ("scratch", "frozen", "finetune"):
            accs = [run(data, how, s, args.epochs, os.path.join(tmp, f"{how}-{s}")) for s in args.seeds]
            rows.append((how, accs))
            print(f"{how:<10} test accuracy {np.mean(accs):.1%} (seeds: {', '.join(f'{a:.1%}' for a in accs)})",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
