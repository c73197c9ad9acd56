"""The run template every stage fills in:

    validate -> claim the run directory -> build -> (trainer -> config.yaml -> fit -> final checkpoint)
             -> export -> metrics.json -> one line that says where the artifacts are

Validation reads the config (and at most the headers of input files) and writes nothing, so bad input leaves no run
directory; the builders then trust their input. Claiming refuses to overwrite a run, returns the checkpoint to resume,
or ends at once when a resumed run is already complete. Every artifact is written atomically (fdlight.artifacts)."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from fdlight.artifacts import write_json
from fdlight.data.source import data_text, data_used
from fdlight.data.listing import kept_in, save_listings
from fdlight.errors import FDLightError
from fdlight.models.layout import timm_layout
from fdlight.runs.callbacks import Throughput
from fdlight.runs.directory import Claim, claim, discard_new, exclusive, is_secondary_rank, save_config
from fdlight.runs.gather import trained_state_dict
from fdlight.runs.monitor import build_monitor, check_monitor
from fdlight.runs.trainer import build_trainer, cpu_threads
from fdlight.runs.world import accumulation, peers
from fdlight.settings import check_sections

log = logging.getLogger("fdlight")


def worker_error(e: FDLightError) -> FDLightError:
    """An FDLightError raised in a DataLoader worker comes back wrapped in the worker's traceback: keep its line."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    return FDLightError(last.split("FDLightError: ", 1)[-1])


@contextlib.contextmanager
def console_only():
    """Log to the console but not to the run's log file (a resume that finds its run complete changes no file)."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]

    def drop(record) -> bool:
        return False

    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(drop)


class Stage:
    """A stage: `run(cfg, run_dir) -> metrics`. Subclasses set `name` (the stage= choice and the config section
    it reads) and fill in validate, build and execute."""

    name: str = ""
    checkpointed = True  # resume=true continues from checkpoints/last.ckpt

    def settings(self, cfg: DictConfig) -> DictConfig:
        return cfg[self.name]

    def validate(self, cfg: DictConfig) -> None:
        """Every check of the settings and inputs; writes nothing (the section's schema runs before it)."""

    def build(self, cfg: DictConfig) -> Any:
        """What the stage works with (models, data); reads inputs, writes nothing."""

    def execute(self, cfg: DictConfig, run_dir: Path, built: Any, claimed: Claim) -> dict:
        """The stage's work, its artifacts written; returns its metrics."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        """The closing line's first half: what was done, in numbers."""
        return f"stage={self.name} done"

    def run(self, cfg: DictConfig, run_dir: Path, callbacks=()) -> dict:
        """The template; `callbacks` join a training stage's Trainer (tests and notebooks watch a run with them)."""
        s = self.settings(cfg)
        with cpu_threads(cfg, s):
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            check_sections(cfg)
            if s is not None and s.get("total_batch_size") is not None:
                accumulation(cfg.trainer, s)  # a total the processes here cannot make up: one line, nothing written
            if getattr(self, "monitored", None) and cfg.get("monitor") is not None:
                check_monitor(cfg.monitor)
            self.validate(cfg)
            with exclusive(run_dir):
                claimed = claim(cfg, run_dir, self.checkpointed)
                if claimed.finished is not None:
                    with console_only():
                        log.info("run %s is complete (%s steps); nothing to do (files left as they are)", run_dir,
                                 claimed.finished.get("steps", "all"))
                    return claimed.finished
                try:
                    with kept_in(run_dir):  # what a data source lists is kept in the run directory (data.listing)
                        built = self.build(cfg)
                        if callbacks:
                            built.callbacks = [*built.callbacks, *callbacks]
                        metrics = self.execute(cfg, run_dir, built, claimed)
                except FDLightError as e:
                    e.run_started = True
                    raise
        return metrics

    def finish(self, run_dir: Path, metrics: dict, artifacts: list[Path]) -> None:
        """metrics.json (written last: its presence marks a complete run), then the closing line."""
        write_json(run_dir / "metrics.json", metrics)
        names = ", ".join((str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p))
                          + ("/" if p.is_dir() else "") for p in artifacts if p is not None)  # a folder: student/
        data = f"; {data_text(metrics)}" if "data" in metrics else ""
        log.info("%s%s; artifacts in %s: %s", self.summary(metrics), data, run_dir, names + (", " if names else "")
                 + "metrics.json")


