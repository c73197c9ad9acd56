"""What every training module does around its step: stop on a non-finite loss on every rank, keep the first and last
loss (the first one across a resume), log the loss and the lr, clip and log the gradient norm."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from fdlight.errors import FDLightError

FIRST_LOSS_KEY = "fdlight_first_loss"


def check_finite(loss: torch.Tensor, module: L.LightningModule, what: str, fix: str) -> float:
    """The loss as a float; a NaN/inf on any rank stops every rank before the optimizer applies it (the last
    checkpoint stays good)."""
    value = float(loss.detach())
    finite = math.isfinite(value)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([1.0 if finite else 0.0], device=loss.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)  # every rank stops together
        finite = bool(flag.item())
    if not finite:
        kept = "the last good checkpoint is kept" if saved_checkpoint(module) else "no checkpoint had been written yet"
        raise FDLightError(f"non-finite {what} loss ({value}) at step {module.global_step}; stopped before the update, "
                           f"{kept}; {fix}")
    return value


def saved_checkpoint(module: L.LightningModule) -> Path | None:
    """The run's checkpoints/last.ckpt, if the trainer has written one."""
    callback = module.trainer.checkpoint_callback
    last = Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None
    return last if last is not None and last.is_file() else None


def clip_gradients(module: L.LightningModule, optimizer, max_norm) -> None:
    """Clip by global norm and log the norm; under FSDP the sharded root clips (Lightning's own clipping refuses)."""
    from lightning.pytorch.strategies import FSDPStrategy

    limit = float(max_norm) if max_norm else float("inf")
    if isinstance(module.trainer.strategy, FSDPStrategy):
        norm = module.trainer.model.clip_grad_norm_(limit)
    else:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
    module.log("train/grad_norm", norm)


class TrainingModule(L.LightningModule):
    """The base of fdlight's LightningModules. `optim` is the stage's optimizer settings; its `clip_grad` (none: no
    limit) bounds the global gradient norm. Subclasses pass each training loss through `record_loss`."""

    def __init__(self, optim: dict):
        super().__init__()
        self.optim_cfg = dict(optim)
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    def record_loss(self, loss: torch.Tensor, what: str, fix: str) -> float:
        """Stop on a non-finite `what` loss (`fix` says what to change), keep it as the last (and maybe first) loss,
        log it and the current lr."""
        value = check_finite(loss, self, what, fix)
        if self.first_loss is None:
            self.first_loss = value
        self.last_loss = value
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
        return value

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, self.optim_cfg.get("clip_grad"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FIRST_LOSS_KEY] = self.first_loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # fd_first_loss: the key of distillation checkpoints written before the modules shared one
        self.first_loss = checkpoint.get(FIRST_LOSS_KEY, checkpoint.get("fd_first_loss"))
