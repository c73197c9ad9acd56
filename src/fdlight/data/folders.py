"""ImageFolder trees (ImageNet layout) that check their layout and survive unreadable images."""
from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from fdlight.data.pixels import as_rgb
from fdlight.data.source import data_root
from fdlight.errors import FDLightError, Unreadable, check

log = logging.getLogger(__name__)


def class_folder(root: str | Path, split: str) -> Path:
    """root/split as an ImageFolder: it must exist and hold one sub-folder per class with images in them."""
    root = data_root(root, f"point data.root at a folder holding {split}/<class>/<image>")
    path = root / split
    check(path.is_dir(), f"data.root={root} has no {split}/ folder; arrange it as {root}/{split}/<class>/<image>")
    classes = [d for d in path.iterdir() if d.is_dir()]
    if not classes:
        loose = any(is_image(f) for f in path.iterdir())
        hint = " (its images lie loose: move each into a folder named after its class)" if loose else ""
        raise FDLightError(f"{path} has no class folders{hint}; arrange it as {path}/<class>/<image>")
    empty = [d for d in sorted(classes) if not any(is_image(f) for f in d.iterdir())]  # stops at each first image
    if empty:
        more = f" (and {len(empty) - 1} other class folders)" if len(empty) > 1 else ""
        raise FDLightError(f"class folder {empty[0]} holds no images{more}; put its images ("
                           f"{', '.join(IMG_EXTENSIONS)}) in it, or remove it")
    return path


def is_image(path: Path) -> bool:
    """A file ImageFolder reads (by its extension)."""
    return path.suffix.lower() in IMG_EXTENSIONS and path.is_file()


class SkipsUnreadable:
    """The skip-and-count rule over `samples` ((name, target) pairs): item access skips unreadable ones and counts
    them in the shared `_bad` flags, or, `strict`, stops at the first; `load(i)` reads sample i and raises
    Unreadable. A streaming source applies the same rule through `unreadable`."""

    @property
    def skipped(self) -> int:
        """Distinct unreadable files met so far."""
        return sum(self._bad)

    def load(self, i: int):
        raise NotImplementedError

    def unreadable(self, i: int, name: str, error: Unreadable) -> None:
        """Sample i cannot be read: stop the run when strict, else count it and say so."""
        if self.strict:
            raise FDLightError(f"unreadable image {name} ({error}); remove it or set data.strict=false to skip "
                               f"such files") from error
        self._bad[i] = 1
        log.warning("skipping unreadable image %s (%s)", name, error)

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            if self._bad[i]:
                continue
            name, target = self.samples[i]
            try:
                sample = self.load(i)
            except Unreadable as e:
                self.unreadable(i, name, e)
                continue
            return sample, target
        raise FDLightError(f"no readable image under {self.root}")


class SafeImageFolder(SkipsUnreadable, ImageFolder):
    """ImageFolder that skips (and counts) unreadable images, or stops at the first one when strict."""

    def __init__(self, root: str | Path, transform=None, strict: bool = False):
        try:
            super().__init__(str(root), transform=transform)
        except FileNotFoundError as e:
            raise FDLightError(f"{root} holds no images ({e}); put .jpg/.png files in its class folders") from e
        self.strict = strict
        self._bad = multiprocessing.Array("b", len(self.samples), lock=False)  # shared with loader workers

    def load(self, i: int):
        return read_sample(self.samples[i][0], self.transform)


def read_sample(source, transform):
    """One image (a path, or a binary file object) through the training transform: decoded whole, then
    transformed; or, for a transform that decodes the file itself (fdlight.data.decode), opened and handed over.
    Unreadable, named by the error, when it cannot be opened or decoded; any other error of the transform is its
    own."""
    decodes = getattr(transform, "decodes", False)
    try:
        f = open(source, "rb") if isinstance(source, (str, Path)) else source
    except OSError as e:
        raise Unreadable(type(e).__name__) from e
    with f:
        try:
            img = Image.open(f)
            if not decodes:
                img = as_rgb(img)
        except Exception as e:  # noqa: BLE001 - any decoder error means an unreadable file
            raise Unreadable(type(e).__name__) from e
        if decodes:
            return transform(img)  # decodes while the file is open; its decoder's errors come back as Unreadable
    return transform(img) if transform else img
