"""Faces in photos and video: find each face, classify it, draw it.

Face detection is OpenCV's Viola-Jones cascade (``haarcascade_frontalface_default.xml``), which the
OpenCV 4 wheels ship inside the package (no download at run time; OpenCV 5's wheels no longer ship
the cascades, and its neural detectors need a model file fetched separately): ``pip install
'minicnn[apps]'``. It finds frontal faces of 30 px and more in about 5-10 ms on a 640x480 frame on
one core. FER2013's faces are tight crops of about the cascade's box, so each box is classified as
it is (``margin=0``).

    from minicnn.faces import FaceReader
    reader = FaceReader()                       # the shipped weights
    for face in reader.read_image("party.jpg"):
        print(face.box, face.label, face.probabilities)
"""
import os
from dataclasses import dataclass, field

import numpy as np

from .data.images import crop_face, decode_gray

__all__ = ["FaceDetector", "Face", "FaceReader", "LabelSmoother", "draw_faces", "iter_images", "open_video", "label_video",
           "WHOLE_IMAGE_BELOW"]

# An image no larger than this on its longer side is taken to be a face crop already (FER2013's faces
# are 48x48) and classified whole, not searched for faces.
WHOLE_IMAGE_BELOW = 96


class FaceDetector:
    """OpenCV's frontal-face cascade, with settings for photos and webcam frames."""

    def __init__(self, scale_factor=1.1, min_neighbors=5, min_size=30):
        from .extras import require
        cv2 = require("cv2", "face detection")
        path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""),
                            "haarcascade_frontalface_default.xml")
        if not os.path.exists(path):
            from .extras import MissingExtra
            raise MissingExtra(f"OpenCV {cv2.__version__} ships no face cascade (OpenCV 5 wheels do not): "
                               "pip install 'opencv-python-headless<5' (the [apps] extra)")
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise RuntimeError(f"OpenCV could not load its face cascade {path}")
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, int(min_size)

    def detect(self, gray):
        """Boxes (x, y, w, h) of the faces in a uint8 (H, W) image, largest first."""
        gray = np.ascontiguousarray(gray, dtype=np.uint8)
        found = self.cascade.detectMultiScale(gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                              minSize=(self.min_size, self.min_size))
        boxes = [tuple(int(v) for v in b) for b in (found if len(found) else [])]
        return sorted(boxes, key=lambda b: -b[2] * b[3])


