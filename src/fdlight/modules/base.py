"""What every training module does around its step: stop on a non-finite loss on every rank, keep the first and last
loss (the first one across a resume), log the loss and the lr, clip and log the gradient norm.

The non-finite check does not wait for the device at every step. With a fused optimizer (fdlight's AdamW), the step's
finiteness is computed on the device and handed to the fused kernel as its `found_inf`, which skips the update on
the device when it is set (as GradScaler does); the flag is copied to the host as soon as it is computed and read at
the next step, and before any checkpoint is written, which is when the run stops. So a bad update is never applied
and no checkpoint holds a step after a bad loss. Other optimizers (LARS, SGD) and fp16 runs (whose GradScaler owns
`found_inf`) check the loss on the host before every update, as before."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from fdlight.errors import FDLightError

FIRST_LOSS_KEY = "fdlight_first_loss"
LAST_LOSS_KEY = "fdlight_last_loss"  # a run resumed at its final step (killed before its exports) trains no step


def check_finite(loss: torch.Tensor, module: L.LightningModule, what: str, fix: str) -> float:
    """The loss as a float, read on the host now; a NaN/inf on any rank stops every rank before the optimizer
    applies it (the last checkpoint stays good)."""
    value = float(loss.detach())
    finite = math.isfinite(value)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([1.0 if finite else 0.0], device=loss.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)  # every rank stops together
        finite = bool(flag.item())
    if not finite:
        raise non_finite_error(module, value, module.global_step, what, fix)
    return value


def saved_checkpoint(module: L.LightningModule) -> Path | None:
    """The run's checkpoints/last.ckpt, if the trainer has written one."""
    callback = module.trainer.checkpoint_callback
    last = Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None
    return last if last is not None and last.is_file() else None


def clip_gradients(module: L.LightningModule, optimizer, max_norm) -> None:
    """Clip by global norm and log the norm; under FSDP the sharded root clips (Lightning's own clipping refuses)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(module.trainer.strategy, FSDPStrategy):
        norm = module.trainer.model.clip_grad_norm_(float(max_norm) if max_norm else float("inf"))
    else:
        norm = clip_norm([p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], max_norm)
    module.log("train/grad_norm", norm)


def clip_norm(params: list[torch.Tensor], max_norm) -> torch.Tensor:
    """Clip the gradients of `params` by their global norm (`max_norm` 0 or None: no limit); the norm before."""
    return torch.nn.utils.clip_grad_norm_(params, float(max_norm) if max_norm else float("inf"))


@dataclass
class StepLoss:
    """A step's loss whose finiteness has not been read on the host yet."""
    loss: torch.Tensor
    finite: torch.Tensor          # on the host (copied without waiting), 1.0 when finite on every rank
    ready: object                 # a CUDA event recorded after the copy, or None on a CPU
    step: int
    what: str
    fix: str

    def check(self, module: L.LightningModule) -> None:
        if self.ready is not None:
            self.ready.synchronize()  # waits for this step's loss only, not for the work queued after it
        if not bool(self.finite):
            raise non_finite_error(module, float(self.loss), self.step, self.what, self.fix)


def non_finite_error(module: L.LightningModule, value: float, step: int, what: str, fix: str) -> FDLightError:
    kept = "the last good checkpoint is kept" if saved_checkpoint(module) else "no checkpoint had been written yet"
    return FDLightError(f"non-finite {what} loss ({value}) at step {step}; stopped before the update, {kept}; {fix}")


def on_device_guard(trainer) -> bool:
    """Whether every optimizer is a fused kernel that takes `found_inf` and no GradScaler sets it instead."""
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return False
    return bool(trainer.optimizers) and all(
        opt.defaults.get("fused") and all(g.get("fused") for g in opt.param_groups) for opt in trainer.optimizers)


class TrainingModule(L.LightningModule):
    """The base of fdlight's LightningModules. `optim` is the stage's optimizer settings; its `clip_grad` (none: no
    limit) bounds the global gradient norm. Subclasses pass each training loss through `record_loss`."""

    def __init__(self, optim: dict):
        super().__init__()
        self.optim_cfg = dict(optim)
        self._first_loss: float | torch.Tensor | None = None  # a tensor until it is read
        self._last_loss: float | torch.Tensor | None = None
        self._unread: list[StepLoss] = []
        self._nonfinite: torch.Tensor | None = None  # 1.0 once any step's loss was non-finite (the fused step's flag)

    @property
    def first_loss(self) -> float | None:
        if isinstance(self._first_loss, torch.Tensor):
            self._first_loss = float(self._first_loss)
        return self._first_loss

    @first_loss.setter
    def first_loss(self, value) -> None:
        self._first_loss = value

    @property
    def last_loss(self) -> float | None:
        if isinstance(self._last_loss, torch.Tensor):
            self._last_loss = float(self._last_loss)
        return self._last_loss

    @last_loss.setter
    def last_loss(self, value) -> None:
        self._last_loss = value

    def record_loss(self, loss: torch.Tensor, what: str, fix: str) -> None:
        """Stop on a non-finite `what` loss (`fix` says what to change) before its update is applied, keep it as the
        last (and maybe first) loss, log it and the current lr."""
        loss = loss.detach()
        self.track_loss(loss, what, fix)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"])

    def track_loss(self, loss: torch.Tensor, what: str, fix: str, optimizers=None) -> None:
        """record_loss without logging: the guard (over `optimizers`, default the trainer's) and the first and
        last loss."""
        loss = loss.detach()
        self.check_losses()  # the steps before this one: their flags reached the host long ago
        if not on_device_guard(self.trainer):
            check_finite(loss, self, what, fix)
        else:
            self.guard_on_device(loss, what, fix, optimizers)
        if self._first_loss is None:
            self._first_loss = loss
        self._last_loss = loss

    def guard_on_device(self, loss: torch.Tensor, what: str, fix: str, optimizers=None) -> None:
        """Hand this step's non-finiteness to the fused optimizers as `found_inf` (sticky: once set, every later
        update is skipped too, gradient accumulation included) and queue its copy to the host."""
        bad = (~torch.isfinite(loss)).float().reshape(())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # every rank skips together
        self._nonfinite = bad if self._nonfinite is None else torch.maximum(self._nonfinite, bad)
        for opt in self.trainer.optimizers if optimizers is None else optimizers:
            opt.found_inf = self._nonfinite
        cuda = loss.device.type == "cuda"
        finite = (1.0 - bad).to("cpu", non_blocking=cuda)
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        self._unread.append(StepLoss(loss, finite, ready, self.global_step, what, fix))

    def check_losses(self) -> None:
        """Read the finiteness of every step not read yet; stop at the first non-finite one."""
        unread, self._unread = self._unread, []
        for step in unread:
            step.check(self)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, self.optim_cfg.get("clip_grad"))

    def on_train_end(self) -> None:
        self.check_losses()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_losses()  # a checkpoint never holds a step after a non-finite loss
        checkpoint[FIRST_LOSS_KEY] = self.first_loss
        checkpoint[LAST_LOSS_KEY] = self.last_loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # fd_first_loss: the key of distillation checkpoints written before the modules shared one
        self.first_loss = checkpoint.get(FIRST_LOSS_KEY, checkpoint.get("fd_first_loss"))
        self.last_loss = checkpoint.get(LAST_LOSS_KEY)