@dataclass
class Training:
    """What a training stage builds: the LightningModule, its DataModule, and what its Trainer needs."""
    module: L.LightningModule
    data: L.LightningDataModule
    wrap_classes: set[type] = field(default_factory=set)
    callbacks: list = field(default_factory=list)
    validate: bool = True
    extra: dict = field(default_factory=dict)  # what the stage's export and metrics need besides


class TrainingStage(Stage):
    """A stage that trains one LightningModule: the template's execute for all of them."""

    weights_prefix = "model."  # the module's submodule whose weights are exported
    monitored: str | None = None  # the module's submodule whose features monitor=knn follows (None: not monitored)

    def fit(self, trainer: L.Trainer, built: Training, resume: Path | None) -> dict:
        """Train, then validate once more unless the final weights were just validated; the validation metrics."""
        trainer.fit(built.module, datamodule=built.data, ckpt_path=str(resume) if resume else None)
        return {}

    def describe(self, cfg: DictConfig, built: Training) -> dict:
        """The stage's own leading entries of metrics.json (what was trained on what)."""
        return {}

    def record(self, cfg: DictConfig, built: Training) -> dict:
        """metrics.json's leading entries: the stage, the data it read (fdlight.data.source) and describe's."""
        splits = (getattr(built.data, "train_set", None), getattr(built.data, "val_set", None))  # null: not counted
        return {"stage": self.name, **data_used(cfg.data, *splits), **self.describe(cfg, built)}

    def export(self, cfg: DictConfig, run_dir: Path, built: Training, state: dict) -> list[Path]:
        """Write the trained weights (rank 0 only); the paths written."""
        return []

    def monitor(self, cfg: DictConfig, built: Training) -> list:
        """[the monitor=knn callback] when the stage is monitored and the data allow it, else []."""
        if not self.monitored or cfg.get("monitor") is None:
            return []
        model = getattr(built.module, self.monitored)
        # the layout the module measured (a student of one's own has no timm attributes), else timm's own
        layout = getattr(built.module, f"{self.monitored}_layout", None) or timm_layout(model)
        found = build_monitor(cfg, layout.img_size, self.monitored)
        return [found] if found else []

    def execute(self, cfg: DictConfig, run_dir: Path, built: Training, claimed: Claim) -> dict:
        s = self.settings(cfg)
        meter = Throughput()
        before = set(run_dir.iterdir()) if run_dir.is_dir() else set()  # the run's log
        monitor = self.monitor(cfg, built)
        trainer = build_trainer(cfg, s, run_dir, callbacks=[meter, *monitor, *built.callbacks], validate=built.validate,
                                wrap_classes=built.wrap_classes, checkpoint_every=s.get("checkpoint_every_n_steps"))
        save_config(cfg, run_dir)  # once the trainer is built: a trainer config that cannot run here leaves no run
        if not is_secondary_rank():
            save_listings(run_dir)  # before other ranks start: they read rank 0's listing
        if claimed.resume_from is not None and not is_secondary_rank():
            (run_dir / "metrics.json").unlink(missing_ok=True)  # a complete run trained on is complete no longer
        if trainer.is_global_zero and s.get("total_batch_size") is not None:  # how this machine makes up the total
            n, k = trainer.world_size, trainer.accumulate_grad_batches
            log.info("total batch %d: %d a device x %d process%s x %d accumulated", s.batch_size * n * k,
                     s.batch_size, n, "es" * (n != 1), k)
        start = time.perf_counter()
        try:
            with peers(cfg.trainer):
                val = self.fit(trainer, built, claimed.resume_from)
        except FDLightError as e:
            if trainer.global_step == 0 and claimed.resume_from is None and trainer.is_global_zero:
                discard_new(run_dir, before)  # bad input found by the first batch (data.strict): no run to keep
            raise worker_error(e) from None
        wall = time.perf_counter() - start
        module = built.module
        metrics = {**self.record(cfg, built), **val, "first_loss": module.first_loss,
                   "last_loss": module.last_loss, "steps": trainer.global_step, "img_per_s": meter.img_per_s,
                   "wall_s": wall, **(monitor[0].metrics() if monitor else {})}
        state = trained_state_dict(trainer, module, self.weights_prefix) if self.weights_prefix else {}
        if trainer.is_global_zero:  # the gathering above is collective under FSDP: every rank ran it
            artifacts = self.export(cfg, run_dir, built, state)
            self.finish(run_dir, metrics, [*artifacts, run_dir / "checkpoints" / "last.ckpt"])
        return metrics


def percent(value) -> str:
    """A fraction for a closing line: "42.00%", or "n/a" when it was not measured (a score of 0 is 0.00%)."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}%"
