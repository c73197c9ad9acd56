"""The image-classification DataModule (synthetic or ImageFolder), shared by the distillation, fine-tuning and
linear-probe stages; distillation ignores the labels."""
from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from fdlight.data.folders import SafeImageFolder, check_root, class_folder
from fdlight.data.seeded import check_fits_a_batch, training_loader
from fdlight.data.synthetic import SyntheticClassification, synthetic_splits
from fdlight.errors import FDLightError


class ClassificationData(L.LightningDataModule):
    """`seed` (the run's) fixes the training order and every sample's augmentation (fdlight.data.seeded)."""

    def __init__(self, cfg: DictConfig, batch_size: int, train_transform, val_transform=None, with_val: bool = False,
                 seed: int = 0):
        super().__init__()
        self.cfg, self.batch_size, self.with_val, self.seed = cfg, batch_size, with_val, int(seed)
        self.train_transform, self.val_transform = train_transform, val_transform
        self.train_set = self.val_set = None

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.train_set.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.splits(self.cfg)
            check_fits_a_batch(self.train_set, self.batch_size)

    def splits(self, c: DictConfig) -> tuple:
        if c.name == "synthetic":
            return synthetic_splits(SyntheticClassification, c, self.train_transform, self.val_transform,
                                    self.with_val)
        check_root(c, self.with_val)
        train = SafeImageFolder(class_folder(c.root, "train"), self.train_transform, c.strict)
        val = SafeImageFolder(class_folder(c.root, "val"), self.val_transform, c.strict) if self.with_val else None
        if val is not None and val.classes != train.classes:
            raise FDLightError(f"{c.root}/val and {c.root}/train have different class folders ({len(val.classes)} vs "
                               f"{len(train.classes)}); use the same class names in both")
        return train, val

    def set_transforms(self, train, val=None) -> None:
        """Attach transforms after setup (a stage may need the class count before it can build them)."""
        self.train_transform, self.val_transform = train, val
        for dataset, tf in ((self.train_set, train), (self.val_set, val)):
            if dataset is not None:
                dataset.transform = tf

    @property
    def skipped_images(self) -> int:
        return sum(getattr(s, "skipped", 0) for s in (self.train_set, self.val_set) if s is not None)

    def train_dataloader(self) -> DataLoader:
        return training_loader(self.train_set, self.batch_size, self.seed, int(self.cfg.num_workers), self.trainer,
                               pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        workers = int(self.cfg.num_workers)
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
