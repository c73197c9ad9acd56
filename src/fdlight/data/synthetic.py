"""The embedded dataset: procedural scenes of coloured shapes, one seeded generator for every task.

Each scene has a textured background and 1-3 shapes. A shape's class fixes its outline (5 kinds) and its colour family
(warm or cool), so 10 classes in all. From one scene come: the class of the largest visible shape (classification),
a semantic mask (0 = background, k + 1 = class k) and per-instance masks and boxes (detection).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SPLITS = {"train": 0, "val": 1}
NUM_SHAPES = 5  # circle, square, triangle, cross, ring
FAMILIES = (((200, 40, 30), (230, 140, 20)), ((30, 80, 210), (20, 170, 150)))  # warm, cool base colours


@dataclass
class Scene:
    image: np.ndarray        # (H, W, 3) uint8
    semantic: np.ndarray     # (H, W) uint8, 0 = background, k + 1 = class k
    labels: list[int]        # class of each visible instance
    masks: list[np.ndarray]  # (H, W) bool per visible instance
    label: int               # class of the largest visible instance


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == 0:
        draw.ellipse(box, fill=fill)
    elif kind == 1:
        draw.rectangle(box, fill=fill)
    elif kind == 2:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif kind == 3:
        w = r / 2.5
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    else:
        draw.ellipse(box, outline=fill, width=max(2, int(r / 2.5)))


def make_scene(index: int, split: str = "train", size: int = 64, num_classes: int = 10, seed: int = 0) -> Scene:
    """Scene `index` of `split`: the same arguments always give the same scene."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(60, 190, size=3)
    tilt = rng.uniform(-50, 50, size=(2, 3))
    bg = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1] + rng.normal(0, 12, size=(size, size, 3))
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    owner = np.full((size, size), -1, dtype=np.int16)
    classes = []
    for i in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(num_classes))
        kind, family = cls % NUM_SHAPES, (cls // NUM_SHAPES) % 2
        colour = np.array(FAMILIES[family][int(rng.integers(2))]) + rng.normal(0, 15, 3)
        r = rng.uniform(0.12, 0.3) * size
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
        shape = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(shape), kind, cx, cy, r, 255)
        _draw_shape(draw, kind, cx, cy, r, tuple(int(c) for c in np.clip(colour, 0, 255)))
        owner[np.asarray(shape) > 0] = i
        classes.append(cls)
    masks, labels = [], []
    for i, cls in enumerate(classes):
        m = owner == i
        if m.sum() >= 4:
            masks.append(m)
            labels.append(cls)
    semantic = np.zeros((size, size), dtype=np.uint8)
    for m, cls in zip(masks, labels):
        semantic[m] = cls + 1
    largest = labels[int(np.argmax([m.sum() for m in masks]))] if masks else classes[0]
    return Scene(np.asarray(canvas).copy(), semantic, labels, masks, largest)


class SyntheticClassification:
    """(PIL image, class index) pairs, the ImageFolder interface (classes, targets) included."""

    def __init__(self, split: str, length: int, size: int = 64, num_classes: int = 10, seed: int = 0,
                 transform=None):
        self.split, self.length, self.size, self.num_classes, self.seed = split, length, size, num_classes, seed
        self.transform = transform
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        scene = make_scene(index, self.split, self.size, self.num_classes, self.seed)
        img = Image.fromarray(scene.image)
        return (self.transform(img) if self.transform else img), scene.label


def synthetic_splits(dataset, c, train_transform, val_transform, with_val: bool = True) -> tuple:
    """The train (and val) sets of a synthetic dataset class, sized and seeded by data.*."""
    train = dataset("train", c.num_train, c.raw_size, c.num_classes, c.seed, train_transform)
    return train, dataset("val", c.num_val, c.raw_size, c.num_classes, c.seed, val_transform) if with_val else None