@dataclass
class Face:
    box: tuple                      # (x, y, w, h) in the image's pixels (upright)
    label: str
    probabilities: dict = field(default_factory=dict)

    def as_dict(self):
        return {"box": list(self.box), "label": self.label,
                "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()}}


class FaceReader:
    """Faces found and classified: the detector, the weights and their normalisation together."""

    def __init__(self, weights=None, device="cpu", detector=None, margin=0.0):
        from .inference import EmotionPredictor
        self.predictor = EmotionPredictor(weights, device=device)
        self.classes = self.predictor.classes
        self.detector = detector
        self.margin = margin

    def _detector(self):
        if self.detector is None:
            self.detector = FaceDetector()
        return self.detector

    def classify(self, gray, boxes):
        """Probabilities (len(boxes), classes) for the faces at ``boxes`` of a uint8 (H, W) image."""
        if not boxes:
            return np.zeros((0, len(self.classes)))
        faces = np.stack([crop_face(gray, b, self.margin) for b in boxes])
        return self.predictor.predict(faces)

    def faces(self, gray, boxes):
        """A :class:`Face` for each box of a uint8 (H, W) image, classified."""
        return [Face(tuple(b), self.classes[int(p.argmax())], dict(zip(self.classes, map(float, p))))
                for b, p in zip(boxes, self.classify(gray, boxes))]

    def read_gray(self, gray, whole=False):
        """Every face in a uint8 (H, W) image. With ``whole``, or for an image of at most
        WHOLE_IMAGE_BELOW pixels a side (a crop already), its central square is the one face."""
        h, w = gray.shape
        if whole or max(h, w) <= WHOLE_IMAGE_BELOW:
            side = min(h, w)
            boxes = [((w - side) // 2, (h - side) // 2, side, side)]
        else:
            boxes = self._detector().detect(gray)
        return self.faces(gray, boxes)

    def read_image(self, path, whole=False):
        """(uint8 (H, W) upright image, its faces) for an image file (``whole``: see :meth:`read_gray`)."""
        gray = decode_gray(path)
        return gray, self.read_gray(gray, whole)


def iter_images(paths):
    """Files named, and every image file under folders named (walked, sorted; hidden entries skipped)."""
    from .data.images import image_extensions
    extensions = image_extensions()
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and name.lower().endswith(extensions):
                        yield os.path.join(root, name)
        else:
            yield path


def draw_faces(rgb, faces, copy=True):
    """An RGB uint8 (H, W, 3) image with each face boxed and labelled (label and probability)."""
    from PIL import Image, ImageDraw
    im = Image.fromarray(np.array(rgb, copy=copy) if rgb.ndim == 3 else np.stack([rgb] * 3, -1))
    draw = ImageDraw.Draw(im)
    for face in faces:
        x, y, w, h = face.box
        p = face.probabilities.get(face.label, 0.0)
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 64, 64), width=max(2, w // 40))
        text = f"{face.label} {p:.0%}"
        tw = draw.textlength(text)
        ty = y - 14 if y >= 14 else y + h + 2
        draw.rectangle([x, ty, x + tw + 6, ty + 13], fill=(255, 64, 64))
        draw.text((x + 3, ty + 1), text, fill=(255, 255, 255))
    return np.asarray(im)


class LabelSmoother:
    """Labels that do not flicker: each face is followed from frame to frame (the previous box it
    overlaps most, intersection over union >= 0.3) and its probabilities are an exponential moving
    average, p = a * p_now + (1 - a) * p_before."""

    def __init__(self, alpha=0.4):
        self.alpha = float(alpha)
        self.tracks = []                 # [(box, probabilities array)]

    @staticmethod
    def _iou(a, b):
        ax, ay, aw, ah = a
        bx, by, bw, bh = b
        iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
        ih = max(0, min(ay + ah, by + bh) - max(ay, by))
        inter = iw * ih
        return inter / float(aw * ah + bw * bh - inter) if inter else 0.0

    def __call__(self, faces, classes):
        tracks = []
        for face in faces:
            p = np.array([face.probabilities[c] for c in classes])
            best = max(self.tracks, key=lambda t: self._iou(t[0], face.box), default=None)
            if best is not None and self._iou(best[0], face.box) >= 0.3:
                p = self.alpha * p + (1 - self.alpha) * best[1]
            tracks.append((face.box, p))
            face.probabilities = dict(zip(classes, map(float, p)))
            face.label = classes[int(p.argmax())]
        self.tracks = tracks
        return faces


def open_video(source):
    """cv2.VideoCapture of a file or a camera index ("0", 0), or a clear error."""
    from .extras import require
    cv2 = require("cv2", "video")
    camera = isinstance(source, int) or (isinstance(source, str) and source.isdigit())
    if not camera and not os.path.exists(str(source)):
        raise FileNotFoundError(f"no video at {source}")
    cap = cv2.VideoCapture(int(source) if camera else str(source))
    if not cap.isOpened():
        raise OSError(f"camera {int(source)} is not available" if camera else
                      f"cannot open the video {source} (not a video OpenCV can decode?)")
    return cap


def label_video(source, out, reader=None, show=False, smooth=0.4, detect_scale=0.5, log=None, stages=None):
    """Write ``out`` (mp4): every frame of ``source`` with its faces boxed and labelled, at the same
    size and frame rate. Faces are found on the frame scaled by ``detect_scale`` (faster; boxes are
    scaled back) and classified at full resolution. Returns {"frames", "seconds", "fps", "faces"};
    ``stages``, a dict, collects each stage's seconds (decode, detect, classify, draw, encode)."""
    import time
    from .extras import require
    cv2 = require("cv2", "video")
    reader = reader or FaceReader()
    cap = open_video(source)
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    if not np.isfinite(fps) or fps <= 0 or fps > 1000:
        fps = 30.0
    smoother = LabelSmoother(smooth)
    writer, frames, faces_seen = None, 0, 0
    stages = {} if stages is None else stages
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + now - clock[0]
        clock[0] = now
    t0 = time.perf_counter()
    try:
        while True:
            clock[0] = time.perf_counter()
            ok, frame = cap.read()
            lap("decode")
            if not ok or frame is None:
                break
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                if not writer.isOpened():
                    raise OSError(f"cannot write the video {out} (is the folder there, and the name .mp4?)")
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
            small = cv2.resize(gray, None, fx=detect_scale, fy=detect_scale, interpolation=cv2.INTER_AREA) \
                if detect_scale != 1 else gray
            boxes = [tuple(int(round(v / detect_scale)) for v in b) for b in reader._detector().detect(small)]
            lap("detect")
            faces = reader.faces(gray, boxes)
            lap("classify")
            faces = smoother(faces, reader.classes)
            faces_seen += len(faces)
            rgb = draw_faces(frame[..., ::-1] if frame.ndim == 3 else frame, faces)
            bgr = np.ascontiguousarray(rgb[..., ::-1])
            lap("draw")
            writer.write(bgr)
            lap("encode")
            frames += 1
            if show:
                try:
                    cv2.imshow("minicnn video (q quits)", bgr)
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        break
                except cv2.error:
                    raise OSError("--show needs a display and OpenCV with its GUI (opencv-python, not "
                                  "opencv-python-headless)") from None
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        if show:
            try:
                cv2.destroyAllWindows()
            except Exception:
                pass
    seconds = time.perf_counter() - t0
    if frames == 0:
        raise OSError(f"no frame could be read from {source}")
    result = {"frames": frames, "seconds": seconds, "fps": frames / seconds, "faces": faces_seen,
              "video_fps": fps}
    if log:
        log(f"{frames} frames in {seconds:.1f} s: {frames / seconds:.1f} frames/s (decode, detect, classify, "
            f"draw, encode); {faces_seen} faces")
    return result
