"""How stored pixels become the 8-bit upright RGB image every transform reads, whatever the file holds
(greyscale, palette, CMYK, RGBA, 16-bit; an EXIF orientation)."""
from __future__ import annotations

import numpy as np
from PIL import Image

ORIENTATION = 0x0112  # the EXIF tag that says how the camera was held
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16- and 32-bit integer greyscale (16-bit PNG, TIFF)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn that undoes it (as ImageOps.exif_transpose)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image (1, upright, when it has none); reads the header only."""
    try:
        return int(img.getexif().get(ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the pixels as they are stored
        return 1


def as_rgb(img: Image.Image) -> Image.Image:
    """The image decoded as 8-bit RGB and turned upright by its EXIF orientation: greyscale, palette, CMYK and RGBA
    converted (alpha dropped), 16-bit greyscale scaled to 8 bits (PIL's convert would clip it). An upright RGB
    file is only loaded (convert would copy every pixel once more)."""
    turn = orientation(img)
    if img.mode in WIDE_MODES:
        wide = np.asarray(img.convert("I"), dtype=np.int64)
        img = Image.fromarray(np.clip(wide >> 8, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette's transparency goes straight to RGB
    if img.mode == "RGB":
        img.load()
    else:
        img = img.convert("RGB")
    return img.transpose(UPRIGHT[turn]) if turn in UPRIGHT else img


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied (a quarter turn swaps them)."""
    w, h = img.size
    return (h, w) if orientation(img) in (5, 6, 7, 8) else (w, h)  # TRANSPOSE, ROTATE_*, TRANSVERSE
