"""Image bytes -> RGB uint8 array at the model's input size.

Pillow decodes JPEGs at a reduced scale (draft mode) when the target is much smaller than the
stored image, so a 4000 px upload costs about as much as a 500 px one. EXIF orientation is applied
and every mode (grayscale, palette, alpha, CMYK, 16-bit) becomes 8-bit RGB; transparency is
composited on white, the usual product-photo background.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.errors import ImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
WHITE = (255, 255, 255)


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


def decode_image(data: bytes, size: int, max_pixels: int = 100_000_000) -> np.ndarray:
    """Decode, orient, convert, resize the shorter side to `size` and center-crop to a square.

    Raises ImageError with a typed reason; never returns a partial image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(
                    "too_large", f"{width}x{height} pixels exceeds the {max_pixels}-pixel limit"
                )
            if getattr(im, "is_animated", False):
                im.seek(0)
            if im.format == "JPEG":
                # Reduce by a power of two while decoding; result stays >= size on both sides.
                im.draft("RGB", (size, size))
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
        raise ImageError("not_an_image", f"not a recognised image: {exc}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", str(exc)) from exc
    except OSError as exc:
        msg = str(exc)
        kind = "truncated" if "truncated" in msg or "broken data stream" in msg else "decode_failed"
        raise ImageError(kind, f"{type(exc).__name__}: {msg}") from exc
    except Exception as exc:
        raise ImageError("decode_failed", f"{type(exc).__name__}: {exc}") from exc
