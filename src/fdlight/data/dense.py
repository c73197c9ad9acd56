"""Dense-prediction data: the embedded synthetic scenes as segmentation and detection sets, the transforms of the
segmentation (mmseg ADE20K pipeline) and detection (large-scale jitter, fixed square) recipes, and one DataModule per
task that reads the synthetic scenes, ADE20K or COCO by `data.name`."""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from fdlight.data.ade20k import ADE20K
from fdlight.data.annotations import IGNORE, reduce_zero_label
from fdlight.data.coco import CocoDetection
from fdlight.data.seeded import check_fits_a_batch, loader_workers, training_loader
from fdlight.data.synthetic import make_scene, synthetic_splits
from fdlight.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fdlight.errors import FDLightError


def collate_lists(batch):
    """Batches of differently sized samples: a tuple of images and a tuple of targets."""
    return tuple(zip(*batch))


# ------------------------------------------------------------------------------------------------ segmentation
class SegmentationTrainTransform:
    """mmseg's ADE20K training pipeline at crop c: resize to fit (4c, c) x ratio in `ratio_range` (aspect kept),
    random c x c crop in which no class covers more than `cat_max_ratio` (10 tries), flip, photometric jitter,
    ImageNet normalisation, pad to c x c (image 0 after normalisation, label 255)."""

    def __init__(self, crop: int, ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75, photometric: bool = True):
        self.crop, self.ratio_range, self.cat_max_ratio = int(crop), tuple(ratio_range), float(cat_max_ratio)
        # mmseg PhotoMetricDistortion: brightness +-32/255, contrast and saturation x[0.5, 1.5], hue +-18/180
        self.jitter = T.ColorJitter(32 / 255, 0.5, 0.5, 0.05) if photometric else None
        self.normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, image: Image.Image, label: np.ndarray):
        c = self.crop
        w, h = image.size
        r = random.uniform(*self.ratio_range)
        scale = min(4 * c * r / max(h, w), c * r / min(h, w))
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        image = image.resize((nw, nh), Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
        ch, cw = min(c, nh), min(c, nw)
        for _ in range(10):
            y0, x0 = random.randint(0, nh - ch), random.randint(0, nw - cw)
            window = label[y0:y0 + ch, x0:x0 + cw]
            counts = np.bincount(window[window != IGNORE].ravel())
            counts = counts[counts > 0]
            if self.cat_max_ratio >= 1 or (len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio):
                break
        image = image.crop((x0, y0, x0 + cw, y0 + ch))
        label = window
        if random.random() < 0.5:
            image, label = image.transpose(Image.FLIP_LEFT_RIGHT), label[:, ::-1]
        if self.jitter is not None:
            image = self.jitter(image)
        x = torch.zeros(3, c, c)
        x[:, :ch, :cw] = self.normalize(TF.to_tensor(image))
        y = torch.full((c, c), IGNORE, dtype=torch.long)
        y[:ch, :cw] = torch.from_numpy(np.array(label, dtype=np.int64))
        return x, y


class SegmentationEvalTransform:
    """Resize to fit (4c, c) with the aspect kept (short side c); the label keeps the original size, so mIoU is
    measured at the annotation's resolution (predictions are resized back)."""

    def __init__(self, crop: int):
        self.crop = int(crop)
        self.normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, image: Image.Image, label: np.ndarray):
        w, h = image.size
        scale = min(4 * self.crop / max(h, w), self.crop / min(h, w))
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        return self.normalize(TF.to_tensor(image)), torch.from_numpy(np.array(label, dtype=np.int64))


class SyntheticSegmentation:
    """Semantic masks of the embedded scenes; label 0 (background) is ignored as ADE20K's 0, shapes are 0..K-1."""

    def __init__(self, split: str, length: int, size: int, num_classes: int, seed: int, transform):
        self.split, self.length, self.size, self.num_classes, self.seed = split, length, size, num_classes, seed
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        scene = make_scene(index, self.split, self.size, self.num_classes, self.seed)
        return self.transform(Image.fromarray(scene.image), reduce_zero_label(scene.semantic))


