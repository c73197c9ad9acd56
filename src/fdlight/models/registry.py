"""The FD students under timm names. After `import fdlight.models.registry`, `timm.create_model(
"fd_vit_base_patch16_224")` builds what `student=vit_b16` distils: timm's Beit with one shared relative position
bias, no absolute position embedding, layer scale 0.1, and the official FD init. Each name is built by
`build_student` from its shipped student config, so that config stays the one description of the student.

There are no published FD weights: load a distilled student with `checkpoint_path=<run>/student.safetensors`.
"""
from __future__ import annotations

import torch.nn as nn
from omegaconf import DictConfig
from timm.models import register_model

from fdlight.config import group_config
from fdlight.errors import check
from fdlight.models.students import build_student

STUDENTS = {  # timm name -> conf/student/<config>.yaml
    "fd_vit_base_patch16_224": "vit_b16",
    "fd_vit_large_patch14_224": "vit_l14",
    "fd_vit_tiny_patch8_32": "tiny",
}
TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # what timm.create_model hands every builder


def student_config(name: str) -> DictConfig:
    """A shipped student config (conf/student/<name>.yaml) as Hydra composes it."""
    return group_config("student", name)


def build_registered(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """A registered FD student; keyword arguments override its config's timm kwargs, drop_path_rate its drop path."""
    check(not pretrained, f"{name} has no published weights; build it with pretrained=False, or load a distilled "
                          f"student with timm.create_model({name!r}, checkpoint_path=<run>/student.safetensors)")
    for key in TIMM_ONLY:
        kwargs.pop(key, None)
    drop_path = kwargs.pop("drop_path_rate", 0.0)
    return build_student(student_config(STUDENTS[name]), drop_path=drop_path, **kwargs)


@register_model
def fd_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """The FD ViT-B/16 student (conf/student/vit_b16.yaml)."""
    return build_registered("fd_vit_base_patch16_224", pretrained, **kwargs)


@register_model
def fd_vit_large_patch14_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """The FD ViT-L/14 student (conf/student/vit_l14.yaml)."""
    return build_registered("fd_vit_large_patch14_224", pretrained, **kwargs)


@register_model
def fd_vit_tiny_patch8_32(pretrained: bool = False, **kwargs) -> nn.Module:
    """The tiny FD ViT student of the tests and the demo (conf/student/tiny.yaml): 32 px, patch 8, 2 blocks of 64."""
    return build_registered("fd_vit_tiny_patch8_32", pretrained, **kwargs)
