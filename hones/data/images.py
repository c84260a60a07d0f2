"""Image files: opening with clear errors, and the blue OCR box of HONES_METHOD §1."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, UnidentifiedImageError

from hones.data.errors import DataError

OCR_BOX_COLOR = (0, 0, 255)


def open_image(path: str | os.PathLike[str], item: object | None = None) -> Image.Image:
    """Open ``path`` fully decoded as RGB; DataError naming the file if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file not found", item=item, field="image")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(path, f"cannot decode image ({type(err).__name__}: {err})", item=item, field="image") from err


def verify_image(path: str | os.PathLike[str], item: object | None = None) -> None:
    """Check that ``path`` exists and decodes (used by loaders with ``verify_images=True``)."""
    open_image(path, item=item)


def ocr_box_width(img: Image.Image) -> int:
    """Outline width of the OCR box: 1 px at 64 px, growing with the shorter image side."""
    return max(1, round(min(img.size) / 100))


def draw_ocr_box(img: Image.Image, bbox: Sequence[float], width: int | None = None) -> Image.Image:
    """Return a copy of ``img`` with a blue rectangle around ``bbox = [x, y, w, h]``.

    The outline lies just outside the box (its inner edge touches the bbox), so the
    text itself is never covered; it is clipped to the image.
    """
    if len(bbox) != 4:
        raise ValueError(f"bbox must be [x, y, w, h], got {list(bbox)}")
    out = img.convert("RGB") if img.mode != "RGB" else img.copy()
    line = width or ocr_box_width(out)
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = int(round(x)), int(round(y))
    x1, y1 = int(round(x + w)), int(round(y + h))  # exclusive right/bottom edge
    outer = [x0 - line, y0 - line, x1 + line - 1, y1 + line - 1]
    max_x, max_y = out.width - 1, out.height - 1
    outer = [
        min(max(outer[0], 0), max_x),
        min(max(outer[1], 0), max_y),
        min(max(outer[2], 0), max_x),
        min(max(outer[3], 0), max_y),
    ]
    if outer[2] > outer[0] and outer[3] > outer[1]:
        ImageDraw.Draw(out).rectangle(outer, outline=OCR_BOX_COLOR, width=line)
    return out
