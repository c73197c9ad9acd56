"""Reading weight files: safetensors, torch pickles, TorchScript; adapting foreign layouts; loading through timm."""
from __future__ import annotations

import importlib
import json
import os
import re
import socket
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from fdlight.errors import FDLightError, check
from fdlight.models.official import adapt_official, load_torch_file

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (the original OpenAI CLIP .pt files are)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def check_weights_file(path: str | Path, key: str = "weights") -> Path:
    path = Path(path)
    check(path.is_file(), f"{key} file not found: {path} (pass an existing .pt/.pth/.bin/.safetensors file)")
    return path


def check_readable_weights(path: str | Path, key: str = "weights") -> Path:
    """An existing weights file whose container is whole (a safetensors header, a torch zip directory), read without
    loading its tensors: a truncated or foreign file fails here in one line, before a run directory is claimed."""
    path = check_weights_file(path, key)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                z.namelist()
        elif path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
            with open(path, "rb") as fh:
                head = fh.read(2)
            if head == b"PK":  # a zip archive's start without its directory, which is written last
                raise ValueError("a zip archive cut short")
            if len(head) < 2 or head[0] != 0x80:  # a torch file is a zip archive or (older) a pickle: PROTO first
                raise ValueError("neither a zip archive nor a pickle" if head else "the file is empty")
    except Exception as e:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise FDLightError(f"{key}={path} is not a readable weights file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]}); pass a complete .safetensors/.pt file") from e
    return path


def read_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, a torch pickle (plain or wrapped), or a TorchScript archive. `mmap`
    maps a torch zip file's tensors instead of reading them (to look at shapes only)."""
    path = check_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if is_torchscript(path):
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        return load_torch_file(path, mmap=mmap and zipfile.is_zipfile(path))
    except FDLightError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise FDLightError(f"cannot read weights file {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def unwrap(sd: dict, keys=("state_dict", "model", "module")) -> dict[str, torch.Tensor]:
    """Strip the usual checkpoint wrappers ({'model': ...}, {'state_dict': ...}) and 'module.' prefixes."""
    for k in keys:
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def adapt_esvit(sd: dict) -> dict[str, torch.Tensor]:
    """EsViT checkpoint -> Swin backbone state dict: its 'student' entry (not the EMA teacher, as the official FD
    code does), 'module.'/'backbone.' prefixes stripped, projection heads dropped."""
    sd = sd.get("student", sd) if isinstance(sd, dict) else sd
    sd = unwrap(sd)
    if any(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dense."))}


ADAPTERS: dict[str | None, Callable[[dict], dict]] = {None: unwrap, "esvit": adapt_esvit, "official": adapt_official}


def mismatch_error(path, what: str, missing=(), unexpected=(), shapes=()) -> FDLightError:
    """One line naming the first mismatched keys of a weights file."""
    def few(keys):
        keys = list(keys)
        return f"{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {few(unexpected)}")
    if shapes:
        k, a, b = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches, e.g. {k}: file {list(a)} vs model {list(b)}")
    return FDLightError(f"weights file {path} does not fit {what}: {'; '.join(parts)} (pass weights saved for this "
                        f"architecture, or choose the matching config)")


def summarize_load_error(err: Exception, path, what: str) -> FDLightError:
    """Turn a long load_state_dict error (e.g. open_clip's strict load) into one line with the first keys."""
    text = str(err)
    found = {}
    for label, pat in (("missing", r"Missing key\(s\) in state_dict: ([^\n]*)"),
                       ("unexpected", r"Unexpected key\(s\) in state_dict: ([^\n]*)")):
        m = re.search(pat, text)
        found[label] = re.findall(r'"([^"]+)"', m.group(1)) if m else []
    shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                        r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", text)
    shapes = [(k, json.loads(a), json.loads(b)) for k, a, b in shapes]
    if not (found["missing"] or found["unexpected"] or shapes):
        return FDLightError(f"weights file {path} does not fit {what}: {text.splitlines()[0][:300]}")
    return mismatch_error(path, what, found["missing"], found["unexpected"], shapes)


def timm_filter_fn(model: torch.nn.Module) -> Callable:
    """The model family's own checkpoint converter (layout conversion, resizing), as timm's pretrained loader uses."""
    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", lambda sd, m: sd)


def classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    return tuple(h + "." for h in ((head,) if isinstance(head, str) else head))


def load_timm_state_dict(model: torch.nn.Module, sd: dict, path, what: str, allow_missing=(), allow_unexpected=()):
    """Convert `sd` with the model family's timm filter and load it; keys may be missing or left over only under the
    allowed prefixes, anything else is a one-line error naming the keys."""
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # OpenAI files hold fp16
    try:
        sd = timm_filter_fn(model)(sd, model)
    except Exception as e:  # noqa: BLE001 - a converter choking on foreign keys is a mismatch too
        raise FDLightError(f"weights file {path} does not fit {what}: its keys cannot be converted "
                           f"({type(e).__name__}: {e}); pass weights saved for this architecture") from e
    allowed_missing, allowed_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    sd = {k: v for k, v in sd.items() if not (allowed_unexpected and k.startswith(allowed_unexpected))}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not (allowed_missing and k.startswith(allowed_missing))
               and not k.endswith(("relative_position_index", "attn_mask"))]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise mismatch_error(path, what, missing, unexpected, shapes)
    return model.load_state_dict(sd, strict=False)


def network_available(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def go_offline() -> None:
    """Make the hub client fail fast (seconds, not a minute of retries) when there is no network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as c
        c.HF_HUB_OFFLINE = True
    except Exception:  # noqa: BLE001 - older clients read the variable at call time
        pass


def read_export_metadata(path: str | Path) -> dict:
    """The metadata of a safetensors file, with the timm kwargs decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    out = dict(meta)
    if "timm_kwargs" in out:
        out["timm_kwargs"] = json.loads(out["timm_kwargs"])
    return out
