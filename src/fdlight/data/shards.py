"""Sharded training data for clusters: tar shards in WebDataset's layout, read by random access.

`python -m fdlight.data.shards IN OUT [--shard-size 1000]` writes each split of the ImageFolder IN (train/, and val/
when present) as OUT/<split>/shard-000000.tar, ...: every image stored as it is (`<key>.jpg`, `.png`, ...) beside its
class index (`<key>.cls`), in ImageFolder's order, and OUT/<split>/index.json with the class names and where each
member's bytes lie. `data=shards data.root=OUT` reads them as a map-style dataset that reads each sample at its offset
(os.pread): the run's epoch permutation, per-sample seeding, exact mid-epoch resume and the skip-and-count rule for
unreadable images are the folder dataset's, and a shard set gives the batches of the folder it was written from.
A few thousand large files replace a million small ones on a parallel file system; webdataset or any tar reader can
stream the same shards. The shards must lie on a file system (local or parallel), not behind an object store's API.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tarfile
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fdlight.artifacts import atomic_file, write_json
from fdlight.data.folders import SkipsUnreadable, class_folder
from fdlight.data.source import data_root
from fdlight.errors import FDLightError, Unreadable, check

INDEX = "index.json"
FORMAT = 1


def split_folder(root, split: str) -> Path:
    """root/split as a shard set: it must hold the index the writer leaves."""
    root = data_root(root, "point data.root at the folder `python -m fdlight.data.shards IN OUT` wrote (OUT)")
    path = root / split
    check((path / INDEX).is_file(), f"data.root={root} has no {split}/{INDEX}; write the shards with `python -m "
                                    f"fdlight.data.shards <imagefolder> {root}`")
    return path


def member_name(key: str, path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return f"{key}.{'jpg' if ext in ('jpg', 'jpeg') else ext}"


def write_split(src: Path, out: Path, shard_size: int) -> dict:
    """One split's shards and index; returns the index."""
    classes, to_index = find_classes(str(src))
    samples = make_dataset(str(src), to_index, extensions=IMG_EXTENSIONS)  # ImageFolder's own order
    out.mkdir(parents=True, exist_ok=True)
    shards, entries = [], []
    for first in range(0, len(samples), shard_size):
        name = f"shard-{first // shard_size:06d}.tar"
        members = {}
        with atomic_file(out / name) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for k in range(first, min(first + shard_size, len(samples))):
                path, label = samples[k]
                key = f"{k:09d}"
                data = Path(path).read_bytes()
                for member, payload in ((member_name(key, path), data), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(member)
                    info.size, info.mode, info.mtime = len(payload), 0o644, 0
                    tar.addfile(info, io.BytesIO(payload))
                members[member_name(key, path)] = (k, label, os.path.relpath(path, src))
        with tarfile.open(out / name) as tar:  # offsets as the tar module reads them back
            for info in tar.getmembers():
                if info.name in members:
                    k, label, rel = members[info.name]
                    entries.append([len(shards), info.offset_data, info.size, label, rel])
        shards.append(name)
    index = {"format": FORMAT, "classes": classes, "shards": shards, "samples": entries}
    write_json(out / INDEX, index, indent=None, sort_keys=False)
    return index


def write_shards(src, out, shard_size: int = 1000) -> dict[str, int]:
    """Every split of the ImageFolder `src` (train/, val/) as shards under `out`; images per split."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    check(shard_size >= 1, f"--shard-size={shard_size} must be a whole number >= 1")
    check(src.is_dir(), f"{src} does not exist; pass the ImageFolder root that holds train/<class>/<image>")
    splits = [s for s in ("train", "val") if (src / s).is_dir()]
    check(bool(splits), f"{src} holds neither train/ nor val/; arrange it as {src}/train/<class>/<image>")
    written = {}
    for split in splits:
        written[split] = len(write_split(class_folder(src, split), out / split, shard_size)["samples"])
    return written


class ShardedImages(SkipsUnreadable, Dataset):
    """The samples of one split's shards, read at their offsets; unreadable ones skipped and counted (or, strict,
    the first one stops the run), as SafeImageFolder does."""

    def __init__(self, split_dir: Path, transform=None, strict: bool = False):
        self.root = Path(split_dir)
        index = json.loads((self.root / INDEX).read_text())
        check(index.get("format") == FORMAT, f"{self.root / INDEX} is not a shard index this fdlight reads; write "
                                             f"the shards again with `python -m fdlight.data.shards`")
        self.classes, self.shards = list(index["classes"]), [self.root / s for s in index["shards"]]
        self.entries = index["samples"]
        self.samples = [(f"{self.shards[e[0]]}:{e[4]}", e[3]) for e in self.entries]  # names for messages
        self.transform, self.strict = transform, strict
        if not self.entries:
            raise FDLightError(f"{self.root} holds no images; write the shards from a folder with images")
        self._bad = multiprocessing.Array("b", len(self.entries), lock=False)  # shared with loader workers
        self._files: dict[int, int] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None  # descriptors stay in the process that opened them
        return state

    def read_bytes(self, i: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._files, self._pid = {}, os.getpid()
        shard, offset, size = self.entries[i][:3]
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.shards[shard]} ends inside sample {i}")
        return data

    def load(self, i: int):
        from fdlight.data.folders import read_sample

        try:
            data = self.read_bytes(i)
        except OSError as e:
            raise Unreadable(type(e).__name__) from e
        return read_sample(io.BytesIO(data), self.transform)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fdlight.data.shards",
                                 description="Write an ImageFolder (train/, val/) as tar shards for data=shards.")
    ap.add_argument("src", help="ImageFolder root holding train/<class>/<image> (and val/)")
    ap.add_argument("out", help="where the shards go: data.root for data=shards")
    ap.add_argument("--shard-size", type=int, default=1000, help="images per shard (1000 ImageNet images: ~110 MB)")
    args = ap.parse_args(argv)
    try:
        out = Path(args.out).expanduser()
        check(not any((out / s / INDEX).exists() for s in ("train", "val")),
              f"{out} already holds shards; write to an empty folder")
        written = write_shards(args.src, out, args.shard_size)
    except FDLightError as e:
        print(f"fdlight: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("wrote " + ", ".join(f"{n} {split} images" for split, n in written.items()) + f" as shards in {out}")


if __name__ == "__main__":
    main()
