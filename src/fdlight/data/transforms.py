"""Image transforms of the FD stages (docs/method.md §1.8, §2.3)."""
from __future__ import annotations

from torchvision import transforms as T

from fdlight.constants import IMAGENET_MEAN, IMAGENET_STD


def fd_train_transform(img_size: int, min_scale: float = 0.08) -> T.Compose:
    """The distillation augmentation: RandomResizedCrop (bilinear) + flip, ImageNet normalisation; one view feeds
    both student and teacher."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(img_size: int, crop_pct: float = 224 / 256) -> T.Compose:
    """Resize the short side to img_size / crop_pct (256 for 224), centre-crop, ImageNet normalisation (the official
    code's CLIP statistics at evaluation are a bug, docs/method.md §7.1)."""
    return T.Compose([
        T.Resize(int(round(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
