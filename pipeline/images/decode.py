"""Image bytes -> RGB uint8 array at the model's input size.

Pillow decodes JPEGs at a reduced scale (draft mode) when the target is much smaller than the
stored image, so a 4000 px upload costs about as much as a 500 px one. EXIF orientation is applied
and every mode (grayscale, palette, alpha, CMYK, 16-bit) becomes 8-bit RGB; transparency is
composited on white, the usual product-photo background.

Only common photo formats are decoded (ALLOWED_FORMATS): Pillow's other plugins (EPS runs
Ghostscript, for one) are not for untrusted bytes. A file of a format we recognise but do not
decode is `unsupported_format`; bytes that are no image at all are `not_an_image`. The pixel limit
is checked on the header, before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.errors import ImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.init()  # register every plugin, so ALLOWED_FORMATS and sniff_format see them all
WHITE = (255, 255, 255)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")  # JPEG also opens MPO (camera JPEGs)
# Formats Pillow cannot open but that are images (or documents posing as them).
OTHER_SIGNATURES = {b"ftypheic": "HEIC", b"ftypheix": "HEIC", b"ftypmif1": "HEIF",
                    b"ftypmsf1": "HEIF", b"%PDF": "PDF", b"<svg": "SVG", b"8BPS": "PSD"}


def sniff_format(data: bytes) -> str | None:
    """Name of a known image format these bytes start with, when we do not decode it."""
    head = data[:64]
    for magic, name in OTHER_SIGNATURES.items():
        if magic in head[:12] or (name == "SVG" and b"<svg" in data[:1024]):
            return name
    for name, (_, accept) in Image.OPEN.items():
        if name not in ALLOWED_FORMATS and accept is not None:
            try:
                if accept(head):
                    return name
            except Exception:  # an accept() that cannot judge a short prefix
                continue
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray((arr * (255.0 / top)).round().astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _open(data: bytes) -> Image.Image:
    """Open (header only) as one of the allowed formats; classify what is not."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        other = sniff_format(data)
        if other:
            raise ImageError("unsupported_format", f"{other} images are not supported "
                             f"(supported: {', '.join(ALLOWED_FORMATS)})") from exc
        raise


def open_reduced(data: bytes, size: int, max_pixels: int) -> Image.Image:
    """Open, check the pixel limit on the header, pick the first frame and, for JPEG, ask the
    decoder for a power-of-two reduction that still covers `size` (pixels are decoded later)."""
    im = _open(data)
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError("too_large", f"{width}x{height} pixels exceeds the {max_pixels}-pixel limit")
    if getattr(im, "is_animated", False):
        im.seek(0)
    if im.format in ("JPEG", "MPO"):
        im.draft("RGB", (size, size))
    return im


def decode_image(data: bytes, size: int, max_pixels: int = 100_000_000) -> np.ndarray:
    """Decode, orient, convert, resize the shorter side to `size` and center-crop to a square.

    Raises ImageError with a typed reason; never returns a partial image.
    """
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; Pillow's fixed one would override the option.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = open_reduced(data, size, max_pixels)
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            im = im.resize(
                (size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
            )
            return np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", f"not a recognised image format ({len(data)} bytes, "
                         f"starting {data[:8]!r})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", str(exc)) from exc
    except (OSError, EOFError, SyntaxError) as exc:
        msg = str(exc)
        truncated = isinstance(exc, EOFError) or any(
            s in msg for s in ("truncated", "broken data stream", "end of file", "EOF"))
        kind = "truncated" if truncated else "decode_failed"
        raise ImageError(kind, f"{type(exc).__name__}: {msg}") from exc
    except Exception as exc:
        raise ImageError("decode_failed", f"{type(exc).__name__}: {exc}") from exc