# --------------------------------------------------------------------------------------------------- detection
def _resize_masks(masks: torch.Tensor, size) -> torch.Tensor:
    if masks.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.uint8)
    return F.interpolate(masks[None].float(), size=size, mode="nearest")[0].to(torch.uint8)


class LargeScaleJitter:
    """ViTDet-style input for a fixed-window backbone: resize so the long side is `size` x s (training: s uniform in
    `scale_range`; evaluation: s = 1), random crop to size x size and flip when training, pad bottom-right to a
    size x size square with the mean colour (0 after normalisation). Training targets follow the image; evaluation
    targets stay in the original frame, with `scale` to map predictions back."""

    def __init__(self, size: int, scale_range=(0.1, 2.0), train: bool = True):
        self.size, self.scale_range, self.train = int(size), tuple(scale_range), train
        self.fill = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)

    def __call__(self, image: Image.Image, target: dict):
        w, h = image.size
        s = random.uniform(*self.scale_range) if self.train else 1.0
        scale = s * self.size / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = TF.to_tensor(image.resize((nw, nh), Image.BILINEAR))
        if not self.train:
            target = dict(target, scale=torch.tensor([nw / w, nh / h]), size=torch.tensor([h, w]))
            return self._pad(img), target
        masks = _resize_masks(target["masks"], (nh, nw))
        boxes = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        y0, x0 = random.randint(0, max(nh - self.size, 0)), random.randint(0, max(nw - self.size, 0))
        img, masks = img[:, y0:y0 + self.size, x0:x0 + self.size], masks[:, y0:y0 + self.size, x0:x0 + self.size]
        ch, cw = img.shape[-2:]
        boxes = boxes - torch.tensor([x0, y0, x0, y0])
        boxes = torch.stack([boxes[:, 0].clamp(0, cw), boxes[:, 1].clamp(0, ch), boxes[:, 2].clamp(0, cw),
                             boxes[:, 3].clamp(0, ch)], dim=1)
        if random.random() < 0.5:
            img, masks = img.flip(-1), masks.flip(-1)
            boxes = torch.stack([cw - boxes[:, 2], boxes[:, 1], cw - boxes[:, 0], boxes[:, 3]], dim=1)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1) & masks.flatten(1).bool().any(1)
        padded = torch.zeros((int(keep.sum()), self.size, self.size), dtype=torch.uint8)
        padded[:, :ch, :cw] = masks[keep]
        return self._pad(img), {"boxes": boxes[keep], "labels": target["labels"][keep], "masks": padded}

    def _pad(self, img: torch.Tensor) -> torch.Tensor:
        out = self.fill.expand(3, self.size, self.size).clone()
        out[:, :img.shape[1], :img.shape[2]] = img
        return out


