"""Build a downstream model from an earlier stage's weights file (docs/method.md §2.1-2.2).

A file written by fdlight (`student.safetensors`, `model.safetensors`) carries its timm name and kwargs in its
metadata. A checkpoint of the official release (distilled or fine-tuned, recognised by its keys: models/official.py)
gets the architecture of the student config whose shapes it has. Any other file (a teacher's own weights: the
paper's baseline) needs the architecture named by a teacher config. For the FD ViT student (timm Beit), the shared
relative position bias is copied into every block, the distilled final norm is dropped, and patch tokens are
mean-pooled into a fresh `fc_norm`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from fdlight.errors import FDLightError, check
from fdlight.models import official
from fdlight.models.factory import create_model, takes_img_size
from fdlight.models.weights import (ADAPTERS, classifier_prefixes, is_torchscript, load_timm_state_dict,
                                    read_export_metadata, read_state_dict)

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


@dataclass
class Architecture:
    timm_model: str
    kwargs: dict = field(default_factory=dict)
    adapter: str | None = None
    layout: str | None = None  # how a file without fdlight metadata was read: an official layout, a teacher's
    img_size: int | None = None  # the input side it was trained at, for a model whose kwargs do not say (a CNN)


def architecture_of(path: str | Path, teacher_cfg: DictConfig | None = None,
                    student_cfg: DictConfig | None = None) -> Architecture:
    """From the file's fdlight metadata, else from its official layout (matched against `student_cfg`, then the
    shipped student configs), else from a teacher config (`teacher=<name>`)."""
    path = Path(str(path))
    check(path.is_file(), f"pretrained file not found: {path}; pass the student.safetensors or model.safetensors "
                          f"of an earlier run, or a teacher's weights file with teacher=<its config>")
    if path.suffix == ".safetensors":
        meta = read_export_metadata(path)
        if "timm_model" in meta:
            size = int(meta["img_size"]) if meta.get("img_size") else None
            return Architecture(meta["timm_model"], dict(meta["timm_kwargs"]), img_size=size)
    raw = {} if is_torchscript(path) else read_state_dict(path, mmap=True)  # OpenAI's CLIP files are never official
    converted = official.convert(raw, path)
    if converted is not None:
        return official_architecture(converted, path, student_cfg)
    if teacher_cfg is None or teacher_cfg.builder != "timm" or "???" in str(teacher_cfg.get("model", "???")):
        raise official.unknown_layout(path, official.tensors_of(raw), "; a teacher's own weights, named with "
                                                                      "teacher=<config>")
    kwargs = (OmegaConf.to_container(teacher_cfg.kwargs, resolve=True) if teacher_cfg.kwargs else {})
    return Architecture(teacher_cfg.model.split(".")[0], kwargs, teacher_cfg.get("adapter"),
                        f"teacher={teacher_cfg.name}'s own weights")


def official_architecture(converted: official.Converted, path: Path,
                          student_cfg: DictConfig | None = None) -> Architecture:
    """The timm model of an official checkpoint: the student config with its shapes, in the file's form."""
    candidates = [("student", student_cfg)] if student_cfg is not None else []
    match = official.match_or_fail(converted, path, [*candidates, *official.shipped_students()],
                                   f"convert it with `python -m fdlight.convert {path} OUT.safetensors --student "
                                   f"<config or student .yaml>` and pass OUT.safetensors")
    return Architecture(match.timm_model, match.kwargs, "official", converted.layout.name)


def is_shared_bias_beit(arch: Architecture) -> bool:
    return arch.timm_model.startswith("beit") and bool(arch.kwargs.get("use_shared_rel_pos_bias"))


def downstream_kwargs(arch: Architecture, num_classes: int, drop_path: float, pool: str = "avg", **overrides) -> dict:
    """Kwargs of the fine-tuning model: per-block bias instead of the shared one, mean pooling + fc_norm for ViTs."""
    kw = dict(arch.kwargs)
    if is_shared_bias_beit(arch):
        kw.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    is_vit = "swin" not in arch.timm_model
    if is_vit and pool:
        kw["global_pool"] = pool
    if arch.timm_model.startswith("beit"):
        kw.setdefault("head_init_scale", 0.001)  # official head init: trunc normal 0.02, then x 0.001
    kw.update(num_classes=num_classes, drop_path_rate=drop_path, **overrides)
    if "img_size" in overrides and not takes_img_size(arch.timm_model.split(".")[0]):
        kw.pop("img_size")  # a CNN takes any input size: the stage's transforms set it (input_size_of)
    return kw


def input_size_of(model: nn.Module, side: int | None) -> nn.Module:
    """Record in the model's pretrained_cfg the input side a model without a fixed one (a CNN) is used at (a stage's
    own size, else the one its weights were trained at); a fixed-size model keeps its own."""
    if side and not hasattr(model, "patch_embed"):
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, int(side), int(side))}
    return model


def remap_shared_bias(sd: dict, depth: int) -> dict:
    """Copy the shared relative position bias table into each block (they train independently from then on)."""
    if SHARED_TABLE not in sd:
        return sd
    sd = dict(sd)
    table = sd.pop(SHARED_TABLE)
    for i in range(depth):
        sd[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}


def build_from_pretrained(path: str | Path | None, num_classes: int, drop_path: float = 0.0,
                          teacher_cfg: DictConfig | None = None, arch: Architecture | None = None,
                          pool: str = "avg", student_cfg: DictConfig | None = None,
                          **overrides) -> tuple[nn.Module, Architecture]:
    """A timm model for a downstream task, initialised from `path` (None: random init of `arch`). `student_cfg` is
    tried first when an official checkpoint's shapes are matched to a student config."""
    arch = arch or architecture_of(path, teacher_cfg, student_cfg)
    model = create_model(arch.timm_model, pretrained=False,
                         **downstream_kwargs(arch, num_classes, drop_path, pool, **overrides))
    input_size_of(model, overrides.get("img_size") or arch.img_size)
    if path is None:
        return model, arch
    sd = ADAPTERS[arch.adapter](read_state_dict(path))
    found = dict.fromkeys(sd)  # the file's own keys, before the remap
    sd = remap_shared_bias(sd, len(getattr(model, "blocks", [])))
    fresh = classifier_prefixes(model)
    if isinstance(getattr(model, "norm", None), nn.Identity):
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}  # the distilled final norm is discarded
    if getattr(model, "fc_norm", None) is not None and not isinstance(model.fc_norm, nn.Identity):
        fresh += ("fc_norm.",)
    try:
        load_timm_state_dict(model, sd, path, f"{arch.timm_model}", allow_missing=fresh, allow_unexpected=fresh)
    except FDLightError as e:
        if not (arch.layout or "").startswith("teacher="):
            raise
        # the teacher was only the last guess: say which layouts the file is not
        raise official.unknown_layout(path, found, f"; {arch.layout}: {e}") from e
    return model, arch


@torch.no_grad()
def bias_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}
