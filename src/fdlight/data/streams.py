"""`data=webdataset`: tar shards in WebDataset's layout as other tools write them (webdataset's TarWriter,
img2dataset): one sample a key, `<key>.jpg|jpeg|png|webp` with optional `<key>.cls`, `.json`, `.txt` beside it.
`data.urls` is a brace pattern ('DIR/shard-{000000..000127}.tar'), a list of patterns, or a folder (its *.tar files,
sorted). The shards and their image counts are listed once per run and kept in the run directory
(fdlight.data.listing). The webdataset library expands the patterns, reads each tar front to back and groups its
members by key, and shuffles through its buffer.

How a run streams them (a tar is never seeked):
- Epoch e takes the shards in an order seeded by (seed, e). The run's processes times each one's data workers are S
  slots; slot s reads shards s, s + S, ... of that order, through a shuffle buffer seeded by (seed, e, s).
- Each process draws total // (processes x batch_size) batches an epoch, so processes step together and the lr
  schedule knows its length; a slot stops when it has given its share of them, or reads its shards again (in a new
  seeded order) when they hold fewer.
- Sample i's augmentation is seeded by (seed, e, i), as in every other source (fdlight.data.seeded); unreadable
  samples are skipped and counted (fdlight.data.folders.SkipsUnreadable), and the next sample takes their place.
- Resume: a run resumed mid-epoch re-reads its slots' streams from the epoch's start and drops the samples already
  trained on (read and decoded again, not trained on), so with the same data.num_workers and number of processes
  it continues with exactly the batches the uninterrupted run drew. With another worker or process count the slots
  change: the epoch restarts under the new split (same shards, a different order) and the step count still
  continues.
"""
from __future__ import annotations

import io
import itertools
import multiprocessing
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fdlight.data.folders import SkipsUnreadable, read_sample
from fdlight.data.images import NO_LABEL
from fdlight.data.listing import Listing, listed
from fdlight.data.seeded import ORDER, SAMPLE, Deferred, derived_seed, seeded_call
from fdlight.errors import FDLightError, Unreadable, check

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # members read as a sample's image, the first one present


def expand_urls(urls) -> list[str]:
    """The shard paths `data.urls` names: brace patterns expanded (webdataset's rules), folders' *.tar sorted."""
    from webdataset.shardlists import expand_urls as expand

    items = list(urls) if isinstance(urls, (list, tuple, ListConfig)) else [urls]
    paths = []
    for item in items:
        item = os.path.expanduser(str(item))
        paths += sorted(str(p) for p in Path(item).glob("*.tar")) if os.path.isdir(item) else expand(item)
    return [os.path.abspath(p) for p in paths]


def count_images(path: str) -> int:
    """The samples of a shard that hold an image (tar headers read, members' data skipped)."""
    from webdataset.tariterators import base_plus_ext

    keys = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, suffix = base_plus_ext(member.name)
                if member.isreg() and key is not None and suffix.lower() in IMAGE_KEYS:
                    keys.add(key)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise FDLightError(f"shard {path} is not a tar archive ({type(e).__name__}); data.urls must name tar shards "
                           f"in WebDataset's layout (<key>.jpg with optional <key>.cls beside it)") from e
    return len(keys)


def shard_listing(urls) -> Listing:
    """The shards `data.urls` names and their image counts; refused when it names no file or a missing one."""
    paths = expand_urls(urls)
    found = [p for p in paths if os.path.isfile(p)]
    check(bool(found), f"data.urls={urls} matches no file; name tar shards by a brace pattern "
                       f"('DIR/shard-{{000000..000127}}.tar'), a list of them, or the folder that holds them")
    missing = [p for p in paths if not os.path.isfile(p)]
    check(not missing, f"data.urls={urls}: {len(missing)} of its {len(paths)} shards do not exist (first: "
                       f"{missing[0] if missing else ''}); fix the pattern's range or the list")
    counts = [count_images(p) for p in paths]
    check(sum(counts) > 0, f"data.urls={urls}: its {len(paths)} shards hold no image (<key>.jpg, .jpeg, .png or "
                           f".webp); check that they are WebDataset shards of images")
    root = Path(os.path.commonpath([os.path.dirname(p) for p in paths]))
    return Listing(root, [os.path.relpath(p, root) for p in paths], counts)


