"""The image DataModule of the distillation, fine-tuning and linear-probe stages (distillation ignores the labels).
Its sources: the embedded synthetic set, ImageFolder trees, fdlight's own shards, any images (data=images) and
WebDataset shards written by other tools (data=webdataset). Above every source sit the same decoders, the
skip-and-count rule, the per-sample seeding and the epoch order (docs/architecture.md, "Data sources")."""
from __future__ import annotations

import functools

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from fdlight.data.decode import check_decode, train_decoding
from fdlight.data.folders import SafeImageFolder, class_folder
from fdlight.data.images import image_splits
from fdlight.data.seeded import batches_drawn, check_fits_a_batch, loader_workers, training_loader
from fdlight.data.shards import ShardedImages, split_folder
from fdlight.data.streams import ShardStream, StreamLoader, shard_stream
from fdlight.data.synthetic import SyntheticClassification, synthetic_splits
from fdlight.errors import FDLightError, check


UNLABELLED = ("images", "webdataset")  # sources read for distillation, which needs no label


def check_root(data_cfg, with_val: bool = False) -> None:
    """A folder dataset's root is set and laid out as ImageFolder trees (train/, and val/ when `with_val`)."""
    c = data_cfg
    check(c.name not in UNLABELLED, f"data={c.name} holds no class labels (or no labelled val split) to train a "
                                    f"classifier on; use data=imagenet or data=shards (ImageFolder's layout)")
    check(not OmegaConf.is_missing(c, "root") and bool(c.root),
          f"data={c.name} needs data.root=<folder holding train/<class>/<image>"
          f"{' and val/<class>/<image>' if with_val else ''}>")
    for split in ("train", "val") if with_val else ("train",):
        if c.name == "shards":
            split_folder(c.root, split)
        else:
            class_folder(c.root, split)


class ClassificationData(L.LightningDataModule):
    """`seed` (the run's) fixes the training order and every sample's augmentation (fdlight.data.seeded)."""

    def __init__(self, cfg: DictConfig, batch_size: int, train_transform, val_transform=None, with_val: bool = False,
                 seed: int = 0, stage: str = "distill"):
        super().__init__()
        self.cfg, self.batch_size, self.with_val, self.seed = cfg, batch_size, with_val, int(seed)
        self.decode = check_decode(cfg, stage) if cfg.name != "synthetic" else "pil"  # generated in memory
        self.train_transform, self.val_transform = train_decoding(train_transform, self.decode), val_transform
        self.train_set = self.val_set = None
        self.gpu_decoding = None

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
        if c.name == "images":
            return image_splits(c, self.train_transform, self.val_transform)
        if c.name == "webdataset":
            return shard_stream(c, self.train_transform, self.batch_size, self.seed), None
        check_root(c, self.with_val)
        train = self.split("train", self.train_transform)
        val = self.split("val", self.val_transform) if self.with_val else None
        if val is not None and val.classes != train.classes:
            raise FDLightError(f"{c.root}/val and {c.root}/train have different class folders ({len(val.classes)} vs "
                               f"{len(train.classes)}); use the same class names in both")
        return train, val

    def held_out(self):
        """The held-out split alone, through the val transform (diagnostics, k-NN monitoring); a source with none
        (a stream, images with nothing held out) is one FDLightError that says so."""
        c = self.cfg
        if c.name in ("synthetic", "images"):
            val = self.splits(c)[1]
        else:
            check(c.name != "webdataset", "data=webdataset streams its shards and holds no val split")
            check_root(c, with_val=True)
            val = self.split("val", self.val_transform)
        check(val is not None, f"data={c.name} holds no images out; set data.val_root or data.val_fraction")
        return val

    def split(self, name: str, transform):
        """One split of a folder dataset: an ImageFolder tree, or the tar shards written from one (data=shards)."""
        c = self.cfg
        if c.name == "shards":
            return ShardedImages(split_folder(c.root, name), transform, c.strict)
        return SafeImageFolder(class_folder(c.root, name), transform, c.strict)

    def set_transforms(self, train, val=None) -> None:
        """Attach transforms after setup (a stage may need the class count before it can build them)."""
        train = train_decoding(train, self.decode)
        self.train_transform, self.val_transform = train, val
        for dataset, tf in ((self.train_set, train), (self.val_set, val)):
            if dataset is not None:
                dataset.transform = tf

    @property
    def skipped_images(self) -> int:
        return sum(getattr(s, "skipped", 0) for s in (self.train_set, self.val_set) if s is not None)

    def train_dataloader(self) -> DataLoader:
        collate = None
        if self.decode == "gpu":
            from fdlight.data.gpu import GPUDecoding, collate_encoded

            self.gpu_decoding, collate = GPUDecoding(self.train_transform), collate_encoded
        if isinstance(self.train_set, ShardStream):
            t = self.trainer
            world, rank = (t.world_size, t.global_rank) if t is not None else (1, 0)
            self.train_set.place(world, rank, loader_workers(self.cfg.num_workers))
            return StreamLoader(self.train_set, functools.partial(batches_drawn, t) if t is not None else None,
                                collate_fn=collate, pin_memory=torch.cuda.is_available())
        return training_loader(self.train_set, self.batch_size, self.seed, loader_workers(self.cfg.num_workers),
                               self.trainer,
                               collate_fn=collate, pin_memory=torch.cuda.is_available())

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.gpu_decoding is None or self.trainer is None:
            return batch
        return self.gpu_decoding(batch, self.trainer.strategy.root_device)  # data.decode=gpu: decoded where it trains

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        workers = loader_workers(self.cfg.num_workers)
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
