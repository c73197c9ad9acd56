"""What a run read, for its metrics.json and its closing line: the data source (data=<name>, and the folder it was
given) and how many images each split held, so a run on the wrong data shows it."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fdlight.errors import check

SPLITS = ("train", "val")


def data_root(root, where: str) -> Path:
    """data.root as an existing folder; `where` tells the user where to point it."""
    root = Path(str(root)).expanduser()
    check(not root.is_file(), f"data.root={root} is a file, and data.root takes a folder; {where}")
    check(root.is_dir(), f"data.root={root} does not exist; {where}")
    return root


def data_used(data_cfg: DictConfig, train=None, val=None) -> dict:
    """metrics.json's data entries: `data`, `data_root` (where it was read: data.root, data.list or data.urls; null
    for the embedded data) and the image count of each split the run read (a dataset or a count; null for a split it
    did not read)."""
    root = next((v for k in ("root", "list", "urls") if (v := OmegaConf.select(data_cfg, k, default=None))), None)
    if OmegaConf.is_list(root):
        root = ",".join(map(str, root))
    return {"data": str(data_cfg.name), "data_root": str(Path(str(root)).expanduser()) if root else None,
            "train_images": _count(train), "val_images": _count(val)}


def _count(split) -> int | None:
    """A count, a sized dataset's length, or null (no split, or a stream of unknown length)."""
    if split is None or isinstance(split, int):
        return split
    return len(split) if hasattr(split, "__len__") else None


def data_text(metrics: dict) -> str:
    """The closing line's words for data_used's entries, e.g. `data=imagenet /photos: 48 train + 16 val images`."""
    where = f" {metrics['data_root']}" if metrics.get("data_root") else ""
    counts = " + ".join(f"{metrics[f'{s}_images']} {s}" for s in SPLITS if metrics.get(f"{s}_images") is not None)
    return f"data={metrics['data']}{where}" + (f": {counts} images" if counts else " (a stream: images not counted)")
