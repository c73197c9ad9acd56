"""COCO 2017 instances as released: train2017/, val2017/ and annotations/instances_{train,val}2017.json, with
polygon, uncompressed-RLE and compressed-RLE masks (decoded by faster-coco-eval's mask utilities). Category ids
become contiguous labels 1..K in id order (0 is the detector's background)."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdlight.data.annotations import name_some
from fdlight.data.source import data_root
from fdlight.errors import FDLightError, check


def coco_paths(root, split: str) -> tuple[Path, Path]:
    root = data_root(root, "point it at the COCO folder holding train2017/, val2017/ and annotations/")
    images, ann = root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"
    check((root / "annotations").is_dir(), f"data.root={root} has no annotations/ folder; COCO is laid out as "
                                           f"train2017/, val2017/ and annotations/instances_{{train,val}}2017.json")
    check(ann.is_file(), f"{ann} is missing; put the COCO 2017 instances json there")
    check(images.is_dir(), f"data.root={root} has no {split}2017/ image folder")
    return images, ann


def load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise FDLightError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                           f"re-download or repair the annotation file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise FDLightError(f"cannot read {path} ({type(e).__name__}: {e})") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    check(not missing, f"{path} has no {', '.join(missing)} list; it is not a COCO instances file")
    return data


def decode_mask(segm, h: int, w: int) -> np.ndarray:
    """A COCO `segmentation` (polygons, uncompressed RLE with list counts, or compressed RLE) as a bool (h, w) map."""
    from faster_coco_eval.core import mask as mask_util

    if isinstance(segm, list):  # polygons: one RLE per part, merged
        parts = [p for p in segm if len(p) >= 6]
        if not parts:
            return np.zeros((h, w), dtype=bool)
        rle = mask_util.merge(mask_util.frPyObjects(parts, h, w))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_util.frPyObjects(segm, *segm["size"])
    elif isinstance(segm, dict):
        rle = segm
    else:
        raise ValueError(f"unknown segmentation type {type(segm).__name__}")
    return mask_util.decode(rle).astype(bool)


class CocoDetection:
    """Images of one split with their boxes, masks and labels. Training targets leave out crowd regions; evaluation
    targets keep them flagged `iscrowd` (COCO's rule). Images without (non-crowd) annotations are counted, and
    skipped or kept by `empty_images`."""

    def __init__(self, root, split: str, transform, empty_images: str = "skip", train: bool = True):
        check(empty_images in ("skip", "keep"), f"data.empty_images={empty_images!r}; use skip or keep")
        self.image_dir, self.ann_file = coco_paths(root, split)
        self.transform, self.train = transform, train
        data = load_json(self.ann_file)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.classes = [c.get("name", str(c["id"])) for c in cats]
        self.images = {img["id"]: img for img in data["images"]}
        self.anns = defaultdict(list)
        for a in data["annotations"]:
            if a.get("image_id") not in self.images:
                raise FDLightError(f"{self.ann_file}: annotation {a.get('id')} refers to image id "
                                   f"{a.get('image_id')}, which is not in its images list")
            if a.get("category_id") not in self.cat_to_label:
                raise FDLightError(f"{self.ann_file}: annotation {a.get('id')} has category_id "
                                   f"{a.get('category_id')}, which is not in its categories list")
            self.anns[a["image_id"]].append(a)
        on_disk = set(os.listdir(self.image_dir))
        missing = [img["file_name"] for img in data["images"] if img["file_name"] not in on_disk]
        if missing:
            raise FDLightError(f"{self.ann_file} references {len(missing)} images missing from {self.image_dir}: "
                               f"{name_some(missing)}; restore them or remove their entries from the json")
        ids = sorted(self.images)
        empty = [i for i in ids if not any(not a.get("iscrowd", 0) for a in self.anns[i])]
        self.empty_images = len(empty)
        self.skipped = len(empty) if empty_images == "skip" else 0
        self.ids = [i for i in ids if i not in set(empty)] if empty_images == "skip" else ids
        check(bool(self.ids), f"{self.ann_file} has no image with annotations; pass data.empty_images=keep or "
                              f"check the json")

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, image_id: int, h: int, w: int) -> dict:
        boxes, labels, masks, crowd, area = [], [], [], [], []
        for a in self.anns[image_id]:
            if self.train and a.get("iscrowd", 0):
                continue
            x, y, bw, bh = a["bbox"]
            if bw < 1 or bh < 1:
                continue
            try:
                masks.append(decode_mask(a["segmentation"], h, w))
            except (ValueError, KeyError, TypeError) as e:
                raise FDLightError(f"{self.ann_file}: annotation {a.get('id')} has an unreadable segmentation "
                                   f"({e}); fix or remove it") from e
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self.cat_to_label[a["category_id"]])
            crowd.append(int(a.get("iscrowd", 0)))
            area.append(float(a.get("area", bw * bh)))
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.long),
                "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), bool)).to(torch.uint8),
                "iscrowd": torch.tensor(crowd, dtype=torch.long), "area": torch.tensor(area),
                "image_id": image_id}

    def __getitem__(self, index: int):
        info = self.images[self.ids[index]]
        path = self.image_dir / info["file_name"]
        with Image.open(path) as im:
            image = im.convert("RGB")
        h, w = int(info.get("height", image.size[1])), int(info.get("width", image.size[0]))
        if (w, h) != image.size:
            raise FDLightError(f"{path} is {image.size[0]}x{image.size[1]} but {self.ann_file.name} says {w}x{h}; "
                               f"fix the json's width/height")
        return self.transform(image, self.target(info["id"], h, w))
