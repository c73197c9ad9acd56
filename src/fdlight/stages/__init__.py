"""Stages: each is `run(cfg, run_dir) -> metrics`. Later stages take earlier stages' artifacts by path."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from omegaconf import DictConfig

from fdlight.errors import FDLightError

STAGES = ("distill", "finetune", "linear", "diagnose", "segment", "detect", "pipeline")


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    name = cfg.stage
    available = [s for s in STAGES if importlib.util.find_spec(f"fdlight.stages.{s}") is not None]
    if name not in available:
        raise FDLightError(f"unknown stage {name!r}; choose one of: {', '.join(available)}")
    return importlib.import_module(f"fdlight.stages.{name}").run(cfg, Path(run_dir))
