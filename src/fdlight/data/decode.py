"""How a training image is decoded (`data.decode`):

- `pil` (default): the whole JPEG is decoded, then the stage's transform runs on it (torchvision's and timm's own).
- `pil_draft`: the transform's RandomResizedCrop is drawn first, from the size in the file's header and from the
  same generator in the same order as the crop itself draws it; the JPEG is then decoded at 1/2, 1/4 or 1/8 scale
  (libjpeg's DCT scaling, PIL's `Image.draft`) when the crop still has at least the output resolution in the reduced
  image, and the crop box is mapped into it. Where no reduction is possible (a crop smaller than twice the output
  on either side) the result is the `pil` one, bit for bit. The rest of the transform is unchanged.
- `gpu` (distillation only): the data workers read the file and draw the crop and flip; the batch is decoded on the
  GPU (torchvision.io.decode_jpeg, nvJPEG) and cropped, resized, flipped and normalised there (fdlight.data.gpu).

Every random draw stays inside the per-sample seeded scope of fdlight.data.seeded, so exact resume holds for all.
"""
from __future__ import annotations

from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from fdlight.data.gpu import EncodedView
from fdlight.data.pixels import as_rgb, orientation
from fdlight.errors import FDLightError, Unreadable, check

DECODERS = ("pil", "pil_draft", "gpu")
PIL_RESAMPLE = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
                InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.LANCZOS: Image.LANCZOS,
                InterpolationMode.BOX: Image.BOX, InterpolationMode.HAMMING: Image.HAMMING}


def check_decode(data_cfg, stage: str) -> str:
    """`data.decode` is one of DECODERS and the stage's transform can use it."""
    decode = str(data_cfg.get("decode") or "pil")
    check(decode in DECODERS, f"data.decode={decode!r} is not a decoder; choose one of: {', '.join(DECODERS)}")
    check(decode != "gpu" or stage == "distill",
          f"data.decode=gpu decodes and augments the distillation view on the GPU; stage={stage}'s augmentation "
          f"(RandAugment, RandomErasing) runs on PIL images: use data.decode=pil or pil_draft")
    return decode


def reduction(crop_w: int, crop_h: int, out_w: int, out_h: int) -> int:
    """The largest libjpeg scale denominator (8, 4, 2 or 1) that leaves the crop at least the output's size."""
    return next((s for s in (8, 4, 2) if crop_w >= s * out_w and crop_h >= s * out_h), 1)


def decode_reduced(img: Image.Image, scale: int) -> tuple[Image.Image, float, float]:
    """Decode an opened (not yet loaded) image as RGB at 1/scale when it is a JPEG; the factors that map original
    coordinates into the decoded image (1 when it was decoded whole)."""
    width, height = img.size
    if scale > 1 and img.format == "JPEG":
        img.draft("RGB", (width // scale, height // scale))  # libjpeg picks the largest scale with at least this
    try:
        rgb = as_rgb(img)
    except Exception as e:  # noqa: BLE001 - any decoder error means an unreadable file
        raise Unreadable(f"{type(e).__name__}") from e
    return rgb, rgb.size[0] / width, rgb.size[1] / height


class DraftDecode:
    """A training transform whose first step is a RandomResizedCrop (torchvision's or timm's), run on an opened but
    not yet decoded image: the crop is drawn by the crop's own `get_params` (the header's size is all it reads),
    the image decoded at the largest reduction that keeps the crop at least at the output size, the crop box mapped
    into the reduced image and resized with the crop's interpolation; the transform's other steps follow as they
    are."""

    decodes = True  # the dataset hands over the opened file, not a decoded image

    def __init__(self, transform):
        steps = list(transform.transforms)
        crop = steps[0]
        check(all(hasattr(crop, a) for a in ("get_params", "scale", "ratio", "size", "interpolation")),
              f"data.decode=pil_draft needs a training transform that starts with a RandomResizedCrop, not "
              f"{type(crop).__name__}")
        self.crop, self.rest = crop, type(transform)(steps[1:])

    def __call__(self, img: Image.Image):
        crop = self.crop
        if orientation(img) != 1:  # stored turned: decoded whole and upright, then exactly the pil path
            return self.rest(crop(decode_reduced(img, 1)[0]))
        top, left, h, w = crop.get_params(img, crop.scale, crop.ratio)  # the same draws as the crop's own forward
        interpolation = crop.interpolation
        if isinstance(interpolation, (tuple, list)):  # timm's "random" interpolation: its draw comes next
            import random
            interpolation = random.choice(interpolation)
        out_h, out_w = (crop.size, crop.size) if isinstance(crop.size, int) else tuple(crop.size)
        scale = reduction(w, h, out_w, out_h) if getattr(img, "format", None) == "JPEG" else 1
        view, fx, fy = decode_reduced(img, scale)
        if fx == 1 and fy == 1:  # decoded whole: exactly the crop's own path
            return self.rest(F.resized_crop(view, top, left, h, w, [out_h, out_w], interpolation))
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        return self.rest(view.resize((out_w, out_h), PIL_RESAMPLE[interpolation], box=box))


def train_decoding(transform, decode: str):
    """The training transform for `data.decode`: as it is for pil, wrapped for pil_draft and gpu."""
    if transform is None or decode == "pil":
        return transform
    if decode == "pil_draft":
        return DraftDecode(transform)
    if decode == "gpu":
        return EncodedView(transform)
    raise FDLightError(f"data.decode={decode!r} is not a decoder; choose one of: {', '.join(DECODERS)}")
