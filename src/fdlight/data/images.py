"""`data=images`: unlabelled images as they are stored. `data.root=DIR` reads every image under DIR at any depth
(jpg, jpeg, png, webp, bmp, tif, tiff in any letter case), in sorted order; `data.list=FILE` reads the files a list
names, one a line (relative paths are relative to the list's folder). Held out from training: `data.val_root=DIR`,
or `data.val_fraction` of the images (a split fixed by `data.split_seed`, not by the run's seed).

The source is a listing (fdlight.data.listing: made once per run and kept in the run directory) and a reader (the
file's bytes); decoding, the skip-and-count rule, per-sample seeding and the epoch order are the folder dataset's."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import Dataset

from fdlight.data.folders import SkipsUnreadable, read_sample
from fdlight.data.listing import IMAGE_SUFFIXES, Listing, listed, read_list_file, walk_images
from fdlight.errors import FDLightError, check

NO_LABEL = -1  # the target of an unlabelled image


class ImageFiles(SkipsUnreadable, Dataset):
    """The files of a listing as (image, NO_LABEL) pairs: unreadable ones skipped and counted (or, strict, the first
    one stops the run), as SafeImageFolder does."""

    classes: list[str] = []

    def __init__(self, listing: Listing, transform=None, strict: bool = False):
        self.root, self.transform, self.strict = listing.root, transform, strict
        self.paths = listing.paths()
        self.samples = [(p, NO_LABEL) for p in self.paths]
        self._bad = multiprocessing.Array("b", len(self.paths), lock=False)  # shared with loader workers

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int):
        return read_sample(self.paths[i], self.transform)


def folder_listing(root, key: str) -> Listing:
    """Every image under the folder `data.<key>`; refused when it is missing or holds none."""
    root = Path(str(root)).expanduser().absolute()
    check(root.is_dir(), f"data.{key}={root} {'is a file' if root.exists() else 'does not exist'}; point data.{key} "
                         f"at a folder of images (any layout), or pass data.list=<file naming one image a line>")
    entries = walk_images(root)
    check(bool(entries), f"data.{key}={root} holds no images ({', '.join(sorted(s[1:] for s in IMAGE_SUFFIXES))}, at "
                         f"any depth); point it at the folder that holds them")
    return Listing(root, entries)


def list_file_listing(path) -> Listing:
    """The files a list names; refused when the list is missing or empty or names a file that does not exist."""
    path = Path(str(path)).expanduser().absolute()
    check(path.is_file(), f"data.list={path} does not exist; pass a text file naming one image a line")
    entries = read_list_file(path)
    check(bool(entries), f"data.list={path} names no file; write one image path a line")
    root = path.parent
    missing = [e for e in entries if not os.path.isfile(e if os.path.isabs(e) else os.path.join(root, e))]
    if missing:
        raise FDLightError(f"data.list={path} names {len(missing)} file(s) that do not exist (first: {missing[0]}; "
                           f"relative paths are read from {root}); fix or remove those lines")
    return Listing(root, entries)


def check_images(c: DictConfig) -> None:
    """data=images' own settings: one source, one way to hold images out."""
    root, lst = c.get("root"), c.get("list")
    check(bool(root) != bool(lst), "data=images reads data.root=<folder> or data.list=<file>, not both" if root else
          "data=images needs data.root=<folder of images, any layout> or data.list=<file naming one image a line>")
    frac = c.get("val_fraction")
    check(frac is None or 0 < float(frac) < 1, f"data.val_fraction={frac} must lie between 0 and 1 (0.05 holds out "
                                               f"one image in 20), or be null")
    check(frac is None or not c.get("val_root"), "data.val_root and data.val_fraction both hold images out; set one")


def image_splits(c: DictConfig, train_transform, val_transform) -> tuple[ImageFiles, ImageFiles | None]:
    """The training images and the held-out ones (None when nothing is held out)."""
    check_images(c)
    if c.get("root"):
        train = listed("train", lambda: folder_listing(c.root, "root"), f"images under {c.root}")
    else:
        train = listed("train", lambda: list_file_listing(c.list), f"images named by {c.list}")
    val = None
    if c.get("val_root"):
        val = listed("val", lambda: folder_listing(c.val_root, "val_root"), f"images under {c.val_root}")
    elif c.get("val_fraction"):
        train, val = held_out(train, float(c.val_fraction), int(c.get("split_seed") or 0))
    return (ImageFiles(train, train_transform, bool(c.strict)),
            ImageFiles(val, val_transform, bool(c.strict)) if val is not None else None)


def held_out(listing: Listing, fraction: float, seed: int) -> tuple[Listing, Listing]:
    """A seeded `fraction` of the listing held out (at least one image); both parts keep the listing's order."""
    n = len(listing.entries)
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise FDLightError(f"data.val_fraction={fraction} of {n} images leaves none to train on; lower it")
    out = np.zeros(n, dtype=bool)
    out[np.random.default_rng(seed).permutation(n)[:k]] = True
    pick = lambda keep: [e for e, o in zip(listing.entries, out) if o == keep]  # noqa: E731
    return Listing(listing.root, pick(False)), Listing(listing.root, pick(True))
