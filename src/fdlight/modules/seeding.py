"""The training step's randomness as a function of where the run is (fdlight.data.seeded does the same for the
data)."""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from fdlight.data.seeded import STEP, derived_seed, seed_globals


class SeededSteps(Callback):
    """Seeds torch's (CPU and GPU), numpy's and Python's global generators at the start of every training batch from
    (run seed, epoch, batch index, process rank). Drop path, Mixup/CutMix (numpy and Python `random`), dropout and
    the detector's proposal sampling then draw what the batch's place in the run decides, not what ran before it,
    so a run resumed from a checkpoint draws exactly what an uninterrupted one would; the ranks of a DDP run draw
    differently."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        seed_globals(derived_seed(self.seed, STEP, trainer.current_epoch, batch_idx, trainer.global_rank))
