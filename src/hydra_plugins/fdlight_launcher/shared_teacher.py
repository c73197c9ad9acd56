"""Hydra launcher `hydra/launcher=shared_teacher`: a `-m` distillation sweep trained as one process, one teacher
forward and one data stream for every job (fdlight.sweeps.shared_teacher). Hydra keeps its sweep syntax, sweep
directory, job numbering and multirun.yaml; each job's directory is `hydra.sweep.dir/hydra.sweep.subdir` as with
Hydra's own launcher. Hydra imports this module while it looks for plugins, so torch loads only when a sweep runs."""
# (no `from __future__ import annotations`: Hydra runs this module before it is in sys.modules, where a dataclass
# with string annotations looks itself up)

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)
# The sweep directory rank 0 resolved: a DDP rank re-runs the command line, and `${now:...}` may resolve differently.
SWEEP_DIR = "FDLIGHT_SWEEP_DIR"


@dataclass
class SharedTeacherLauncherConf:
    _target_: str = "hydra_plugins.fdlight_launcher.shared_teacher.SharedTeacherLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="shared_teacher", node=SharedTeacherLauncherConf,
                             provider="fdlight")


class SharedTeacherLauncher(Launcher):
    def __init__(self) -> None:
        super().__init__()
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        """The job's full config (Hydra's node included, its output directory resolved), as Hydra's run_job sees it."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = cfg.hydra.job.num = idx
        HydraConfig.instance().set_config(cfg)
        out = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(out.absolute())
        HydraConfig.instance().set_config(cfg)
        return cfg

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from fdlight.errors import FDLightError
        from fdlight.runs.directory import is_secondary_rank
        from fdlight.sweeps.record import restore
        from fdlight.sweeps.rules import Job, check_jobs

        setup_globals()
        configure_log(console_logging(self.config.hydra.job_logging), self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        before = set(sweep_dir.iterdir()) if sweep_dir.is_dir() else set()
        lead = os.environ.get(SWEEP_DIR)
        if not is_secondary_rank():
            os.environ[SWEEP_DIR] = str(sweep_dir.absolute())  # the ranks Lightning starts inherit it
        elif lead and Path(lead) != sweep_dir.absolute():  # a DDP rank whose ${now} fell on the next second
            forget_new_sweep(sweep_dir, before)
            sweep_dir = Path(lead)
            with read_write(self.config.hydra.sweep), open_dict(self.config.hydra.sweep):
                self.config.hydra.sweep.dir = lead
        configs, jobs = [], []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            cfg = self.job_config(overrides, idx)
            task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            shown = " ".join(filter_overrides(overrides))
            configs.append((cfg, task, list(overrides)))
            jobs.append(Job(task, Path(cfg.hydra.runtime.output_dir), f"job {idx} ({shown})"))
        callbacks = self.hydra_context.callbacks
        for cfg, task, _ in configs:
            callbacks.on_job_start(config=cfg, task_function=self.task_function)
        try:
            check_jobs(jobs)  # on the configs alone, before torch loads
            from fdlight.sweeps.shared_teacher import run

            results = run(jobs)
        except FDLightError as e:
            print(f"fdlight: error: {e}", file=sys.stderr)
            if not getattr(e, "run_started", False) and not restore(sweep_dir):  # as it was before this command
                forget_new_sweep(sweep_dir, before)
            sys.exit(2)
        returns = []
        for (cfg, task, overrides), metrics in zip(configs, results):
            HydraConfig.instance().set_config(cfg)
            ret = JobReturn(overrides=overrides, cfg=task, hydra_cfg=cfg, working_dir=str(Path.cwd()),
                            task_name=cfg.hydra.job.name, status=JobStatus.COMPLETED,
                            _return_value=metrics.get("last_loss"))
            callbacks.on_job_end(config=cfg, job_return=ret)
            returns.append(ret)
        return returns


def console_logging(job_logging: DictConfig) -> DictConfig:
    """The jobs' logging config without its file handler: the sweep adds each job's log file once the sweep has
    been checked (a refused sweep makes no job directory)."""
    conf = OmegaConf.to_container(job_logging, resolve=False)
    conf.get("handlers", {}).pop("file", None)
    root = conf.get("root", {})
    root["handlers"] = [h for h in root.get("handlers", []) if h != "file"]
    return OmegaConf.create(conf)


def forget_new_sweep(sweep_dir: Path, before: set[Path]) -> None:
    """A sweep refused before any job started leaves nothing: the sweep directory Hydra made for it (holding only
    its multirun.yaml) goes; a directory that held anything before stays as it was."""
    if before - {sweep_dir / "multirun.yaml"}:
        return
    new = set(sweep_dir.iterdir()) if sweep_dir.is_dir() else set()
    if new <= {sweep_dir / "multirun.yaml"}:
        shutil.rmtree(sweep_dir, ignore_errors=True)
