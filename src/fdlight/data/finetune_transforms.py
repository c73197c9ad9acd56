"""Transforms of the fine-tuning and linear-probe stages (docs/method.md §2.3, §2.5). Evaluation uses
`fdlight.data.transforms.eval_transform` (ImageNet statistics for both splits, docs/method.md §7.1)."""
from __future__ import annotations

from PIL import Image, ImageOps
from torchvision import transforms as T

from fdlight.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for any bit count: RandAugment's PosterizeIncreasing asks for 0 bits at magnitude 10, which
    Pillow >= 12 rejects; 0 bits is a black image, as older Pillow made it."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def finetune_train_transform(img_size: int, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                             re_prob: float = 0.25, min_scale: float = 0.08):
    """timm's ImageNet training pipeline: bicubic RandomResizedCrop, flip, RandAugment, normalise, RandomErasing
    (pixel mode, one box). Colour jitter is off, as timm ignores it whenever RandAugment is on."""
    from timm.data import create_transform

    tf = create_transform(img_size, is_training=True, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3),
                          hflip=0.5, color_jitter=None, auto_augment=auto_augment or None,
                          interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          re_prob=re_prob, re_mode="pixel", re_count=1)
    for t in tf.transforms:
        for op in getattr(t, "ops", ()):
            if op.aug_fn.__name__ == "posterize":
                op.aug_fn = posterize_any_bits
    return tf


def linear_train_transform(img_size: int, min_scale: float = 0.08) -> T.Compose:
    """The linear-probe augmentation: bicubic RandomResizedCrop and flip only."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
