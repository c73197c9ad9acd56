"""Stages: each module holds one `Stage` of the run template (fdlight.runs.template) and exposes its `run(cfg,
run_dir) -> metrics`. Later stages take earlier stages' artifacts by path."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from omegaconf import DictConfig

from fdlight.config import group_choices, several_teachers
from fdlight.errors import FDLightError, check
from fdlight.runs.world import layout


def check_trainer(t: DictConfig) -> None:
    """A GPU trainer on a machine without one, or devices and nodes that are not here, fail before any model is built
    (Lightning's own error is a traceback, or a wait for ranks that never come)."""
    gpu = torch.cuda.is_available() or (t.accelerator == "gpu" and torch.backends.mps.is_available())
    check(str(t.accelerator) not in ("gpu", "cuda") or gpu,
          f"trainer.accelerator={t.accelerator} needs a CUDA GPU and none is visible here; use trainer=cpu, or "
          f"trainer=auto to take a GPU when there is one")
    layout(t)  # devices or nodes asked for but not here: one line before any process starts


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    name = cfg.stage
    available = group_choices("stage")
    if name not in available:
        raise FDLightError(f"unknown stage {name!r}; choose one of: {', '.join(available)}")
    check_trainer(cfg.trainer)
    check(name == "distill" or not several_teachers(cfg),
          f"a list of teachers (teacher=[...]) is distilled by stage=distill; stage={name} takes one teacher=")
    return importlib.import_module(f"fdlight.stages.{name}").run(cfg, Path(run_dir))
