"""Training data whose randomness is a function of where the run is, so a resumed run draws exactly what an
uninterrupted one would, with no generator state to save.

- The order of an epoch is a permutation seeded by (run seed, epoch), split over the processes as DistributedSampler
  splits it (being one, it is left as it is by Lightning under DDP).
- Where an epoch starts is read from the number of training batches the trainer's loop has drawn, which Lightning
  restores from a checkpoint: a run resumed mid-epoch continues with the next batch of the same permutation.
- Sample `index` of epoch `e` is augmented under torch's, numpy's and Python's global generators seeded by
  (run seed, e, index), so it does not depend on which data worker makes it, how many there are, or what ran before.

The training step's own randomness (drop path, Mixup/CutMix, dropout) is seeded per batch by
`fdlight.runs.callbacks.SeededSteps`.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from fdlight.errors import FDLightError

SAMPLE, ORDER, STEP = 0, 1, 2  # independent streams drawn from one run seed


def derived_seed(*key: int) -> int:
    """A 64-bit seed hashed from integers: neighbouring keys give unrelated seeds."""
    return int(np.random.SeedSequence([int(k) % 2 ** 64 for k in key]).generate_state(1, np.uint64)[0])


def seed_globals(seed: int, cuda: bool = True) -> None:
    """Seed torch's (CPU, and every GPU unless `cuda` is false), numpy's and Python's global generators."""
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    random.seed(seed)


@contextlib.contextmanager
def seeded_globals(seed: int):
    """Run a block under torch's CPU, numpy's and Python's global generators seeded by `seed`, then give the caller
    its own states back (the main process runs the loading itself when there are no data workers)."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    seed_globals(seed, cuda=False)  # a GPU generator is the training step's, never the data's
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class SeededSamples(Dataset):
    """A training view of a map-style dataset: item (epoch, index) is dataset[index], its random transform drawn
    under generators seeded by (seed, epoch, index)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        return seeded_call(derived_seed(self.seed, SAMPLE, epoch, index), self.dataset.__getitem__, index)


def seeded_call(seed: int, fn, *args):
    """fn(*args) under the global generators seeded by `seed` (a sample's augmentation)."""
    if get_worker_info() is not None:  # a data worker's generators serve its samples alone: no state to keep
        seed_globals(seed, cuda=False)
        return fn(*args)
    with seeded_globals(seed):
        return fn(*args)


class EpochSampler(DistributedSampler):
    """Yields (epoch, index) keys for SeededSamples: this process's share of a permutation seeded by (seed, epoch),
    padded so every process gets as many. With `drawn` (a callable: training batches this process has drawn since
    the run began), the epoch and the position inside it follow from that count, so an iteration started after a
    resume skips the batches already trained on; without it, the epoch is the one set_epoch gave and every
    iteration starts at the beginning. Every epoch is assumed to hold len(self) // batch_size batches (the loader's
    drop_last)."""

    def __init__(self, dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0, drawn=None,
                 accumulate: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.drawn, self.accumulate = int(batch_size), drawn, int(accumulate)

    @property
    def batches_per_epoch(self) -> int:
        """Whole optimizer steps only (`accumulate` batches each), so an epoch takes the same steps, of the same
        images, on any number of processes that make up the same total batch."""
        whole = self.num_samples // (self.batch_size * self.accumulate) * self.accumulate
        return whole or max(self.num_samples // self.batch_size, 1)

    def __len__(self) -> int:
        return min(self.batches_per_epoch * self.batch_size, self.num_samples)

    def order(self, epoch: int) -> list[int]:
        """This process's indices of epoch `epoch`, in order."""
        g = torch.Generator().manual_seed(derived_seed(self.seed, ORDER, epoch))
        indices = torch.randperm(len(self.dataset), generator=g).tolist()
        indices = (indices * math.ceil(self.total_size / len(indices)))[:self.total_size]  # DDP ranks step together
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        start = 0
        if self.drawn is not None:
            self.epoch, start = divmod(int(self.drawn()), self.batches_per_epoch)
        end = self.batches_per_epoch * self.batch_size
        return iter([(self.epoch, i) for i in self.order(self.epoch)[start * self.batch_size:end]])


class Deferred:
    """An iterator that is built when its first item is asked for."""

    def __init__(self, build):
        self.build, self.iterator = build, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.iterator is None:
            self.iterator = self.build()
        return next(self.iterator)


class DeferredLoader(DataLoader):
    """A DataLoader whose iteration starts at the first batch asked for, not at iter(). Lightning calls iter() on
    the training loader before it restores a checkpoint's loop state (to count the steps of the schedule), and data
    workers take their first indices from the sampler as soon as the iterator exists; deferred, the sampler reads
    the restored position."""

    def __iter__(self):
        return Deferred(super().__iter__)


def batches_drawn(trainer) -> int:
    """Training batches this process's fit loop has drawn so far; Lightning saves the count in every checkpoint and
    restores it before the first batch of a resumed run is drawn."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready


def training_loader(dataset, batch_size: int, seed: int, num_workers: int, trainer=None, collate_fn=None,
                    pin_memory: bool = False) -> DataLoader:
    """The training DataLoader of a DataModule: seeded samples in a seeded order, split over the trainer's processes
    and continued from the trainer's position (from the start of epoch 0 without a trainer)."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    drawn = functools.partial(batches_drawn, trainer) if trainer is not None else None
    sampler = EpochSampler(dataset, batch_size, seed, num_replicas=world, rank=rank, drawn=drawn,
                           accumulate=trainer.accumulate_grad_batches if trainer is not None else 1)
    return DeferredLoader(SeededSamples(dataset, seed), batch_size=batch_size, sampler=sampler, drop_last=True,
                          num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                          collate_fn=collate_fn)


MAX_WORKERS = 8  # the release recipes' loader workers per training process


def loader_workers(setting) -> int:
    """data.num_workers, or for null the cores this process may use, at most MAX_WORKERS: more workers than cores
    only compete with training (and PyTorch warns for each loader)."""
    if setting is not None:
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MAX_WORKERS, cores)


def check_fits_a_batch(dataset, batch_size: int) -> None:
    """Training drops the last partial batch: a set smaller than one batch would train on nothing."""
    size = getattr(dataset, "total", None) or len(dataset)  # a stream's length is its process's share
    if size < batch_size:
        raise FDLightError(f"the training set has {size} images, fewer than one batch of {batch_size}; lower "
                           f"the stage's batch_size or add images")
