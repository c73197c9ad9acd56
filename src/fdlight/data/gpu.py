"""`data.decode=gpu`: the distillation view decoded and augmented on the GPU.

The data workers only read each file and draw its RandomResizedCrop and flip, exactly as the CPU transform draws
them (same generator, same order, inside the per-sample seeded scope); the batch goes to the GPU as JPEG bytes and
is decoded there in one call (torchvision.io.decode_jpeg on CUDA, nvJPEG), then each image is cropped, resized
(bilinear with antialiasing, rounded to 8 bits as PIL's resize is), flipped and normalised. On a CPU trainer the same
code runs on the CPU in the main process, which is how it is tested against the PIL path.

What the workers check is the file's header (PIL reads it to draw the crop): a file whose header reads but whose
data is corrupt fails the batch's decoding and stops the run; `data.decode=pil` finds, skips and counts such files.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from fdlight.data.pixels import orientation, upright_size
from fdlight.errors import FDLightError, Unreadable, check


@dataclass
class Encoded:
    data: torch.Tensor    # the file's bytes (uint8)
    params: torch.Tensor  # top, left, height, width, flip, EXIF orientation (int64)


@dataclass
class EncodedBatch:
    data: list[torch.Tensor]
    params: torch.Tensor  # (B, 6)


class EncodedView:
    """The worker's half of the distillation transform (RandomResizedCrop, RandomHorizontalFlip, ToTensor,
    Normalize): the crop and flip drawn from the header's size, the file's bytes kept for the GPU."""

    decodes = True  # the dataset hands over the opened file

    def __init__(self, transform: T.Compose):
        steps = list(transform.transforms)
        kinds = (T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize)
        check(len(steps) == 4 and all(isinstance(s, k) for s, k in zip(steps, kinds)),
              "data.decode=gpu runs the distillation transform (RandomResizedCrop, flip, normalise) on the GPU; "
              "this transform is another: use data.decode=pil")
        self.crop, flip, _, norm = steps
        self.flip_p = float(flip.p)
        self.size = (self.crop.size[0], self.crop.size[1])
        self.mean, self.std = list(norm.mean), list(norm.std)

    def __call__(self, img) -> Encoded:
        width, height = upright_size(img)  # the crop is drawn on the upright image, as the PIL path draws it
        shape = torch.empty(1, 1, 1).expand(1, height, width)  # the size get_params reads, with no pixels
        top, left, h, w = self.crop.get_params(shape, self.crop.scale, self.crop.ratio)
        flip = bool(torch.rand(1) < self.flip_p)  # RandomHorizontalFlip's own draw, after the crop's
        if img.format != "JPEG":
            raise Unreadable(f"not a JPEG ({img.format}) under data.decode=gpu")
        img.fp.seek(0)
        data = img.fp.read()
        return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                       torch.tensor([top, left, h, w, int(flip), orientation(img)], dtype=torch.int64))


def collate_encoded(samples) -> tuple[EncodedBatch, torch.Tensor]:
    views, targets = zip(*samples)
    return EncodedBatch([v.data for v in views], torch.stack([v.params for v in views])), torch.tensor(targets)


def decode_batch(batch: EncodedBatch, size: tuple[int, int], mean, std, device: torch.device) -> torch.Tensor:
    """The batch's images decoded on `device`, cropped, resized, flipped and normalised: (B, 3, H, W) float."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        images = decode_jpeg(batch.data, mode=ImageReadMode.RGB, device=device)  # stored pixels, as on CUDA
    except RuntimeError as e:
        raise FDLightError(f"a JPEG of this batch cannot be decoded ({str(e).splitlines()[0]}); run with "
                           f"data.decode=pil, which skips and counts unreadable files") from e
    mean_t = torch.tensor(mean, device=device).view(3, 1, 1) * 255
    std_t = torch.tensor(std, device=device).view(3, 1, 1) * 255
    out = torch.empty(len(images), 3, *size, device=device)
    for k, (img, (top, left, h, w, flip, turn)) in enumerate(zip(images, batch.params.tolist())):
        img = upright(img, turn)
        crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
        x = F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        x = x.round_().clamp_(0, 255)  # PIL's resize returns 8-bit pixels
        if flip:
            x = x.flip(-1)
        out[k] = (x - mean_t) / std_t
    return out


def upright(img: torch.Tensor, turn: int) -> torch.Tensor:
    """A decoded (C, H, W) image turned upright by its EXIF orientation, as fdlight.data.pixels turns a PIL image
    (torchvision applies the orientation on the CPU only)."""
    if turn in (5, 7):  # the transposes: along the main diagonal, then (7) half a turn
        img = img.transpose(-2, -1)
    if turn in (3, 7):
        return img.flip(-1).flip(-2)
    if turn == 2:
        return img.flip(-1)
    if turn == 4:
        return img.flip(-2)
    if turn in (6, 8):  # a quarter turn clockwise (6) or anticlockwise (8)
        return torch.rot90(img, -1 if turn == 6 else 1, dims=(-2, -1))
    return img


class GPUDecoding:
    """The DataModule's half: decodes a training batch of EncodedView samples where the trainer runs."""

    def __init__(self, view: EncodedView):
        self.size, self.mean, self.std = view.size, view.mean, view.std

    def __call__(self, batch, device: torch.device):
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], EncodedBatch):
            return (decode_batch(batch[0], self.size, self.mean, self.std, device), *batch[1:])
        return batch
