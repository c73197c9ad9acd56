"""Every file fdlight writes goes through `atomic_file`: a temporary file in the destination's own directory (so the
final rename never crosses a filesystem), flushed and fsynced, then renamed over the real name. A full disk, a quota,
a read-only directory or a kill leaves the previous good file or none, never a partial file under the real name; the
disk errors become one FDLightError line that names the path."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from fdlight.errors import FDLightError

if TYPE_CHECKING:
    import torch

DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def disk_error(path: Path, err: OSError, what: str = "") -> FDLightError:
    """One line for an OSError of writing `path`: what went wrong and what to do about it."""
    reason = DISK_ERRORS.get(err.errno, err.strerror or type(err).__name__)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk"
    elif err.errno == errno.EROFS:
        fix = "remount it writable"
    elif err.errno in (errno.EACCES, errno.EPERM):
        fix = f"fix the permissions of {path.parent}"
    else:
        fix = "check that disk"
    return FDLightError(f"cannot write {what}{path}: {reason} (errno {err.errno}); {fix}, or pass another "
                        f"hydra.run.dir=")


OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
WRITE_ERRNOS = {*DISK_ERRORS, errno.EFBIG, errno.EIO}
FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}  # errors only a write can meet


def os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a writer's failure: the exception itself, or a disk error that it was raised from or that a
    native writer put in its message (safetensors: "... (os error 28)"); None for a failure that is not the disk's."""
    if isinstance(exc, FDLightError):
        return None
    if isinstance(exc, OSError):
        return exc
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc
        found = OS_ERROR_TEXT.search(str(exc))
        if found and int(found.group(1) or found.group(2)) in WRITE_ERRNOS:
            code = int(found.group(1) or found.group(2))
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


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
    except Exception as e:  # noqa: BLE001 - writers report a full disk in their own exception types
        cause = os_error(e)
        if cause is None:
            raise
        raise disk_error(path, cause) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | Path):
    """Yield a temporary folder beside `path`; when the block ends without an error, fsync its files and rename it
    to `path` (a folder already there, from an earlier export of the same run, is replaced whole). On any error the
    temporary folder is removed and `path` is left as it was."""
    path = Path(path)
    tmp = old = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except Exception as e:  # noqa: BLE001 - writers report a full disk in their own exception types
        if old is not None and (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)  # the earlier export stays as it was
        cause = os_error(e)
        if cause is None:
            raise
        raise disk_error(path, cause) from e
    finally:
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)


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


def write_json(path: str | Path, value, indent: int = 2, sort_keys: bool = True) -> Path:
    """Strict JSON (NaN and infinities as null)."""
    text = json.dumps(strict_json(value), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return write_text(path, text + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        sort_metadata(tmp)
    return Path(path)


def sort_metadata(path: Path) -> None:
    """safetensors writes its metadata in hash order, another byte order in every process: sorted here, so one
    content gives one file. In place: the header keeps its length (padded with spaces, as the format allows)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) <= size:  # always: the same strings with the same escapes
            f.seek(8)
            f.write(text.ljust(size, b" "))


class _WriteAll(io.RawIOBase):
    """A file for torch.save that writes every byte it is given and keeps the first OSError: torch's zip writer
    ignores short writes and replaces the disk's error by its own ("unexpected pos")."""

    def __init__(self, fh):
        super().__init__()
        self.fh, self.error = fh, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view:
                view = view[self.fh.write(view):]
        except OSError as e:
            self.error = self.error or e
            raise
        return size


def save_torch(obj, path: str | Path) -> Path:
    import torch

    with atomic_file(path) as tmp, open(tmp, "wb", buffering=0) as fh:
        out = _WriteAll(fh)
        try:
            torch.save(obj, out)
        except Exception as e:
            if out.error is not None:
                raise out.error from e
            raise
        if out.error is not None:  # torch carried on after a failed write
            raise out.error
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
