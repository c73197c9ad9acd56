"""The Python API: distil into a model of one's own (or from a teacher of one's own) through the command line's run
template: the same validation, run directory and artifacts.

    import fdlight
    run_dir = fdlight.distill(student=my_backbone, overrides=["student.img_size=224", "teacher=clip_vitb",
                                                              "data=imagenet", "data.root=/data/imagenet"])

A module needs `forward_features(x)` returning a (B, C, H, W) map or (B, N, C) tokens (tokens may start with
`num_prefix_tokens` prefix tokens, as timm's ViTs say). Its input is ImageNet-normalised at `student.img_size`; a
teacher module takes `teacher.img_size` images normalised with `teacher.mean` / `teacher.std` (ImageNet's unless
set). A teacher module is frozen in place (eval mode, no gradients).
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch.nn as nn
from omegaconf import OmegaConf

from fdlight.config import compose, plain, several_teachers
from fdlight.constants import IMAGENET_MEAN, IMAGENET_STD
from fdlight.errors import FDLightError, check
from fdlight.models.layout import measured_layout, timm_tokens
from fdlight.models.teachers import Teacher
from fdlight.stages.distill import Distill


def check_module(module, who: str) -> None:
    check(isinstance(module, nn.Module), f"{who}= takes a torch.nn.Module, not {type(module).__name__}; pass the "
                                         f"model object itself")
    check(callable(getattr(module, "forward_features", None)),
          f"{who} module {type(module).__name__} has no forward_features(x); give it one that returns a "
          f"(B, C, H, W) feature map or (B, N, C) tokens (timm models have it)")


def module_student(cfg, module: nn.Module) -> dict:
    """The student section that describes a module of one's own: its layout is measured, not declared, and (as for
    student=timm) distill.align defaults to resizing the teacher's map to its grid."""
    return dict(name=type(module).__name__, model=None, img_size=int(cfg.student.img_size), patch_size=None,
                prefix_tokens=None, init="own", no_decay_keywords=["pos_embed", "cls_token", "reg_token"],
                align="teacher_to_student", block_class=None, kwargs={})


def module_teacher(cfg, module: nn.Module) -> Teacher:
    """A teacher module behind fdlight's Teacher interface, at teacher.img_size with teacher.mean / teacher.std."""
    t = cfg.teacher
    name = type(module).__name__
    layout = measured_layout(module, int(t.img_size), "teacher")
    mean, std = list(t.mean or IMAGENET_MEAN), list(t.std or IMAGENET_STD)
    cfg.teacher = {**OmegaConf.to_container(t), "name": name, "builder": "module", "model": None, "weights": None,
                   "kwargs": None, "mean": mean, "std": std, "patch_size": layout.patch_size,
                   "prefix_tokens": layout.prefix_tokens, "dim": layout.dim}
    return Teacher(module, timm_tokens, layout, mean, std, name)


def distill(student: nn.Module | None = None, teacher: nn.Module | None = None, overrides=(),
            run_dir: str | Path | None = None) -> Path:
    """Run stage=distill with `overrides` (the command line's key=value settings), distilling into `student` (a
    module of one's own; None: the config's student) from `teacher` (None: the config's). Returns the run
    directory (default runs/distill/<time>, as the command line). Bad input raises FDLightError (one line) and
    leaves no run directory."""
    if student is not None:
        check_module(student, "student")
    if teacher is not None:
        check_module(teacher, "teacher")
    cfg = OmegaConf.create(OmegaConf.to_container(compose(["stage=distill", *overrides])))  # interpolations kept
    check(teacher is None or not several_teachers(cfg), "teacher= takes one module; a list of teachers runs from "
                                                        "the configs (teacher=[a,b])")
    if student is not None:
        cfg.student = module_student(cfg, student)
    cfg = plain(cfg)  # distill.align's default now reads the student above
    wrapped = module_teacher(cfg, teacher) if teacher is not None else None
    run_dir = Path(run_dir) if run_dir is not None else \
        Path("runs/distill") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    existed = run_dir.exists()
    command = f"fdlight.distill(student={type(student).__name__ if student is not None else None}, " \
              f"teacher={type(teacher).__name__ if teacher is not None else None}, overrides={list(overrides)!r})"
    try:
        Distill(student, wrapped, command).run(cfg, run_dir)
    except FDLightError:
        if not existed and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a start that failed leaves no run directory
        raise
    return run_dir
