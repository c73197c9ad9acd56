"""Stages: each is `run(cfg, run_dir) -> metrics`. Later stages take earlier stages' artifacts by path."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
from omegaconf import DictConfig

from fdlight.errors import FDLightError, check

STAGES = ("distill", "finetune", "linear", "diagnose", "segment", "detect", "pipeline")

# The smallest value each count of a stage section takes (max_steps also takes -1: no limit).
AT_LEAST = {"batch_size": 1, "eval_batch_size": 1, "epochs": 1, "log_every_n_steps": 1, "val_every_n_epochs": 0,
            "checkpoint_every_n_steps": 0, "num_vis": 0}


def check_trainer(t: DictConfig) -> None:
    """A GPU trainer on a machine without one fails before any model is built (Lightning's own error is a
    traceback)."""
    gpu = torch.cuda.is_available() or (t.accelerator == "gpu" and torch.backends.mps.is_available())
    check(str(t.accelerator) not in ("gpu", "cuda") or gpu,
          f"trainer.accelerator={t.accelerator} needs a CUDA GPU and none is visible here; use trainer=cpu, or "
          f"trainer=auto to take a GPU when there is one")


def check_counts(cfg: DictConfig) -> None:
    """Batch sizes, epochs and step counts of every stage section in the config are whole numbers in range: a bad
    one fails here in one line, before anything is built or written (not deep inside a DataLoader)."""
    for section in STAGES:
        s = cfg.get(section)
        if not isinstance(s, DictConfig):
            continue
        for key, low in AT_LEAST.items():
            value = s.get(key)
            check(key not in s or (type(value) is int and value >= low),
                  f"{section}.{key}={value!r} must be a whole number >= {low}")
        value = s.get("max_steps")
        check("max_steps" not in s or (type(value) is int and (value == -1 or value >= 1)),
              f"{section}.max_steps={value!r} must be -1 (no limit) or a whole number >= 1")
        value = s.get("warmup_epochs")
        check("warmup_epochs" not in s or (type(value) in (int, float) and value >= 0),
              f"{section}.warmup_epochs={value!r} must be a number >= 0")


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    name = cfg.stage
    available = [s for s in STAGES if importlib.util.find_spec(f"fdlight.stages.{s}") is not None]
    if name not in available:
        raise FDLightError(f"unknown stage {name!r}; choose one of: {', '.join(available)}")
    check_counts(cfg)
    check_trainer(cfg.trainer)
    return importlib.import_module(f"fdlight.stages.{name}").run(cfg, Path(run_dir))
