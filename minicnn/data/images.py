"""One image decoder for everything that reads pictures: predict, explain, visualize, the datasets.

``decode_face(path)`` (or ``face_from_image(pil_image)``) gives the uint8 (48, 48) grayscale face the
network takes:

1. open with Pillow, refusing decompression bombs (more than ``MAX_PIXELS`` pixels) with a clear
   error instead of a warning or an exhausted memory;
2. turn it upright from its EXIF orientation (phone photos are stored sideways and say so);
3. grayscale from any mode Pillow opens: 8-bit modes directly; 16-bit and 32-bit integer images
   ("I;16", "I") and float images ("F") scaled by their range to 0..255, not clipped (a 16-bit PNG
   clipped at 255 is all white, a float TIFF in 0..1 truncated to 0 all black); an alpha channel
   composited on white;
4. the central square (the same crop for a photo, a dataset image or a face crop of any shape: no
   squashing), resized to 48x48 with Lanczos filtering.
"""
import numpy as np

from .errors import DatasetError

__all__ = ["ImageError", "decode_face", "decode_gray", "decode_rgb", "face_from_image", "crop_face", "MAX_PIXELS",
           "image_extensions"]

MAX_PIXELS = 64_000_000      # 64 megapixels: a 8000x8000 photo; more is refused, not decoded


class ImageError(DatasetError):
    """An image that cannot be read or decoded; the message names the file."""


def image_extensions():
    """The file endings Pillow can open here (lower case, with the dot)."""
    from PIL import Image
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def _to_gray(im):
    """A Pillow image of any mode -> float64 (H, W) in 0..255."""
    from PIL import Image
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im.convert("F") if im.mode != "F" else im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            return a / 257.0                                   # 0..65535 -> 0..255
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if im.mode == "F" and lo >= 0 and hi <= 1:
            return np.nan_to_num(a, nan=0.0) * 255.0           # a float image in 0..1
        if lo >= 0 and hi <= 255:
            return np.nan_to_num(a, nan=0.0)                   # already 0..255
        span = hi - lo if hi > lo else 1.0
        return np.nan_to_num((a - lo) / span * 255.0, nan=0.0)  # any other range: stretched
    return np.asarray(im.convert("L"), dtype=np.float64)


def gray_from_image(im):
    """A Pillow image (any size or mode) -> uint8 (H, W): upright (EXIF), grayscale (steps 2-3)."""
    from PIL import ImageOps
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:                     # a broken EXIF block: keep the image as stored
        pass
    return np.clip(np.rint(_to_gray(im)), 0, 255).astype(np.uint8)


def crop_face(gray, box, margin=0.0):
    """The face in ``box`` = (x, y, w, h) of a uint8 (H, W) image, its square grown by ``margin`` of
    its side on each side (clipped to the image), resized to uint8 (48, 48)."""
    from PIL import Image
    x, y, w, h = (int(v) for v in box)
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    left, top = int(round(max(0, cx - side / 2))), int(round(max(0, cy - side / 2)))
    right, bottom = int(round(min(gray.shape[1], cx + side / 2))), int(round(min(gray.shape[0], cy + side / 2)))
    if right - left < 1 or bottom - top < 1:
        raise ImageError(f"face box {box} is outside the image ({gray.shape[1]}x{gray.shape[0]})")
    square = Image.fromarray(np.ascontiguousarray(gray[top:bottom, left:right]))
    return np.asarray(square.resize((48, 48), Image.LANCZOS), dtype=np.uint8)


def face_from_image(im, name="image"):
    """A Pillow image (any size or mode) -> uint8 (48, 48): upright, grayscale, central square, 48x48."""
    from PIL import Image
    gray = gray_from_image(im)
    h, w = gray.shape
    side = min(h, w)
    if side < 1:
        raise ImageError(f"{name} has no pixels ({w}x{h})")
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(gray[top:top + side, left:left + side])
    if square.size != (48, 48):
        square = square.resize((48, 48), Image.LANCZOS)
    return np.asarray(square, dtype=np.uint8)


def decode_gray(path):
    """Read an image file as uint8 (H, W): upright, grayscale, full size (for finding faces in it)."""
    return _decode(path, gray_from_image)


def decode_rgb(path):
    """Read an image file as uint8 (H, W, 3) RGB, upright (for drawing on)."""
    def rgb(im):
        from PIL import ImageOps
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:
            pass
        return np.asarray(im.convert("RGB"))
    return _decode(path, rgb)


def decode_face(path):
    """Read an image file and prepare it as :func:`face_from_image` does; a clear error names the file."""
    return _decode(path, lambda im: face_from_image(im, name=str(path)))


def _decode(path, convert):
    from PIL import Image, UnidentifiedImageError
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2         # (Pillow refuses past twice this: our MAX_PIXELS)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"{path}: {im.width}x{im.height} pixels is more than minicnn decodes "
                                     f"({MAX_PIXELS:,}); a decompression bomb, or a photo to scale down first")
                im.load()
                return convert(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"no image at {path}") from None
    except IsADirectoryError:
        raise ImageError(f"{path} is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: refused as a decompression bomb ({exc})") from None
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"cannot decode image {path}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
