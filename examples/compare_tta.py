"""Which test-time augmentation helps? Accuracy of each set of views on the validation split.

    python examples/compare_tta.py --data path/to/fer2013 [--weights runs/x/best.npz]

Each variant averages the softmax over its views (the face, its mirror, shifted copies); the
validation split is the seeded 10% of Training that ``minicnn train`` holds out, never the test
set. One standard error at 66% on 2,872 faces is about 0.9 points: read small gaps as noise.
"""
import argparse

import numpy as np

from minicnn.data import load_dataset, normalize
from minicnn.inference import EmotionPredictor


def shifted(x, d, diagonals=False):
    moves = [(d, 0), (-d, 0), (0, d), (0, -d)] + ([(d, d), (d, -d), (-d, d), (-d, -d)] if diagonals else [])
    return [np.roll(x, m, axis=(2, 3)) for m in moves]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="FER2013 folder or CSV (default: the built-in faces)")
    parser.add_argument("--weights", default=None, help="default: the shipped weights")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    predictor = EmotionPredictor(args.weights)
    data, _ = load_dataset(args.data, val_fraction=args.val_fraction, seed=args.seed)
    images, labels = data["val"]
    x = normalize(images, predictor.mean, predictor.std)
    mirror = x[..., ::-1]
    variants = {
        "none": [x],
        "flip": [x, mirror],
        "flip + 4 shifts of 2 px (--tta)": [x, mirror] + shifted(x, 2),
        "flip x 4 shifts of 2 px": [x, mirror] + shifted(x, 2) + shifted(mirror, 2),
        "flip x 8 shifts of 2 px": [x, mirror] + shifted(x, 2, True) + shifted(mirror, 2, True),
        "flip x 4 shifts of 1 px": [x, mirror] + shifted(x, 1) + shifted(mirror, 1),
        "flip x 4 shifts of 3 px": [x, mirror] + shifted(x, 3) + shifted(mirror, 3),
    }
    for name, views in variants.items():
        probs = 0
        for view in views:
            z = predictor.session.run(np.ascontiguousarray(view))
            z = np.exp(z - z.max(axis=1, keepdims=True))
            probs = probs + z / z.sum(axis=1, keepdims=True)
        print(f"{name:34s} {(probs.argmax(axis=1) == labels).mean():7.2%}  ({len(views)} views)")


if __name__ == "__main__":
    main()
