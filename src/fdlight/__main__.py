"""`python -m fdlight [group=choice ...] [key=value ...]`: compose the config with Hydra and run its stage."""
from __future__ import annotations

import contextlib
import difflib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fdlight import console
from fdlight.artifacts import FULL_OR_READ_ONLY, disk_error
from fdlight.config import (GROUPS, check_data_keys, check_student_model, compose, expand_teacher_list,
                            group_choices, primary_keys, top_level_keys, unread_data_key)
from fdlight.errors import FDLightError, check
from fdlight.runs.directory import check_writable
from fdlight.settings import check_sections

# Hydra's flags that take the next argument as their value, and those that point it at a user's own config
# (whose keys fdlight cannot know).
VALUE_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-sc", "--shell-completion",
               "-p", "--package", "-c", "--cfg", "--experimental-rerun")  # --info's value has no "=": no override
USER_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")


def overrides(argv: list[str]) -> list[str]:
    """The key=value overrides of a command line, without Hydra's flags and their values."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in VALUE_FLAGS
        else:
            out.append(arg)
    return out


def check_group_overrides(argv: list[str]) -> None:
    """Fail in one line on `teacher=nope`, naming the choices, and on a misspelled top-level key such as `teachr=`
    or `+teachr=` (Hydra's own message spans many lines, and its advice to append with `+` would train on
    the default silently). A deliberate new key (`+notes=...`, close to no known key) is left to Hydra."""
    user_config = any(a.split("=")[0] in USER_CONFIG_FLAGS for a in argv)
    known = None
    for arg in overrides(argv):
        key, sep, value = arg.partition("=")
        appended = key.startswith("+")
        key = key.lstrip("+~")
        if not sep:
            continue
        top = top_key(key)
        if top not in primary_keys() and not user_config:
            known = known or top_level_keys()
            if top not in known:
                close = difflib.get_close_matches(top, sorted(known), n=1, cutoff=0.8 if appended else 0.6)
                if close or not appended:
                    hint = f"did you mean {close[0]}?" if close else \
                        f"the top-level keys are: {', '.join(sorted(known))}"
                    raise FDLightError(f"unknown config key {top!r} in {arg!r}; {hint}")
        if key not in GROUPS or value in ("null", "") or value.startswith("[") or "(" in value or user_config:
            continue  # a list of teachers, a sweep function, or a user's folder (which adds choices)
        choices = group_choices(key)
        for choice in value.split(","):  # a sweep's values one by one
            if choice not in choices:
                raise FDLightError(f"unknown {key} {choice!r}; choose one of: {', '.join(choices)}")


def top_key(arg: str) -> str:
    return arg.partition("=")[0].lstrip("+~").split(".")[0].split("/")[0].split("@")[0]


def check_stage_sections(argv: list[str]) -> None:
    """`stage=finetune distill.max_steps=5` sets a section the composed config does not hold (Hydra's message is
    "Key 'distill' is not in struct"): name the stage it belongs to."""
    if any(a in ("-m", "--multirun") or a.split("=")[0] in USER_CONFIG_FLAGS for a in argv):
        return
    stages = set(group_choices("stage"))
    args = [a for a in overrides(argv) if "=" in a]
    keyed = [a for a in args if top_key(a) in stages]
    if not keyed:
        return
    try:
        cfg = compose([a for a in args if top_key(a) not in stages and top_key(a) != "hydra"])
    except Exception:  # noqa: BLE001 - any other composition error is Hydra's to report
        return
    for arg in keyed:
        if cfg.get(top_key(arg)) is None:
            raise FDLightError(f"{arg!r} is a setting of stage={top_key(arg)}, but this command runs "
                               f"stage={cfg.stage}; pass stage={top_key(arg)} to run that stage, or drop the setting")


def check_run(argv: list[str]) -> None:
    """Compose the command line as Hydra will run it and fail in one line where Hydra would print a traceback or a
    block of text: a setting of another stage, a misspelled setting (`finetune.batch_sise=8`), or a run directory
    that cannot be written (Hydra makes it and opens the run's log there before fdlight runs). Only for a plain run:
    flags (-m, --cfg, --help, a user's own config) are Hydra's to handle, but for the stage sections' check."""
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    multirun = any(a in ("-m", "--multirun") for a in argv)
    check_slurm(argv, multirun)
    shared = "hydra/launcher=shared_teacher" in argv
    check(multirun or not shared, "hydra/launcher=shared_teacher launches a -m sweep; add -m, e.g. python -m "
                                  "fdlight -m drop_path.student=0.1,0.2 hydra/launcher=shared_teacher")
    if multirun and shared and not any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        check_sweep_dir(overrides(argv))
    if any(a.startswith("-") for a in argv):
        check_stage_sections(argv)
        return
    args = overrides(argv)
    try:
        cfg = compose(args, with_hydra=True)  # one composition serves every check of a command that is right
    except ConfigCompositionException as e:
        check_stage_sections(argv)
        unknown = unknown_setting(e, args)
        if unknown is not None:
            raise unknown from None
        return
    except Exception:  # noqa: BLE001 - any other composition error is Hydra's to report, in its own words
        check_stage_sections(argv)
        return
    check_config(cfg, cfg.hydra.runtime.choices, args)  # before Hydra makes anything, and before torch loads
    run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    if run_dir:
        check_writable(Path(str(run_dir)))
        folder = Path(str(run_dir)).resolve()
        BEFORE.clear()
        BEFORE[folder] = frozenset(p.name for p in folder.iterdir()) if folder.is_dir() else None


def check_config(cfg: DictConfig, choices, args: list[str]) -> None:
    """The composed config's own rules that need no torch: the settings' schema, data keys the chosen data= reads,
    a student.model its student config builds. `choices`: Hydra's group choices; `args`: the overrides."""
    check_sections(cfg)
    check_data_keys(cfg.get("data"), choices.get("data"), args)
    check_student_model(cfg.get("student"), choices.get("student"))


SLURM_LAUNCHERS = ("fdlight_slurm", "submitit_slurm")


def check_slurm(argv: list[str], multirun: bool) -> None:
    """A sweep submitted to SLURM from a machine without it: submitit's error is a traceback, after Hydra wrote the
    sweep's multirun.yaml."""
    import shutil

    launcher = next((a.partition("=")[2] for a in overrides(argv) if a.startswith("hydra/launcher=")), None)
    check(not multirun or launcher not in SLURM_LAUNCHERS or shutil.which("srun") is not None,
          f"hydra/launcher={launcher} submits the jobs to SLURM, and this machine has no SLURM (no srun on the PATH); "
          f"run the command on a SLURM login node, or drop hydra/launcher= to run the jobs here")


def check_sweep_dir(args: list[str]) -> None:
    """A shared-teacher sweep: its directory can be made and written (Hydra's sweeper makes it, and writes
    multirun.yaml there, before any launcher runs), and what the sweep may need to restore is kept
    (fdlight.sweeps.record)."""
    from omegaconf import OmegaConf

    from fdlight.sweeps.record import keep

    sweep_values = [a for a in args if "," not in a.partition("=")[2] or a.partition("=")[2].startswith("[")]
    try:
        cfg = compose(sweep_values, with_hydra=True)
    except Exception:  # noqa: BLE001 - Hydra reports a command it cannot compose, in its own words
        return
    sweep_dir = OmegaConf.select(cfg, "hydra.sweep.dir")
    if sweep_dir:
        check_writable(Path(str(sweep_dir)), dir_key="hydra.sweep.dir")
        keep(Path(str(sweep_dir)))


def unknown_setting(error: Exception, args: list[str]) -> FDLightError | None:
    """`Key 'batch_sise' is not in struct` as one line that names the setting and the nearest known one."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = error.__cause__
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or " not in " not in str(cause) \
            or not cause.full_key:
        return None
    full_key = str(cause.full_key)
    arg = next((a for a in args if a.partition("=")[0].lstrip("+~") == full_key), full_key)
    parent, _, leaf = full_key.rpartition(".")
    try:
        rest = compose([a for a in args if a != arg], with_hydra=True)
        node = OmegaConf.select(rest, parent) if parent else None
    except Exception:  # noqa: BLE001 - the names are only a hint
        rest = node = None
    if parent == "data" and rest is not None and rest.hydra.runtime.choices.get("data") in group_choices("data"):
        return unread_data_key(rest.hydra.runtime.choices.data, leaf, arg)
    known = sorted(str(k) for k in node) if OmegaConf.is_dict(node) else []
    close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    hint = f"did you mean {parent}.{close[0]}?" if close else \
        f"{parent} has: {', '.join(known)}" if known else "see python -m fdlight --cfg job for the settings"
    return FDLightError(f"unknown setting {full_key!r} in {arg!r}; {hint}")


def check_sweep_launch(cfg: DictConfig) -> None:
    """Hydra's basic launcher runs a sweep's jobs one after another in this process, while a multi-GPU trainer
    re-executes the command line for each rank: every rank would then run the whole sweep."""
    from hydra.types import RunMode

    hc = HydraConfig.get()
    basic = "BasicLauncher" in str(hc.launcher.get("_target_", ""))
    t = cfg.get("trainer")
    multi = t is not None and (str(t.strategy) in ("ddp", "fsdp") or str(t.devices) != "1" or int(t.num_nodes) > 1)
    if hc.mode == RunMode.MULTIRUN and basic and multi:
        raise FDLightError("a -m sweep with a multi-GPU trainer would run the whole sweep on every rank; sweep with "
                           "trainer.devices=1, train a distillation sweep's jobs together (hydra/launcher="
                           "shared_teacher), or launch one job per value (hydra/launcher=submitit_slurm, or torchrun)")


# A plain run's directory (resolved): the names it held before Hydra made anything there, None where there was none.
BEFORE: dict[Path, frozenset[str] | None] = {}


def record_error(run_dir: Path, error: FDLightError) -> None:
    """After a user error: a run that never started (its directory holds only this job's log: no config.yaml, no
    checkpoint) leaves what Hydra made for it removed (the log, and the directory where there was none before); a
    command refused before its run started (a resume with other settings, a folder of one's own) leaves the
    directory it names as it was; otherwise the error and its traceback go to the run's log file, beside what the
    run logged before."""
    own_log = run_dir / f"{HydraConfig.get().job.name}.log"
    known = run_dir.resolve() in BEFORE
    before = BEFORE.get(run_dir.resolve())
    new_log = own_log.is_file() and (before is None or own_log.name not in before)
    only_log = own_log.is_file() and [p.name for p in run_dir.iterdir()] == [own_log.name]
    if only_log or (known and new_log and not error.run_started):
        for handler in logging.getLogger().handlers:  # release the file before removing it
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == own_log.resolve():
                handler.close()
                logging.getLogger().removeHandler(handler)
        if new_log:
            own_log.unlink()
        if before is None:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty, and only one this command made
        return
    if not error.run_started:
        return
    record = logging.LogRecord("fdlight", logging.ERROR, __file__, 0, f"error: {error}", None,
                               (type(error), error, error.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class LogFileGuard(logging.Filter):
    """After the first failed write to the run's log file (a full disk), stop writing to it: the console keeps every
    line, and logging's own report (a traceback per record) would bury the one-line error."""

    def __init__(self):
        super().__init__()
        self.failed = False

    def filter(self, record) -> bool:
        return not self.failed

    def failure(self, record) -> None:
        self.failed = True


def guard_log_files() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and not any(isinstance(f, LogFileGuard) for f in handler.filters):
            guard = LogFileGuard()
            handler.addFilter(guard)
            handler.handleError = guard.failure


def fail(run_dir: Path, error: FDLightError) -> None:
    print(f"fdlight: error: {error}", file=sys.stderr)
    record_error(run_dir, error)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="pkg://fdlight.conf", config_name="config")
def _app(cfg: DictConfig) -> float | None:
    guard_log_files()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_config(cfg, HydraConfig.get().runtime.choices, overrides(sys.argv[1:]))
        check_sweep_launch(cfg)
        # torch, Lightning and timm load here, once the command line has been checked (its errors come in a second)
        from fdlight.stages import run

        with console.job():
            metrics = run(cfg, run_dir)
    except FDLightError as e:
        fail(run_dir, e)
    except OSError as e:  # a write outside fdlight.artifacts (Lightning's CSV log) on a full or read-only disk
        if e.errno not in FULL_OR_READ_ONLY:
            raise
        error = disk_error(Path(e.filename) if e.filename else run_dir, e)
        error.run_started = True
        fail(run_dir, error)
    return metrics.get("last_loss") if isinstance(metrics, dict) else None


def main() -> None:
    console.setup()
    try:
        # teacher=[a,b] composes each teacher under teacher.<name>; rewritten in argv, which DDP ranks re-run
        sys.argv[1:] = expand_teacher_list(sys.argv[1:])
        check_group_overrides(sys.argv[1:])
        check_run(sys.argv[1:])
    except FDLightError as e:
        print(f"fdlight: error: {e}", file=sys.stderr)
        sys.exit(2)
    _app()


if __name__ == "__main__":
    main()
