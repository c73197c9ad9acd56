"""What fdlight writes as model files and reads back: timm-loadable exports (a timm name and kwargs in the safetensors
metadata; a folder in the Hugging Face hub layout that timm writes itself) and whole task models (backbone + neck +
head, with what rebuilds them)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from fdlight.artifacts import atomic_folder, save_safetensors
from fdlight.errors import check
from fdlight.models.factory import SkipRandomInit, create_model
from fdlight.models.pretrained import Architecture
from fdlight.models.pyramid import Backbone
from fdlight.models.students import distilled_cfg
from fdlight.models.upernet import UPerNet
from fdlight.models.weights import read_export_metadata, read_state_dict


def export_timm(model: torch.nn.Module | dict, path: str | Path, timm_name: str, timm_kwargs: dict, **extra) -> Path:
    """Save a timm model's weights (a module or its full state dict) so `timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=path), **kwargs)` rebuilds it; name and kwargs travel in the metadata."""
    meta = {"timm_model": timm_name, "timm_kwargs": json.dumps(timm_kwargs), "format": "fdlight"}
    meta.update({k: str(v) for k, v in extra.items()})
    save_safetensors(model if isinstance(model, dict) else model.state_dict(), path, meta)
    return Path(path)


def export_hub(state: dict, folder: str | Path, timm_name: str, timm_kwargs: dict, img_size: int, card: str) -> Path:
    """A folder in the Hugging Face hub layout, written by timm's own `save_for_hf` (config.json with the
    architecture, its model args and a pretrained_cfg carrying the input size and ImageNet's statistics the student
    was distilled with; model.safetensors) plus `card` as README.md: `timm.create_model("local-dir:<folder>",
    pretrained=True)` loads it with no fdlight import, and `push_to_hf_hub` uploads the same files."""
    from timm.models import save_for_hf

    with SkipRandomInit():  # every drawn weight is replaced by the state below
        model = create_model(timm_name, pretrained=False, **timm_kwargs)
    model.load_state_dict(state)
    distilled_cfg(model, img_size)
    with atomic_folder(folder) as tmp:
        save_for_hf(model, str(tmp), safe_serialization=True)
        (tmp / "README.md").write_text(card)
    return Path(folder)


def load_student(path: str | Path) -> nn.Module:
    """A distilled student in eval mode, from its run directory, its `student/` folder (read by timm itself) or its
    `student.safetensors` (timm name and kwargs in the metadata)."""
    import timm

    path = Path(path)
    if (path / "student" / "config.json").is_file():
        path = path / "student"
    if (path / "config.json").is_file():
        return timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    check(path.suffix == ".safetensors" and path.is_file(), f"{path} is neither a distill run directory, its student/ "
                                                            f"folder nor a student.safetensors")
    meta = read_export_metadata(path)
    check("timm_model" in meta, f"{path} names no timm model in its metadata (a module of one's own?); load it into "
                                f"the module that wrote it")
    model = create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(read_state_dict(path))
    return model.eval()


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C) image embeddings: timm's own pooling of the final map (the model's global_pool: average for a CNN,
    the CLS token or the mean of the tokens for a ViT), before any classifier."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def save_task_model(state: dict, path: Path, task: str, arch: Architecture, timm_kwargs: dict, head: dict,
                    **extra) -> None:
    """The whole model's weights (backbone + neck + head), with what rebuilds it in the metadata."""
    meta = {"format": "fdlight", "task": task, "backbone_model": arch.timm_model,
            "backbone_kwargs": json.dumps(timm_kwargs), "head": json.dumps(head)}
    meta.update({k: str(v) for k, v in extra.items()})
    save_safetensors(state, path, meta)


def rebuild_backbone(meta: dict) -> nn.Module:
    """The timm backbone a task model's metadata describes (random weights; its state dict follows)."""
    return create_model(meta["backbone_model"], pretrained=False, **json.loads(meta["backbone_kwargs"]))


def load_segmenter(path: str | Path) -> UPerNet:
    """Rebuild a segmentation model from the `model.safetensors` this stage writes (eval mode)."""
    meta = read_export_metadata(path)
    check(meta.get("task") == "segment", f"{path} is not a segmentation model written by stage=segment")
    head = json.loads(meta["head"])
    model = UPerNet(Backbone(rebuild_backbone(meta), head.pop("indices")), **head)
    model.load_state_dict(read_state_dict(path))
    return model.eval()
