"""The run directory's rules: a run directory holds one run, trained by one process at a time; `resume=true`
continues it only with the settings it was started with (or says that it is complete, or starts it again when it
stopped before its first checkpoint); ranks other than 0 join rank 0's directory and write nothing."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fdlight.artifacts import disk_error, write_text
from fdlight.errors import FDLightError, check

log = logging.getLogger(__name__)

RUN_MARKERS = ("checkpoints", "metrics.json", "config.yaml", "student.safetensors", "model.safetensors")
LOCK = ".fdlight.lock"  # held (flock) by the process training the run; holds its pid
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
# Settings that change how a run computes but not what: a resume may change them freely.
RESUME_FREE = ("resume", "resume_allow_changes", "data.num_workers", "logger", "hydra", "monitor")
RESUME_FREE_LEAVES = ("num_threads",)
# A complete run resumed with a new budget (resume_allow_changes=true) trains on to it instead of being left as it is.
BUDGET_LEAVES = ("max_steps", "epochs")


def is_secondary_rank() -> bool:
    """True in the processes a launcher starts beside rank 0 (Lightning's re-executed ranks, torchrun, SLURM/srun,
    MPI)."""
    return any(int(os.environ.get(v, "0") or 0) > 0 for v in RANK_VARIABLES)


@dataclass
class Claim:
    """What claiming a run directory found: a checkpoint to continue from, or a finished run's metrics."""
    run_dir: Path
    resume_from: Path | None = None
    finished: dict | None = None


def leaves(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(leaves(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def _free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in RESUME_FREE) or key.rsplit(".", 1)[-1] in \
        RESUME_FREE_LEAVES


def changed_settings(cfg: DictConfig, saved: DictConfig) -> list[str]:
    """Dotted keys whose value differs between a config and a run's saved config.yaml (settings that do not change
    the result, such as data.num_workers, excepted)."""
    now = leaves(OmegaConf.to_container(cfg, resolve=True))
    before = leaves(OmegaConf.to_container(saved, resolve=True))
    keys = sorted(k for k in now.keys() | before.keys() if not _free(k) and now.get(k, "<unset>") != before.get(
        k, "<unset>"))
    return keys


def describe_changes(keys: list[str], cfg: DictConfig, saved: DictConfig, limit: int = 4) -> str:
    def value(c, k):
        return OmegaConf.select(c, k, default="<unset>")
    shown = [f"{k}={value(cfg, k)!r} (run: {value(saved, k)!r})" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def setting(value) -> str:
    """A value as the command line spells it (true, not Python's True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def claim(cfg: DictConfig, run_dir: Path, checkpointed: bool = True, dir_key: str = "hydra.run.dir") -> Claim:
    """Check the run directory before anything is built or written: refuse to overwrite an earlier run; with
    `resume`, return its checkpoint (when the stage is `checkpointed`), or its metrics when it is complete, and
    refuse settings that differ from the run's config.yaml unless `resume_allow_changes=true`."""
    if is_secondary_rank():  # rank 0 has checked the directory; other ranks follow it
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        return Claim(run_dir, ckpt if cfg.get("resume") and ckpt.is_file() else None)
    used = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    if not cfg.get("resume"):
        if used:
            raise FDLightError(f"run directory {run_dir} already holds a run ({', '.join(used)}); pass resume=true to "
                               f"continue it, or choose another {dir_key}=")
        return Claim(run_dir)
    keys: list[str] = []
    if (run_dir / "config.yaml").is_file():
        saved = OmegaConf.load(run_dir / "config.yaml")
        keys = changed_settings(cfg, saved)
        if keys and not cfg.get("resume_allow_changes"):
            raise FDLightError(f"resume={setting(cfg.resume)}: settings differ from the run's "
                               f"{run_dir / 'config.yaml'}: "
                               f"{describe_changes(keys, cfg, saved)}; resume with the run's own settings, or pass "
                               f"resume_allow_changes=true to continue with the new ones")
        if keys:
            log.warning("resuming with changed settings: %s", describe_changes(keys, cfg, saved, limit=len(keys)))
    budget = [k for k in keys if k.rsplit(".", 1)[-1] in BUDGET_LEAVES]
    if cfg.resume is True and (run_dir / "metrics.json").is_file() and not (budget and checkpointed):
        return Claim(run_dir, finished=json.loads((run_dir / "metrics.json").read_text()))
    if not checkpointed:  # a stage of steps (the pipeline) resumes each step from its own directory
        return Claim(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt" if cfg.resume is True else Path(str(cfg.resume)).expanduser()
    if cfg.resume is True and not ckpt.exists() and (run_dir / "config.yaml").is_file():
        log.info("run %s stopped before its first checkpoint: training it again from step 0 with its own settings",
                 run_dir)
        return Claim(run_dir)
    check(ckpt.is_file(), f"resume={setting(cfg.resume)}: no checkpoint at {ckpt}; pass resume=<path to a .ckpt> or "
                          f"resume=true with {dir_key} set to the run to continue")
    check(readable_checkpoint(ckpt), f"resume={setting(cfg.resume)}: {ckpt} is not a complete checkpoint (truncated or "
                                     f"not written by torch.save); pass resume=<path to another .ckpt>")
    return Claim(run_dir, ckpt)


@contextlib.contextmanager
def exclusive(run_dir: Path, dir_key: str = "hydra.run.dir"):
    """Hold the run directory for one process while the block runs: an flock on its lock file, which the kernel
    releases when the process ends however it ends (a killed run leaves no stale lock). A second process is refused,
    naming the first. Ranks other than 0 are rank 0's: they take nothing."""
    if is_secondary_rank():
        yield
        return
    made = not run_dir.exists()
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = hold(path, run_dir, dir_key)
    except OSError as e:
        raise disk_error(run_dir, e, "the run directory ") from e
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a process waiting on this file sees it go and takes a new one
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty: a start that failed leaves no directory


def hold(path: Path, run_dir: Path, dir_key: str) -> int:
    """Lock `path` (made if absent) and write this process's id in it; the open file's descriptor."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FDLightError(f"run directory {run_dir} is being trained by another process "
                               f"({'pid ' + holder if holder else 'starting up'}); wait for it to end or stop it, or "
                               f"choose another {dir_key}=") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not a file its last holder removed as we opened it
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def readable_checkpoint(path: Path) -> bool:
    """Whether a torch.save file is whole: its zip directory, at the file's end, reads (a cheap check, no load)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config, once per run directory (a resumed run keeps the original); rank 0 writes it."""
    if is_secondary_rank():
        return
    if not (run_dir / "config.yaml").exists():
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def check_writable(run_dir: Path, dir_key: str = "hydra.run.dir") -> None:
    """Fail in one line when files cannot be created in the run directory, or in the folder it would be made in (a
    read-only mount, no permission)."""
    folder = Path(run_dir)
    try:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    except OSError as e:
        raise disk_error(folder, e, "the run directory ") from e
    check(folder.is_dir(), f"cannot make the run directory {run_dir}: {folder} is a file; pass another {dir_key}=")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fdlight-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise disk_error(Path(run_dir), e, "the run directory ") from e


def discard_new(run_dir: Path, before: set[Path]) -> None:
    """Remove what a run put in its directory besides `before` (what was there when it started: its log)."""
    for path in set(run_dir.iterdir()) - before if run_dir.is_dir() else ():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
