"""A sweep's record, `multirun.yaml`, kept as it was before a command that is then refused: Hydra's sweeper rewrites
it with the new command's overrides before any launcher runs, so a refused resume or relaunch would otherwise leave
an existing sweep's record describing a sweep that never ran. Light: the command line keeps it before torch loads."""
from __future__ import annotations

from pathlib import Path

from fdlight.artifacts import write_text

RECORD = "multirun.yaml"
_kept: dict[Path, str] = {}


def keep(sweep_dir: Path) -> None:
    """Remember the sweep directory's record as it is now (nothing when there is none)."""
    path = Path(sweep_dir).absolute() / RECORD
    if path.is_file():
        _kept[path.parent] = path.read_text()


def restore(sweep_dir: Path) -> bool:
    """Put back the record kept for `sweep_dir`; False when none was kept (the sweep directory is new)."""
    folder = Path(sweep_dir).absolute()
    if folder not in _kept:
        return False
    write_text(folder / RECORD, _kept[folder])
    return True
