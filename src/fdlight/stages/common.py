"""What every stage shares: the run directory, the Trainer (precision, strategy, logger, checkpoints), throughput,
and the metrics file."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from fdlight.errors import FDLightError, check
from fdlight.models.weights import atomic_write_text
from fdlight.modules.seeding import SeededSteps

RUN_MARKERS = ("checkpoints", "metrics.json", "config.yaml", "student.safetensors", "model.safetensors")


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


def is_secondary_rank() -> bool:
    """True in the processes a launcher starts beside rank 0 (Lightning's re-executed ranks, torchrun, SLURM/srun,
    MPI)."""
    return any(int(os.environ.get(v, "0") or 0) > 0 for v in RANK_VARIABLES)


def check_run_dir(cfg: DictConfig, run_dir: Path) -> Path | None:
    """Refuse to overwrite an earlier run (writes nothing); return the checkpoint to resume from, if any. Ranks
    other than 0 join rank 0's run directory, which rank 0 has checked already."""
    used = [m for m in RUN_MARKERS if (run_dir / m).exists()] if not is_secondary_rank() else []
    if cfg.get("resume"):
        ckpt = run_dir / "checkpoints" / "last.ckpt" if cfg.resume is True else Path(str(cfg.resume))
        check(ckpt.is_file(), f"resume={cfg.resume}: no checkpoint at {ckpt}; pass resume=<path to a .ckpt> or "
                              f"resume=true with hydra.run.dir set to the run to continue")
        return ckpt
    if used:
        raise FDLightError(f"run directory {run_dir} already holds a run ({', '.join(used)}); pass resume=true to "
                           f"continue it, or choose another hydra.run.dir=")
    return None


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config, once per run directory (a resumed run keeps the original); rank 0 writes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_secondary_rank():
        return
    if not (run_dir / "config.yaml").exists():
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> Path | None:
    """check_run_dir, then save_config: for stages whose remaining checks cannot lose anything."""
    ckpt = check_run_dir(cfg, run_dir)
    save_config(cfg, run_dir)
    return ckpt


def on_gpu(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer config runs on CUDA GPUs here (accelerator gpu/cuda, or auto with one visible)."""
    return torch.cuda.is_available() and trainer_cfg.accelerator in ("auto", "gpu", "cuda")


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
        return trainer_cfg.strategy
    from lightning.pytorch.strategies import FSDPStrategy

    check(torch.cuda.is_available(), "trainer=fsdp shards over CUDA GPUs and none is visible; use trainer=cpu here, "
                                     "or trainer=gpu / trainer=ddp on a GPU machine")
    check(bool(wrap_classes), "trainer=fsdp needs the student's block_class in its config to wrap")
    return FSDPStrategy(auto_wrap_policy=set(wrap_classes),
                        activation_checkpointing_policy=set(wrap_classes) if trainer_cfg.activation_checkpointing
                        else None,
                        sharding_strategy="FULL_SHARD", state_dict_type="full")


def wandb_offline(logger_cfg: DictConfig) -> bool:
    if logger_cfg.get("offline") is not None:
        return bool(logger_cfg.offline)
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in (
        Path.home().joinpath(".netrc").read_text() if Path.home().joinpath(".netrc").exists() else "")
    return not has_key or os.environ.get("WANDB_MODE") == "offline"


def build_logger(cfg: DictConfig, run_dir: Path):
    if cfg.logger.name == "csv":
        from lightning.pytorch.loggers import CSVLogger
        return CSVLogger(save_dir=str(run_dir), name="logs")
    if cfg.logger.name == "wandb":
        from lightning.pytorch.loggers import WandbLogger
        lg = cfg.logger
        return WandbLogger(project=lg.project, entity=lg.entity, save_dir=str(run_dir), name=run_dir.name,
                           offline=wandb_offline(lg), tags=list(lg.tags or []), log_model=False,
                           config=OmegaConf.to_container(cfg, resolve=True))
    raise FDLightError(f"unknown logger {cfg.logger.name!r}; use logger=csv or logger=wandb")


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


def timed_fit(cfg: DictConfig, stage_cfg: DictConfig, run_dir: Path, module: L.LightningModule, data, fit,
              callbacks=(), **trainer_kwargs):
    """What the validated training stages share: claim the run directory (call it after every input check, so bad
    input leaves no run behind), build the trainer with a throughput meter, and time `fit(trainer, module, data,
    resume)`. Returns the trainer, the meter, fit's result and the wall seconds."""
    resume = check_run_dir(cfg, run_dir)
    meter = Throughput()
    trainer = build_trainer(cfg, stage_cfg, run_dir, callbacks=[meter, *callbacks], validate=True,
                            checkpoint_every=stage_cfg.checkpoint_every_n_steps, **trainer_kwargs)
    save_config(cfg, run_dir)  # once the trainer is built: a trainer config that cannot run here leaves no run
    start = time.perf_counter()
    result = fit(trainer, module, data, resume)
    return trainer, meter, result, time.perf_counter() - start


def build_trainer(cfg: DictConfig, stage_cfg: DictConfig, run_dir: Path, callbacks=(), wrap_classes=None,
                  checkpoint_every: int | None = None, validate: bool = False) -> L.Trainer:
    """The stage's Lightning Trainer. With `validate`, `<stage>.val_every_n_epochs` sets how often (0: only after
    training, which the stage runs itself)."""
    t = cfg.trainer
    max_epochs = int(stage_cfg.epochs)
    val_every = int(stage_cfg.get("val_every_n_epochs", 1)) or max_epochs + 1
    ckpt = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                           every_n_train_steps=checkpoint_every or None, save_on_train_epoch_end=True)
    settings = dict(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=build_strategy(t, wrap_classes), precision=resolve_precision(t),
        max_epochs=max_epochs, max_steps=int(stage_cfg.get("max_steps", -1)),
        accumulate_grad_batches=int(t.accumulate_grad_batches),
        logger=build_logger(cfg, run_dir), callbacks=[ckpt, ProgressBar(), SeededSteps(cfg.seed), *callbacks],
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


def full_state_dict(root: torch.nn.Module, prefix: str, sharded: bool) -> dict[str, torch.Tensor]:
    """The unsharded weights under `prefix` of a (possibly FSDP-wrapped) module, prefix stripped. Under FSDP this is
    collective: call it on every rank; rank 0 gets the full tensors (on the CPU), the others an empty dict."""
    if sharded:
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
            state = root.state_dict()
    else:
        state = root.state_dict()
    from fdlight.optim import clean_name

    return {clean_name(k)[len(prefix):]: v for k, v in state.items() if clean_name(k).startswith(prefix)}


def trained_state_dict(trainer: L.Trainer, module: L.LightningModule, prefix: str) -> dict[str, torch.Tensor]:
    """full_state_dict of a fitted LightningModule, gathered through the strategy's wrapped model under FSDP."""
    from lightning.pytorch.strategies import FSDPStrategy

    sharded = isinstance(trainer.strategy, FSDPStrategy)
    return full_state_dict(trainer.strategy.model if sharded else module, prefix, sharded)


def strict_json(value):
    """NaN and infinities (e.g. img/s of a run too short to time) as null: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_metrics(run_dir: Path, metrics: dict) -> None:
    text = json.dumps(strict_json(metrics), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(run_dir / "metrics.json", text + "\n")
