"""The callbacks every training run has: a progress bar, the images-per-second meter, the checkpoint (of the final
step too), and the training step's randomness as a function of where the run is (fdlight.data.seeded does the same
for the data)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

from fdlight.data.seeded import STEP, derived_seed, seed_globals



class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without `v_num` (the logger's version number, always 0 in a run directory of
    its own)."""

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the shown metrics are read from the device: on a GPU, only when the logger reads them too
        self._skip_metrics = pl_module.device.type == "cuda" and trainer.global_step % max(
            int(trainer.log_every_n_steps), 1) != 0
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._skip_metrics = False

    def _update_metrics(self, trainer, pl_module) -> None:
        if not getattr(self, "_skip_metrics", False):
            super()._update_metrics(trainer, pl_module)


class Throughput(Callback):
    """Images per second of the training step (forward, backward, update; the batch is already loaded when
    on_train_batch_start runs) over all processes, logged and averaged for the end. Under DDP or FSDP every process
    steps in lockstep, so it is one process's rate times the number of processes. On a GPU each step is timed by
    CUDA events that are read every `log_every_n_steps` steps, when the logger reads the device anyway: timing
    never makes the host wait for the device at every step."""

    def __init__(self):
        self.images, self.seconds, self._t = 0, 0.0, None
        self._start = None
        self._unread: list[tuple] = []  # (start event, end event, images, counted) of steps timed on the GPU

    @staticmethod
    def _cuda(module) -> bool:
        return torch.cuda.is_available() and module.device.type == "cuda"

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self._cuda(module):
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        n = (len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)) * trainer.world_size
        counted = trainer.global_step > 1  # skip the first steps' warm-up cost
        if self._cuda(module):
            if self._start is None:
                return
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._unread.append((self._start, end, n, counted))
            if trainer.global_step % max(int(trainer.log_every_n_steps), 1) == 0:
                images, seconds = self._read()
                module.log("train/img_per_s", images / max(seconds, 1e-9), prog_bar=True)
            return
        if self._t is None:
            return
        dt = time.perf_counter() - self._t
        if counted:
            self.images += n
            self.seconds += dt
        module.log("train/img_per_s", n / max(dt, 1e-9), prog_bar=True)

    def _read(self) -> tuple[int, float]:
        """Add up the steps timed on the GPU since the last read (waits for the last of them only)."""
        images = seconds = 0
        for start, end, n, counted in self._unread:
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
            images, seconds = images + n, seconds + dt
            if counted:
                self.images += n
                self.seconds += dt
        self._unread = []
        return images, seconds

    def on_train_end(self, trainer, module):
        self._read()

    @property
    def img_per_s(self) -> float:
        self._read()
        return self.images / self.seconds if self.seconds else float("nan")


class RunCheckpoint(ModelCheckpoint):
    """checkpoints/last.ckpt every `every_n_train_steps` and, always, of the final step, so that the checkpoint and
    the exported weights are the same model (Lightning's own end-of-training save happens only when no checkpoint
    was saved at all). A run stopped by an error never gets to on_train_end: its last good checkpoint stays."""

    def __init__(self, dirpath: Path, every_n_train_steps: int | None):
        super().__init__(dirpath=str(dirpath), save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
                         save_on_train_epoch_end=True, enable_version_counter=False)  # one last.ckpt, never last-v1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last_global_step_saved != trainer.global_step or not self._last_checkpoint_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


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
