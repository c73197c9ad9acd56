"""ImageFolder trees (ImageNet layout) that check their layout and survive unreadable images."""
from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from fdlight.errors import FDLightError, check

log = logging.getLogger(__name__)


def class_folder(root: str | Path, split: str) -> Path:
    """root/split as an ImageFolder: it must exist and hold one sub-folder per class with images in them."""
    root = Path(str(root)).expanduser()
    check(root.is_dir(), f"data.root={root} does not exist; point data.root at a folder holding {split}/<class>/<image>")
    path = root / split
    check(path.is_dir(), f"data.root={root} has no {split}/ folder; arrange it as {root}/{split}/<class>/<image>")
    classes = [d for d in path.iterdir() if d.is_dir()]
    if not classes:
        loose = any(f.suffix.lower() in IMG_EXTENSIONS for f in path.iterdir())
        hint = " (its images lie loose: move each into a folder named after its class)" if loose else ""
        raise FDLightError(f"{path} has no class folders{hint}; arrange it as {path}/<class>/<image>")
    return path


def check_root(data_cfg, with_val: bool = False) -> None:
    """A folder dataset's root is set and laid out as ImageFolder trees (train/, and val/ when `with_val`)."""
    c = data_cfg
    check(not OmegaConf.is_missing(c, "root") and bool(c.root),
          f"data={c.name} needs data.root=<folder holding train/<class>/<image>"
          f"{' and val/<class>/<image>' if with_val else ''}>")
    for split in ("train", "val") if with_val else ("train",):
        class_folder(c.root, split)


class SafeImageFolder(ImageFolder):
    """ImageFolder that skips (and counts) unreadable images, or stops at the first one when strict."""

    def __init__(self, root: str | Path, transform=None, strict: bool = False):
        try:
            super().__init__(str(root), transform=transform)
        except FileNotFoundError as e:
            raise FDLightError(f"{root} holds no images ({e}); put .jpg/.png files in its class folders") from e
        self.strict = strict
        self._bad = multiprocessing.Array("b", len(self.samples), lock=False)  # shared with loader workers

    @property
    def skipped(self) -> int:
        """Distinct unreadable files met so far."""
        return sum(self._bad)

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            if self._bad[i]:
                continue
            path, target = self.samples[i]
            try:
                with open(path, "rb") as f:
                    img = Image.open(f).convert("RGB")
            except Exception as e:  # noqa: BLE001 - any decoder error means an unreadable file
                if self.strict:
                    raise FDLightError(f"unreadable image {path} ({type(e).__name__}); remove it or set "
                                       f"data.strict=false to skip such files") from e
                self._bad[i] = 1
                log.warning("skipping unreadable image %s (%s)", path, type(e).__name__)
                continue
            return (self.transform(img) if self.transform else img), target
        raise FDLightError(f"no readable image under {self.root}")
