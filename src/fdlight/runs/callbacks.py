"""The callbacks every training run has: a progress bar a log file can hold, the images-per-second meter, and the
checkpoint of the final step."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without `v_num` (the logger's version number, always 0 in a run directory of
    its own)."""

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class Throughput(Callback):
    """Images per second of the training step (forward, backward, update; the batch is already loaded when
    on_train_batch_start runs) over all processes, logged per step and averaged for the end. Under DDP or FSDP every
    process steps in lockstep, so it is one process's rate times the number of processes."""

    def __init__(self):
        self.images, self.seconds, self._t = 0, 0.0, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._t is None:
            return
        if torch.cuda.is_available() and module.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t
        n = (len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)) * trainer.world_size
        if trainer.global_step > 1:  # skip the first steps' warm-up cost
            self.images += n
            self.seconds += dt
        module.log("train/img_per_s", n / max(dt, 1e-9), prog_bar=True)

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


class FinalCheckpoint(Callback):
    """checkpoints/last.ckpt of the final step, so that the checkpoint and the exported weights are the same model
    (the periodic checkpoint stops at the last multiple of checkpoint_every_n_steps). A run stopped by an error
    never gets here: its last good checkpoint stays."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.saved_step: int | None = None

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer, module) -> None:
        if self.saved_step != trainer.global_step or not self.path.is_file():
            trainer.save_checkpoint(self.path, weights_only=False)
