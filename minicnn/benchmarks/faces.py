"""Face detectors compared: which of the cascades OpenCV 4's wheels ship finds FER2013 faces in
photos, how fast, and what the whole predict pipeline then gets right.

    minicnn bench --faces [--data ../shared/data/fer2013] [--per-class 40]

``--per-class`` test faces of each emotion (PublicTest) are scaled to 100-220 px and pasted at random
places into 640x480 frames of noise-textured grey (seeded); each detector then looks for them. A face
counts as found when a box's centre lies inside the pasted face and its side is within a factor 1.5;
the label is that box's. Compared: classifying the whole frame's central square (no detector), each
cascade, and the crops themselves (the ceiling).
"""
import argparse
import json
import os
import time

import numpy as np

CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt.xml",
            "haarcascade_frontalface_alt2.xml", "haarcascade_frontalface_alt_tree.xml")


def _frames(root, per_class, seed=0):
    from PIL import Image
    from ..data import EMOTIONS
    rng = np.random.default_rng(seed)
    for label, emotion in enumerate(EMOTIONS):
        folder = os.path.join(root, "test", emotion)
        names = sorted(os.listdir(folder))
        for name in [names[i] for i in rng.permutation(len(names))[:per_class]]:
            face = Image.open(os.path.join(folder, name)).convert("L")
            side = int(rng.integers(100, 221))
            x, y = int(rng.integers(0, 640 - side)), int(rng.integers(0, 480 - side))
            frame = np.clip(rng.normal(110, 25, (480, 640)), 0, 255).astype(np.uint8)
            frame[y:y + side, x:x + side] = np.asarray(face.resize((side, side), Image.LANCZOS))
            yield frame, (x, y, side), label, np.asarray(face)


def run(root, per_class=40):
    import cv2
    from ..faces import FaceDetector, FaceReader
    reader = FaceReader()
    cases = list(_frames(root, per_class))
    rows = {}
    crops = reader.predictor.predict(np.stack([c[3] for c in cases]))
    rows["the crops themselves (ceiling)"] = dict(found=1.0, accuracy=float(np.mean(
        crops.argmax(1) == [c[2] for c in cases])), ms=None)
    t = time.perf_counter()
    whole = [reader.classify(f, [(80, 0, 480, 480)])[0].argmax() for f, _, _, _ in cases]
    rows["no detector (central square)"] = dict(found=None, accuracy=float(np.mean(
        np.array(whole) == [c[2] for c in cases])), ms=1e3 * (time.perf_counter() - t) / len(cases))
    for name in CASCADES:
        det = FaceDetector()
        det.cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, name))
        found = right = 0
        t_detect = 0.0
        for frame, (x, y, side), label, _ in cases:
            t = time.perf_counter()
            small = cv2.resize(frame, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
            boxes = [tuple(2 * v for v in b) for b in det.detect(small)]
            t_detect += time.perf_counter() - t
            hit = [b for b in boxes if x <= b[0] + b[2] / 2 <= x + side and y <= b[1] + b[3] / 2 <= y + side
                   and side / 1.5 <= b[2] <= side * 1.5]
            if hit:
                found += 1
                right += int(reader.classify(frame, hit[:1])[0].argmax() == label)
        rows[name] = dict(found=found / len(cases), accuracy=right / len(cases), ms=1e3 * t_detect / len(cases))
    return {"faces": len(cases), "rows": rows}


def main(argv=None):
    from .run import RESULTS
    p = argparse.ArgumentParser(prog="minicnn bench --faces", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("MINICNN_DATA", "../shared/data/fer2013"))
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data, "test")):
        print(f"minicnn: error: --data {args.data}: the FER2013 folder (with test/) is needed", flush=True)
        return 2
    result = run(args.data, args.per_class)
    print(f"{result['faces']} FER2013 test faces in 640x480 frames:")
    print(f"{'detector':<42}{'faces found':>12}{'right':>8}{'ms/frame':>10}")
    for name, r in result["rows"].items():
        found = "-" if r["found"] is None else f"{r['found']:.0%}"
        ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
        print(f"{name:<42}{found:>12}{r['accuracy']:>8.1%}{ms:>10}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "faces-latest.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0
