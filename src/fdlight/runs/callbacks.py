"""The callbacks every training run has: a progress display (a live bar on a terminal, plain lines in a file or a
CI log), the images-per-second meter, the line that says where a resumed run continues, the checkpoint (of the final
step too), and the training step's randomness as a function of where the run is (fdlight.data.seeded does the same
for the data)."""
from __future__ import annotations

import logging
import math
import pickle
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar as ProgressDisplay

from fdlight.console import interactive
from fdlight.data.seeded import STEP, derived_seed, seed_globals

log = logging.getLogger("fdlight")


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar for a terminal, its metrics short enough to stay on the bar's line in a narrow
    terminal: `train/` dropped, 4 significant digits, no `v_num` (the logger's version number, always 0 in a run
    directory of its own)."""

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {k.removeprefix("train/").replace("img_per_s", "img/s"): f"{v:.4g}" if isinstance(v, float) else v
                for k, v in items.items()}

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


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class LineProgress(ProgressDisplay):
    """Progress as plain lines for output that is not a terminal (a file, a CI log), where a live bar is drawn once
    at the end with its metrics wrapped over several lines: one line per training epoch, one every tenth of an epoch
    when an epoch has at least `long_epoch` batches, one at the end of training and of each validation."""

    def __init__(self, long_epoch: int = 100):
        super().__init__()
        self.long_epoch = int(long_epoch)
        self.enabled = True
        self._start = time.perf_counter()
        self._printed_step = -1
        self._batches = 0
        self._val_start = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _elapsed(self) -> str:
        seconds = int(time.perf_counter() - self._start)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def _line(self, trainer, module, where: str) -> None:
        if not self.enabled:
            return
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        total = f"/{int(steps)}" if math.isfinite(steps) else ""
        metrics = format_metrics(self.get_metrics(trainer, module))
        print(f"{where}  step {trainer.global_step}{total}  {metrics}  [{self._elapsed()}]".rstrip(), flush=True)
        self._printed_step = trainer.global_step

    def _epoch(self, trainer) -> str:
        last = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        return f"epoch {trainer.current_epoch + 1}{last}"

    def on_train_start(self, trainer, module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._batches = batch_idx + 1
        batches = self.total_train_batches
        if math.isfinite(batches) and batches >= self.long_epoch:
            every = math.ceil(batches / 10)
            if (batch_idx + 1) % every == 0 and batch_idx + 1 < batches:
                self._line(trainer, module, f"{self._epoch(trainer)} batch {batch_idx + 1}/{int(batches)}")

    def on_train_epoch_end(self, trainer, module) -> None:
        stopped = self._batches < trainer.num_training_batches and 0 < trainer.max_steps <= trainer.global_step
        self._line(trainer, module, self._epoch(trainer) + (" (max_steps reached)" if stopped else ""))

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_step != self._printed_step:
            self._line(trainer, module, "training done")

    def on_validation_start(self, trainer, module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, module) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        seconds = time.perf_counter() - (self._val_start or time.perf_counter())
        batches = sum(trainer.num_val_batches) if isinstance(trainer.num_val_batches, list) else \
            trainer.num_val_batches
        val = {k: v for k, v in self.get_metrics(trainer, module).items() if k.startswith("val")}
        plural = "es" * (int(batches) != 1)
        print(f"validation  {int(batches)} batch{plural} in {seconds:.0f} s  {format_metrics(val)}".rstrip(),
              flush=True)


def progress_display(stream=None) -> ProgressDisplay:
    """The live rich bar on a terminal or in a notebook; plain lines otherwise."""
    return ProgressBar() if interactive(stream) else LineProgress()


class ResumeNote(Callback):
    """One line where a run continues from a checkpoint: the step it resumes at, of how many."""

    def on_train_start(self, trainer, module) -> None:
        if trainer.global_step > 0 and trainer.is_global_zero:
            steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else \
                trainer.estimated_stepping_batches
            total = f" of {int(steps)}" if math.isfinite(steps) else ""
            if math.isfinite(steps) and trainer.global_step >= steps:  # killed after its last checkpoint
                log.info("resuming at step %d%s: every step is trained; writing what the run writes at its end",
                         trainer.global_step, total)
                return
            epoch = f" (epoch {trainer.current_epoch + 1}" + (f" of {trainer.max_epochs})" if trainer.max_epochs
                                                              and trainer.max_epochs > 0 else ")")
            log.info("resuming at step %d%s%s", trainer.global_step, total, epoch)


class Throughput(Callback):
    """Images per second of the training steps (forward, backward, update; the batch is already loaded when
    on_train_batch_start runs) over all processes, the first two steps left out (warm-up). One measure, two spans:
    the logged `train/img_per_s` (progress lines, CSV log) is the mean over the epoch's steps so far, `img_per_s` the
    mean over the run's. Under DDP or FSDP every process steps in lockstep, so it is one process's rate times the
    number of processes. On a GPU each step is timed by CUDA events that are read every `log_every_n_steps` steps,
    when the logger reads the device anyway: timing never makes the host wait for the device at every step."""

    def __init__(self):
        self.images, self.seconds, self._t = 0, 0.0, None
        self._epoch = [0, 0.0, -1]  # images, seconds and epoch of the current epoch's counted steps
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
            self._unread.append((self._start, end, n, counted, trainer.current_epoch))
            if trainer.global_step % max(int(trainer.log_every_n_steps), 1) == 0:
                self._log(module, *self._read())
            return
        if self._t is None:
            return
        dt = time.perf_counter() - self._t
        self._add(n, dt, counted, trainer.current_epoch)
        self._log(module, n, dt)

    def _add(self, n: int, dt: float, counted: bool, epoch: int) -> None:
        if self._epoch[2] != epoch:
            self._epoch = [0, 0.0, epoch]
        if counted:
            self.images, self.seconds = self.images + n, self.seconds + dt
            self._epoch[0], self._epoch[1] = self._epoch[0] + n, self._epoch[1] + dt

    def _log(self, module, images: int, seconds: float) -> None:
        """The epoch's mean so far; the given steps' own rate before any step of the epoch counts (warm-up)."""
        if self._epoch[1] > 0:
            images, seconds = self._epoch[0], self._epoch[1]
        module.log("train/img_per_s", images / max(seconds, 1e-9), prog_bar=True)
        if module.device.type == "cuda":
            module.log("train/peak_mem_gib", torch.cuda.max_memory_allocated(module.device) / 2 ** 30)

    def _read(self) -> tuple[int, float]:
        """Add up the steps timed on the GPU since the last read (waits for the last of them only)."""
        images = seconds = 0
        for start, end, n, counted, epoch in self._unread:
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
            images, seconds = images + n, seconds + dt
            self._add(n, dt, counted, epoch)
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

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Ctrl-C: say what is kept and how to go on (Lightning only says it is shutting down). The step is read from
        the file itself (a Ctrl-C can land in a save after its rename, before the save returns)."""
        if not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        last = Path(self.dirpath) / "last.ckpt"
        kept = saved_step(last)
        if kept is None:
            log.info("stopped at step %d, before the first checkpoint; resume=true starts the run again from step 0",
                     trainer.global_step)
        else:
            log.info("stopped at step %d; %s holds step %d, and resume=true continues from it", trainer.global_step,
                     last, kept)


def saved_step(path: Path) -> int | None:
    """The global step a checkpoint file holds (its tensors are mapped, not read), or None without one."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError):
        return None


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
