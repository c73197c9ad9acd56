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
from fdlight.config import GROUPS, compose, group_choices, top_level_keys
from fdlight.errors import FDLightError

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
        known = known or top_level_keys()
        if top not in known and not user_config:
            close = difflib.get_close_matches(top, sorted(known), n=1, cutoff=0.8 if appended else 0.6)
            if close or not appended:
                hint = f"did you mean {close[0]}?" if close else f"the top-level keys are: {', '.join(sorted(known))}"
                raise FDLightError(f"unknown config key {top!r} in {arg!r}; {hint}")
        if key not in GROUPS or "," in value or value in ("null", ""):
            continue
        choices = group_choices(key)
        if value not in choices:
            raise FDLightError(f"unknown {key} {value!r}; choose one of: {', '.join(choices)}")


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
                           "trainer.devices=1, or launch one job per value (hydra/launcher=submitit_slurm, or torchrun)")


def record_error(run_dir: Path, error: FDLightError) -> None:
    """After a user error: a run that never started (its directory holds only this job's log: no config.yaml, no
    checkpoint) leaves no directory; otherwise the error and its traceback go to the run's log file, beside what the
    run logged before."""
    own_log = run_dir / f"{HydraConfig.get().job.name}.log"
    if own_log.is_file() and [p.name for p in run_dir.iterdir()] == [own_log.name]:
        for handler in logging.getLogger().handlers:  # release the file before removing it
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == own_log.resolve():
                handler.close()
                logging.getLogger().removeHandler(handler)
        own_log.unlink()
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only when empty: never anything but what Hydra made for this job
        return
    record = logging.LogRecord("fdlight", logging.ERROR, __file__, 0, f"error: {error}", None,
                               (type(error), error, error.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(version_base="1.3", config_path="pkg://fdlight.conf", config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from fdlight.stages import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_sweep_launch(cfg)
        with console.job():
            metrics = run(cfg, run_dir)
    except FDLightError as e:
        print(f"fdlight: error: {e}", file=sys.stderr)
        record_error(run_dir, e)
        sys.exit(2)
    return metrics.get("last_loss") if isinstance(metrics, dict) else None


def main() -> None:
    console.setup()
    try:
        check_group_overrides(sys.argv[1:])
        check_stage_sections(sys.argv[1:])
    except FDLightError as e:
        print(f"fdlight: error: {e}", file=sys.stderr)
        sys.exit(2)
    _app()


if __name__ == "__main__":
    main()
