"""Every file fdlight writes goes through `atomic_file`: a temporary file in the destination's own directory (so the
final rename never crosses a filesystem), flushed and fsynced, then renamed over the real name. A full disk, a quota,
a read-only directory or a kill leaves the previous good file or none, never a partial file under the real name; the
disk errors become one FDLightError line that names the path."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from fdlight.errors import FDLightError

DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def disk_error(path: Path, err: OSError) -> FDLightError:
    """One line for an OSError of writing `path`."""
    reason = DISK_ERRORS.get(err.errno, err.strerror or type(err).__name__)
    return FDLightError(f"cannot write {path}: {reason} (errno {err.errno}); free space or fix the permissions of "
                        f"{path.parent}, or pass another hydra.run.dir=")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open a directory; the rename is still atomic
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path`; when the block ends without an error, fsync it and rename it to `path`
    (readable like any other file: mode 0644). On any error the temporary file is removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        raise disk_error(path, e) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def strict_json(value):
    """NaN and infinities (e.g. img/s of a run too short to time) as null: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str | Path, value, indent: int = 2) -> Path:
    return write_text(path, json.dumps(strict_json(value), indent=indent, sort_keys=True, allow_nan=False) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def save_torch(obj, path: str | Path) -> Path:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure, in the format its suffix names; the figure is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