class ShardStream(SkipsUnreadable, IterableDataset):
    """The training stream of a shard listing for one process of the run (`place` says which), `batch_size`
    samples a batch; yields (image, label), label the sample's .cls or NO_LABEL."""

    classes: list[str] = []

    def __init__(self, listing: Listing, transform, batch_size: int, seed: int, buffer: int = 1000,
                 strict: bool = False):
        kept = [(path, n) for path, n in zip(listing.paths(), listing.counts) if n > 0]  # a shard of no image: none
        self.root, self.shards, self.counts = listing.root, [p for p, _ in kept], [n for _, n in kept]
        self.first = np.cumsum([0, *self.counts])[:-1].tolist()  # index of each shard's first sample
        self.total = int(sum(self.counts))
        self.transform, self.batch_size, self.seed, self.buffer, self.strict = (
            transform, int(batch_size), int(seed), int(buffer), strict)
        self._bad = multiprocessing.Array("b", self.total, lock=False)  # shared with loader workers
        self.world, self.rank, self.workers = 1, 0, 0
        self.position = (0, 0)  # (epoch, batches of it already drawn): set by the loader before workers start

    def place(self, world: int, rank: int, workers: int) -> int:
        """This process's place in the run; the data workers it uses (at most its share of the shards)."""
        check(len(self.shards) >= world, f"data.urls names {len(self.shards)} shards, fewer than the run's {world} "
                                         f"processes (each reads its own); write the data as more shards")
        self.world, self.rank = int(world), int(rank)
        self.workers = min(int(workers), len(self.shards) // self.world)
        return self.workers

    @property
    def batches(self) -> int:
        """Batches each process draws an epoch."""
        return self.total // (self.world * self.batch_size)

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def records(self, epoch: int, slot: int, slots: int):
        """(pass, sample index, name, image bytes, label) of a slot, its shards read again as often as it is asked."""
        from webdataset.filters import _shuffle
        from webdataset.tariterators import tarfile_samples

        shard_of = {u: k for k, u in enumerate(self.shards)}
        for rnd in itertools.count():
            g = torch.Generator().manual_seed(derived_seed(self.seed, ORDER, epoch, rnd))
            order = torch.randperm(len(self.shards), generator=g).tolist()[slot::slots]
            rng = random.Random(derived_seed(self.seed, ORDER, epoch, rnd, slot + 1))
            for sample in _shuffle(self.numbered(tarfile_samples([{"url": self.shards[k]} for k in order]),
                                                 shard_of), self.buffer, min(100, self.buffer), rng=rng):
                yield (rnd, *sample)

    def numbered(self, samples, shard_of: dict):
        """The image samples of a stream as (index, name, image bytes, label)."""
        url, k = None, 0
        for s in samples:
            if s["__url__"] != url:
                url, k = s["__url__"], 0
            image = next((s[x] for x in IMAGE_KEYS if x in s), None)
            if image is None or k >= self.counts[shard_of[url]]:  # no image; or a key split in two, not listed
                continue
            yield self.first[shard_of[url]] + k, f"{url}:{s['__key__']}", image, label_of(s.get("cls"))
            k += 1

    def __iter__(self):
        info = get_worker_info()
        epoch, start = self.position
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        w = (w + start) % workers  # the loader asks worker 0 first: it plays the part of the next batch's maker
        share = len(range(w, self.batches, workers)) * self.batch_size  # the loader takes workers' batches in turn
        done = len(range(w, start, workers)) * self.batch_size
        if share == 0:
            return
        given, current, at_pass = 0, 0, 0
        for rnd, i, name, data, label in self.records(epoch, self.rank * workers + w, self.world * workers):
            if rnd != current:
                if given == at_pass and self.skipped >= self.total:  # a pass of nothing: else another reads others
                    raise FDLightError(f"no image of the shards data.urls names can be read (last: {name}); check "
                                       f"them")
                current, at_pass = rnd, given
            if self._bad[i]:
                continue
            try:
                x = seeded_call(derived_seed(self.seed, SAMPLE, epoch, i, rnd), read_sample, io.BytesIO(data),
                                self.transform)
            except Unreadable as e:
                self.unreadable(i, name, e)
                continue
            given += 1
            if given > done:
                yield x, label
            if given == share:
                return


def label_of(cls: bytes | None) -> int:
    """A sample's .cls as a class index (NO_LABEL when it has none)."""
    try:
        return int(cls.decode().strip()) if cls is not None else NO_LABEL
    except ValueError:
        return NO_LABEL


class StreamLoader(DataLoader):
    """The training loader of a ShardStream: where its iteration starts is read when the first batch is asked for
    (after Lightning restored a checkpoint's loop), from `drawn` (training batches this process has drawn since the
    run began), and handed to freshly started workers."""

    def __init__(self, stream: ShardStream, drawn=None, **kw):
        super().__init__(stream, batch_size=stream.batch_size, drop_last=True, num_workers=stream.workers,
                         persistent_workers=False, **kw)
        self.drawn, self.iterations = drawn, 0

    def __iter__(self):
        return Deferred(self.start)

    def start(self):
        stream = self.dataset
        if self.drawn is not None:
            stream.position = divmod(int(self.drawn()), max(stream.batches, 1))
        else:
            stream.position, self.iterations = (self.iterations, 0), self.iterations + 1
        return DataLoader.__iter__(self)


def shard_stream(c: DictConfig, transform, batch_size: int, seed: int) -> ShardStream:
    check(bool(c.get("urls")), "data=webdataset needs data.urls='DIR/shard-{000000..000127}.tar' (a brace pattern, a "
                               "list of them, or the folder holding the shards)")
    buffer = int(c.get("shuffle_buffer") or 1)
    check(buffer >= 1, f"data.shuffle_buffer={c.get('shuffle_buffer')} must be a whole number >= 1")
    listing = listed("train", lambda: shard_listing(c.urls), f"webdataset shards of {c.urls}")
    return ShardStream(listing, transform, batch_size, seed, buffer, bool(c.strict))
