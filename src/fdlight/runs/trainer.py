"""The Lightning Trainer of a stage and what it is made of: devices, precision, strategy (DDP, FSDP), logger, the
CPU thread count."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from fdlight.artifacts import save_torch
from fdlight.config import student_seed
from fdlight.console import wandb_settings
from fdlight.errors import FDLightError, check
from fdlight.runs.callbacks import ResumeNote, RunCheckpoint, SeededSteps, progress_display
from fdlight.runs.log import ContinuousLog, RunLog
from fdlight.runs.world import (  # noqa: F401 - on_gpu and world_size are read from here by the stages
    Joined, accumulation, init_timeout, on_gpu, strategy_with_timeout, trainer_devices, world_size)


@contextlib.contextmanager
def cpu_threads(cfg: DictConfig, s: DictConfig):
    """On a CPU run, use `<stage>.num_threads` intra-op threads (null: torch's default) while the stage runs."""
    before = torch.get_num_threads()
    if not on_gpu(cfg.trainer) and s.get("num_threads"):
        torch.set_num_threads(int(s.num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_precision(trainer_cfg: DictConfig) -> str:
    if trainer_cfg.precision != "auto":
        return str(trainer_cfg.precision)
    return "bf16-mixed" if on_gpu(trainer_cfg) else "32-true"


def build_strategy(trainer_cfg: DictConfig, wrap_classes: set[type] | None):
    if trainer_cfg.strategy != "fsdp":
        return strategy_with_timeout(trainer_cfg.strategy, trainer_cfg)
    from lightning.pytorch.strategies import FSDPStrategy

    check(torch.cuda.is_available(), "trainer=fsdp shards over CUDA GPUs and none is visible; use trainer=cpu here, "
                                     "or trainer=gpu / trainer=ddp on a GPU machine")
    check(bool(wrap_classes), "trainer=fsdp needs the student's block_class in its config to wrap")
    return FSDPStrategy(auto_wrap_policy=set(wrap_classes),
                        activation_checkpointing_policy=set(wrap_classes) if trainer_cfg.activation_checkpointing
                        else None,
                        sharding_strategy="FULL_SHARD", state_dict_type="full", timeout=init_timeout(trainer_cfg))


def wandb_offline(logger_cfg: DictConfig) -> bool:
    if logger_cfg.get("offline") is not None:
        return bool(logger_cfg.offline)
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in (
        Path.home().joinpath(".netrc").read_text() if Path.home().joinpath(".netrc").exists() else "")
    return not has_key or os.environ.get("WANDB_MODE") == "offline"


def build_logger(cfg: DictConfig, run_dir: Path, group: str | None = None):
    """The config's logger writing into the run directory; `group` puts a W&B run in a group (one per sweep), and
    then starts it as a run of its own beside any other in this process."""
    if cfg.logger.name == "csv":
        return RunLog(run_dir)
    if cfg.logger.name == "wandb":
        from lightning.pytorch.loggers import WandbLogger
        lg = cfg.logger
        extra = dict(group=group, reinit="create_new") if group else {}
        logger = WandbLogger(project=lg.project, entity=lg.entity, save_dir=str(run_dir), name=run_dir.name,
                             offline=wandb_offline(lg), tags=list(lg.tags or []), log_model=False,
                             config=OmegaConf.to_container(cfg, resolve=True), settings=wandb_settings(), **extra)
        if getattr(logger, "_wandb_init", {}).get("anonymous", "") is None:  # W&B warns that the setting is unused
            del logger._wandb_init["anonymous"]
        if group:  # started now: WandbLogger would otherwise join the run already open in this process
            import wandb

            logger._experiment = wandb.init(**logger._wandb_init)
        return logger
    raise FDLightError(f"unknown logger {cfg.logger.name!r}; use logger=csv or logger=wandb")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files written through fdlight.artifacts: never a partial .ckpt under the real name."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        save_torch(checkpoint, path)


def build_trainer(cfg: DictConfig, stage_cfg: DictConfig, run_dir: Path, callbacks=(), wrap_classes=None,
                  checkpoint_every: int | None = None, validate: bool = False, checkpoint: bool = True,
                  logger=None, checkpoint_io: TorchCheckpointIO | None = None, logs=()) -> L.Trainer:
    """The stage's Lightning Trainer. With `validate`, `<stage>.val_every_n_epochs` sets how often (0: only after
    training, which the stage runs itself). `logger` (default: the config's, in the run directory) and
    `checkpoint_io` (default: atomic writes) replace the run's own (a shared-teacher sweep logs and saves per job;
    `logs`: its jobs' CSV logs, kept continuous across a resume as a run's own is)."""
    t = cfg.trainer
    logger = build_logger(cfg, run_dir) if logger is None else logger
    max_epochs = int(stage_cfg.epochs)
    val_every = int(stage_cfg.get("val_every_n_epochs", 1)) or max_epochs + 1
    ckpt = [RunCheckpoint(run_dir / "checkpoints", checkpoint_every or None)] if checkpoint else []  # off: benchmarks
    settings = dict(
        accelerator=t.accelerator, devices=trainer_devices(t), num_nodes=t.num_nodes,
        strategy=build_strategy(t, wrap_classes), precision=resolve_precision(t),
        max_epochs=max_epochs, max_steps=int(stage_cfg.get("max_steps", -1)), enable_checkpointing=checkpoint,
        accumulate_grad_batches=accumulation(t, stage_cfg),
        logger=logger,
        callbacks=[*ckpt, progress_display(), ResumeNote(), SeededSteps(student_seed(cfg)), Joined(),
                   ContinuousLog(lg for lg in [logger, *logs] if isinstance(lg, RunLog)), *callbacks],
        plugins=[checkpoint_io or AtomicCheckpointIO()],
        log_every_n_steps=int(stage_cfg.get("log_every_n_steps", 10)),
        limit_val_batches=None if validate else 0, num_sanity_val_steps=0, check_val_every_n_epoch=val_every,
        default_root_dir=str(run_dir), enable_model_summary=False,
    )
    try:
        return L.Trainer(**settings)
    except (MisconfigurationException, ValueError) as e:  # Lightning's checks of these settings (traceback: the log)
        reason = str(e).strip().splitlines()[0].rstrip(".")
        raise FDLightError(f"the trainer settings cannot run here: {reason}; fix the trainer.* value it names, or "
                           f"pick a preset (trainer=auto, cpu, gpu, ddp, fsdp)") from e