def boxes_of(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (pixel edges) of boolean masks (N, H, W)."""
    out = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


class SyntheticDetection:
    """Instances of the embedded scenes: boxes, masks and labels 1..K (0 is the detector's background)."""

    def __init__(self, split: str, length: int, size: int, num_classes: int, seed: int, transform):
        self.split, self.length, self.size, self.num_classes, self.seed = split, length, size, num_classes, seed
        self.transform = transform
        self.classes = [f"class_{i}" for i in range(num_classes)]
        self.empty_images = self.skipped = 0  # every scene has at least one shape

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        scene = make_scene(index, self.split, self.size, self.num_classes, self.seed)
        masks = np.stack(scene.masks) if scene.masks else np.zeros((0, self.size, self.size), bool)
        target = {"boxes": torch.from_numpy(boxes_of(masks)), "labels": torch.tensor(scene.labels).long() + 1,
                  "masks": torch.from_numpy(masks).to(torch.uint8),
                  "iscrowd": torch.zeros(len(scene.labels), dtype=torch.long), "image_id": index}
        return self.transform(Image.fromarray(scene.image), target)


# ------------------------------------------------------------------------------------------------- DataModules
class _DenseData(L.LightningDataModule):
    """`seed` (the run's) fixes the training order and every sample's augmentation (fdlight.data.seeded)."""

    def __init__(self, cfg: DictConfig, batch_size: int, eval_batch_size: int, seed: int = 0):
        super().__init__()
        self.cfg, self.batch_size, self.eval_batch_size = cfg, int(batch_size), int(eval_batch_size)
        self.seed = int(seed)
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.splits(self.cfg)
            check_fits_a_batch(self.train_set, self.batch_size)

    def splits(self, c: DictConfig) -> tuple:
        """(train set, val set) of the data config."""
        raise NotImplementedError

    def _train_loader(self, collate=None) -> DataLoader:
        return training_loader(self.train_set, self.batch_size, self.seed, loader_workers(self.cfg.num_workers), self.trainer,
                               collate_fn=collate, pin_memory=torch.cuda.is_available())

    def _eval_loader(self) -> DataLoader:
        workers = loader_workers(self.cfg.num_workers)
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                          collate_fn=collate_lists)


class SegmentationData(_DenseData):
    """Semantic segmentation: synthetic scenes or ADE20K. Training batches are stacked crops; evaluation batches are
    tuples of images (short side = crop) and full-resolution labels."""

    def __init__(self, cfg: DictConfig, batch_size: int, crop_size: int, ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, photometric: bool = True, eval_batch_size: int = 1, seed: int = 0):
        super().__init__(cfg, batch_size, eval_batch_size, seed)
        self.train_transform = SegmentationTrainTransform(crop_size, ratio_range, cat_max_ratio, photometric)
        self.eval_transform = SegmentationEvalTransform(crop_size)

    @property
    def num_classes(self) -> int:
        return int(self.cfg.num_classes)

    def splits(self, c: DictConfig) -> tuple:
        if c.name == "synthetic":
            return synthetic_splits(SyntheticSegmentation, c, self.train_transform, self.eval_transform)
        if c.name == "ade20k":
            opts = dict(num_classes=c.num_classes, reduce_zero_label=c.reduce_zero_label)
            return (ADE20K(c.root, "training", self.train_transform, **opts),
                    ADE20K(c.root, "validation", self.eval_transform, **opts))
        raise FDLightError(f"data={c.name} has no segmentation masks; use data=ade20k or data=synthetic")

    def train_dataloader(self) -> DataLoader:
        return self._train_loader()

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()


class DetectionData(_DenseData):
    """Instance detection and segmentation: synthetic scenes or COCO, as fixed-size squares (large-scale jitter)."""

    def __init__(self, cfg: DictConfig, batch_size: int, img_size: int, scale_range=(0.1, 2.0),
                 eval_batch_size: int = 1, seed: int = 0):
        super().__init__(cfg, batch_size, eval_batch_size, seed)
        self.train_transform = LargeScaleJitter(img_size, scale_range, train=True)
        self.eval_transform = LargeScaleJitter(img_size, train=False)

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.train_set.classes)

    @property
    def classes(self) -> list[str]:
        self.setup()
        return list(self.train_set.classes)

    def splits(self, c: DictConfig) -> tuple:
        if c.name == "synthetic":
            return synthetic_splits(SyntheticDetection, c, self.train_transform, self.eval_transform)
        if c.name != "coco":
            raise FDLightError(f"data={c.name} has no instance annotations; use data=coco or data=synthetic")
        train = CocoDetection(c.root, "train", self.train_transform, empty_images=c.empty_images, train=True)
        val = CocoDetection(c.root, "val", self.eval_transform, empty_images="keep", train=False)
        if val.classes != train.classes:
            raise FDLightError(f"the train and val COCO jsons under {c.root}/annotations list different "
                               f"categories; use the same category list in both")
        if c.get("num_classes") and int(c.num_classes) != len(train.classes):
            raise FDLightError(f"data.num_classes={c.num_classes} but the COCO json has {len(train.classes)} "
                               f"categories; set data.num_classes=null or fix it")
        return train, val

    @property
    def image_counts(self) -> dict:
        """Images without annotations: how many were found and how many the training set skipped."""
        self.setup()
        return {"empty_images_train": self.train_set.empty_images, "skipped_images_train": self.train_set.skipped,
                "empty_images_val": self.val_set.empty_images}

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(collate_lists)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()
