"""ADE20K (SceneParsing, `ADEChallengeData2016` as released): images/{training,validation}/*.jpg beside
annotations/{training,validation}/*.png, one 8-bit label map per image, 0 = "other" (ignored), 1..150 = classes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fdlight.data.annotations import IGNORE, name_some, reduce_zero_label
from fdlight.data.source import data_root
from fdlight.errors import FDLightError, check

RELEASE = "ADEChallengeData2016"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def ade20k_root(root) -> Path:
    """data.root may be ADEChallengeData2016 itself or the folder that holds it."""
    root = data_root(root, f"point it at {RELEASE}/ (or its parent)")
    if not (root / "images").exists() and (root / RELEASE).is_dir():
        root = root / RELEASE
    for sub in ("images", "annotations"):
        check((root / sub).is_dir(), f"data.root={root} has no {sub}/ folder; ADE20K is laid out as "
                                     f"{RELEASE}/images/<split>/*.jpg and {RELEASE}/annotations/<split>/*.png")
    return root


class ADE20K:
    """(image, label) pairs of one split, label maps reduced to 0..K-1 with 255 ignored. Layout, pairing and sizes
    (read from the file headers) are checked when the set is built; label values when a map is read."""

    def __init__(self, root, split: str, transform, num_classes: int = 150, reduce_zero_label: bool = True):
        self.root = ade20k_root(root)
        self.transform, self.num_classes, self.reduce = transform, int(num_classes), bool(reduce_zero_label)
        img_dir, ann_dir = self.root / "images" / split, self.root / "annotations" / split
        for d, what in ((img_dir, "images"), (ann_dir, "annotations")):
            check(d.is_dir(), f"{self.root}/{what} has no {split}/ folder; expected {d}")
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        check(bool(images), f"{img_dir} holds no .jpg images")
        missing = [p.name for p in images if not (ann_dir / (p.stem + ".png")).is_file()]
        if missing:
            raise FDLightError(f"{len(missing)} images in {img_dir} have no label map in {ann_dir}: "
                               f"{name_some(missing)}; add <name>.png for each or remove the images")
        self.samples = [(p, ann_dir / (p.stem + ".png")) for p in images]
        self.check_sizes()

    def check_sizes(self) -> None:
        for img, ann in self.samples:
            with Image.open(img) as a, Image.open(ann) as b:
                if a.size != b.size:
                    raise FDLightError(f"label map {ann} is {b.size[0]}x{b.size[1]} but its image {img.name} is "
                                       f"{a.size[0]}x{a.size[1]}; a label map must match its image pixel for pixel")

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, path: Path) -> np.ndarray:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise FDLightError(f"label map {path} is a {im.mode} image; ADE20K label maps are single-channel "
                                   f"PNGs holding class indices")
            label = np.asarray(im)
        limit = self.num_classes if self.reduce else self.num_classes - 1
        bad = (label > limit) & (self.reduce | (label != IGNORE))  # without the reduction, 255 stays "ignored"
        if bad.any():
            raise FDLightError(f"label map {path} holds class {int(label[bad].max())}, above the {self.num_classes} "
                               f"classes of data.num_classes (valid: 0..{limit}"
                               f"{', 0 = ignored' if self.reduce else ', 255 = ignored'}); fix the file or "
                               f"data.num_classes")
        label = label.astype(np.uint8)
        return reduce_zero_label(label) if self.reduce else label

    def __getitem__(self, index: int):
        img_path, ann_path = self.samples[index]
        with Image.open(img_path) as im:
            image = im.convert("RGB")
        label = self.read_label(ann_path)
        if label.shape != (image.size[1], image.size[0]):
            raise FDLightError(f"label map {ann_path} is {label.shape[1]}x{label.shape[0]} but its image is "
                               f"{image.size[0]}x{image.size[1]}; a label map must match its image")
        return self.transform(image, label)
