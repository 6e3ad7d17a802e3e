"""End-to-end frames per second of ``minicnn video``: decode, detect, classify, draw, encode.

    minicnn bench --video [--frames 150] [--repeats 3]

A 640x480 clip with one face moving across it (a built-in face drawing at 160 px, so no data set
is needed) is written to a temporary folder, then labelled ``--repeats`` times after one warm-up
run; the median frames per second and each stage's time per frame are printed and written to
``video-latest.json`` beside the other results.
"""
import argparse
import json
import os
import platform
import tempfile

import numpy as np

__all__ = ["make_clip", "run", "main"]


def make_clip(path, frames=150, fps=30, size=(640, 480), face=160):
    import cv2
    from PIL import Image
    from ..data import make_faces
    drawing = np.asarray(Image.fromarray(make_faces(1, seed=0, labels=[3])[0][0]).resize((face, face)))
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for i in range(frames):
        frame = np.full((h, w), 90, np.uint8)
        x = int((w - face) * (0.5 + 0.4 * np.sin(i / 15)))
        frame[(h - face) // 2:(h + face) // 2, x:x + face] = drawing
        writer.write(np.repeat(frame[..., None], 3, axis=2))
    writer.release()


def run(frames=150, repeats=3):
    from ..faces import FaceReader, label_video
    reader = FaceReader()
    with tempfile.TemporaryDirectory() as tmp:
        clip = os.path.join(tmp, "clip.mp4")
        make_clip(clip, frames)
        label_video(clip, os.path.join(tmp, "warm.mp4"), reader=reader)          # compiles, warms caches
        runs, stages = [], []
        for r in range(repeats):
            st = {}
            runs.append(label_video(clip, os.path.join(tmp, f"out{r}.mp4"), reader=reader, stages=st))
            stages.append(st)
    fps = [r["fps"] for r in runs]
    best = int(np.argsort(fps)[len(fps) // 2])
    per_frame = {k: 1e3 * v / runs[best]["frames"] for k, v in stages[best].items()}
    return {"frames": frames, "size": [640, 480], "faces_per_frame": runs[best]["faces"] / runs[best]["frames"],
            "fps_median": float(np.median(fps)), "fps_runs": fps, "ms_per_frame_by_stage": per_frame,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def main(argv=None):
    from .run import RESULTS
    p = argparse.ArgumentParser(prog="minicnn bench --video", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    result = run(args.frames, args.repeats)
    print(f"minicnn video, 640x480, one face: {result['fps_median']:.1f} frames/s (median of "
          f"{args.repeats}: {', '.join(f'{f:.1f}' for f in result['fps_runs'])}); per frame: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in result["ms_per_frame_by_stage"].items()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "video-latest.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0
