"""stage=distill: build teacher(s), student and data from the config (or take modules of one's own: fdlight.api),
train, export `student.safetensors`, the `student/` folder in the hub layout timm reads (a timm student), and, with
several teachers, `adaptors.safetensors`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig

from fdlight.config import group_config, group_choices, several_teachers, teacher_configs, teacher_label
from fdlight.data.classification import ClassificationData
from fdlight.data.transforms import eval_transform, fd_train_transform
from fdlight.errors import check
from fdlight.models.adaptors import save_adaptors
from fdlight.models.layout import TokenLayout, check_grids, measured_layout
from fdlight.models.students import block_classes, build_student, check_drop_path, check_timm_name, student_kwargs
from fdlight.models.teachers import Teacher, looks_like_file
from fdlight.models.exports import export_hub, export_timm
from fdlight.models.weights import check_weights_file
from fdlight.models.whitening import check_hadamard_order
from fdlight.modules.distill import FeatureDistillation, check_align, target_specs
from fdlight.runs.gather import trained_state_dict
from fdlight.runs.template import Training, TrainingStage


def declared_layout(c: DictConfig, who: str) -> TokenLayout | None:
    """The token layout a teacher or student config declares, when it declares all of it."""
    fields = ("img_size", "patch_size", "prefix_tokens")
    if any(c.get(f) is None for f in fields):
        return None
    check(int(c.img_size) % int(c.patch_size) == 0,
          f"{who}.img_size={c.img_size} is not a multiple of its patch size {c.patch_size}; pick "
          f"{who}.img_size={int(c.img_size) // int(c.patch_size) * int(c.patch_size)} or "
          f"{(int(c.img_size) // int(c.patch_size) + 1) * int(c.patch_size)}")
    return TokenLayout(int(c.img_size), int(c.patch_size), int(c.prefix_tokens), int(c.get("dim") or 0))


def students_with_grid(grid: int) -> list[str]:
    """Shipped student configs whose declared token grid is `grid` (student=timm declares none)."""
    return [name for name in group_choices("student")
            if (lambda c: c.patch_size is not None and int(c.img_size) // int(c.patch_size) == grid)(
                group_config("student", name))]


class Distill(TrainingStage):
    """`student` / `teacher`: modules of one's own (fdlight.api.distill) in place of the config's; `command`: how
    the run was asked for, for the model card (the command line by default)."""
    name = "distill"
    weights_prefix = "student."
    monitored = "student"

    def __init__(self, student: nn.Module | None = None, teacher: Teacher | None = None, command: str | None = None):
        self.student, self.teacher, self.command = student, teacher, command

    def student_layout(self, cfg: DictConfig) -> TokenLayout | None:
        """The student's token layout before anything is built: declared (the FD students), measured on the meta
        device (`student=timm`: an unknown name or a model with no feature map fails here), or measured on one's own
        module."""
        if self.student is not None:
            return measured_layout(self.student, int(cfg.student.img_size))
        check_timm_name(cfg.student)
        declared = declared_layout(cfg.student, "student")
        if declared is not None or cfg.student.get("patch_size") is not None:
            return declared
        with torch.device("meta"):  # no memory, no init: the shapes are all that is read
            return measured_layout(build_student(cfg.student), int(cfg.student.img_size))

    def validate(self, cfg: DictConfig) -> None:
        """Drop-path rates, each teacher's weights file, loss weight, whitening and token grid, before anything is
        built (a hub download included); the grids are checked again on the built models."""
        check_drop_path(cfg.drop_path.student, "drop_path.student")
        check_drop_path(cfg.drop_path.teacher, "drop_path.teacher")
        align = cfg.distill.get("align")
        check_align(align)
        specs = target_specs(cfg)
        student = self.student_layout(cfg)
        for name, t in teacher_configs(cfg).items():
            who = f"teacher.{name}" if several_teachers(cfg) else "teacher"
            if looks_like_file(t.weights):  # a missing file (not an open_clip tag such as `openai`)
                check_weights_file(t.weights, f"{who}.weights")
            teacher = self.teacher.layout if self.teacher is not None else declared_layout(t, who)
            if student and teacher and align is None and not specs[name].resample_tokens \
                    and student.grid != teacher.grid:
                check_grids(student, teacher, matching=students_with_grid(teacher.grid), who=who)
            if specs[name].whitening == "phi_s" and t.get("dim"):
                check_hadamard_order(int(t.dim), who)
        phi_s = [n for n, s in specs.items() if s.whitening == "phi_s"]
        check(not phi_s or cfg.trainer.strategy != "fsdp",
              f"whitening=phi_s ({', '.join(phi_s)}) keeps fp64 statistics that FSDP would cast to the compute dtype; "
              f"use trainer=ddp, or whitening=fd_ln")

    def build(self, cfg: DictConfig) -> Training:
        data = distill_data(cfg)
        data.setup()  # a bad data root fails before any model is built
        teachers = {self.teacher.name: self.teacher} if self.teacher is not None else None
        module = FeatureDistillation.from_config(cfg, student=self.student, compile=bool(cfg.trainer.compile),
                                                 teachers=teachers)
        return Training(module, data, wrap_classes=block_classes(cfg.student, module.student),
                        validate=data.val_set is not None)

    def fit(self, trainer, built: Training, resume) -> dict:
        val = super().fit(trainer, built, resume)
        if built.validate:  # held-out images: their FD loss under the final weights
            if built.module.validated_step != trainer.global_step:
                trainer.validate(built.module, datamodule=built.data, verbose=False)
            val["val/loss"] = float(trainer.callback_metrics["val/loss"])
        if not built.module.single:  # every rank: gathering FSDP shards is collective
            state = trained_state_dict(trainer, built.module, "")
            built.extra["heads"] = {k: v for k, v in state.items() if not k.startswith("student.")}
        return val

    def describe(self, cfg: DictConfig, built: Training) -> dict:
        out = {"teacher": teacher_label(cfg), "student": cfg.student.name, "skipped_images": built.data.skipped_images}
        if not built.module.single:
            out["teachers"] = built.module.teacher_losses()
        return out

    def export(self, cfg: DictConfig, run_dir: Path, built: Training, state: dict) -> list[Path]:
        if self.student is not None:  # not a timm model: its weights and class, for the code that built it
            return [save_module(state, run_dir / "student.safetensors", self.student, teacher_label(cfg))]
        kwargs = student_kwargs(cfg.student)
        written = [export_timm(state, run_dir / "student.safetensors", cfg.student.model, kwargs,
                               teacher=teacher_label(cfg), stage="distill", img_size=int(cfg.student.img_size)),
                   export_hub(state, run_dir / "student", cfg.student.model, {**kwargs, "num_classes": 0},
                              int(cfg.student.img_size), model_card(cfg, built, run_dir, self.command))]
        if not built.module.single:
            written.append(export_adaptors(run_dir / "adaptors.safetensors", built.module, built.extra["heads"],
                                           cfg))
        return written

    def summary(self, metrics: dict) -> str:
        first, last = (f"{v:.4f}" if isinstance(v, float) else "n/a" for v in (metrics["first_loss"],
                                                                               metrics["last_loss"]))
        held_out = f", held-out loss {metrics['val/loss']:.4f}" if "val/loss" in metrics else ""
        return f"distilled {metrics['student']} <- {metrics['teacher']}: loss {first} -> {last} over " \
               f"{metrics['steps']} steps{held_out}"


def command_line() -> str:
    """The command that started this run, as its user typed it."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return " ".join(["python -m fdlight", *HydraConfig.get().overrides.task])
    return " ".join(["python", *sys.argv])


def model_card(cfg: DictConfig, built: Training, run_dir: Path, command: str | None) -> str:
    """The export's README.md: what the student is, what it was distilled from and on how much, how to load it."""
    module, trainer = built.module, built.module.trainer
    steps = int(trainer.global_step)
    seen = steps * int(cfg.distill.batch_size) * int(trainer.world_size) * int(trainer.accumulate_grad_batches)
    loss = " -> ".join("n/a" if v is None else f"{v:.4f}" for v in (module.first_loss, module.last_loss))
    size = int(cfg.student.img_size)
    return f"""---
library_name: timm
tags: [image-feature-extraction, timm, fdlight, feature-distillation]
---
# {cfg.student.model}, feature-distilled from {teacher_label(cfg)}

A `{cfg.student.model}` trained by feature distillation (Wei et al. 2022, arXiv 2205.14141) with fdlight: its
final feature map, through a 1x1 projector, regressed the teacher's whitened ({cfg.whitening.name}) token map.

| | |
|---|---|
| student | `{cfg.student.model}` (timm), input 3x{size}x{size}, ImageNet mean/std |
| teacher | {teacher_label(cfg)} |
| data | {cfg.data.name} |
| images seen | {seen} ({steps} steps of {int(cfg.distill.batch_size)} x {int(trainer.world_size)} devices) |
| loss (first -> last) | {loss} |
| grid alignment | {cfg.distill.get("align") or "none (equal grids)"} |

Command: `{command or command_line()}`

```python
import timm
model = timm.create_model("local-dir:{run_dir / 'student'}", pretrained=True)  # no fdlight import needed
features = model.forward_features(images)  # images normalised with the mean/std in config.json
```
"""


def save_module(state: dict, path: Path, module: nn.Module, teacher: str) -> Path:
    """The weights of a student of one's own, with its class named in the metadata."""
    from fdlight.artifacts import save_safetensors

    cls = type(module)
    save_safetensors(state, path, {"format": "fdlight", "module": f"{cls.__module__}.{cls.__qualname__}",
                                   "teacher": teacher, "stage": "distill"})
    return path


def export_adaptors(path: Path, module: FeatureDistillation, heads: dict, cfg: DictConfig) -> Path:
    """Each teacher's adaptor and frozen PHI-S transform (from the gathered module state), with what rebuilds them."""
    entries = {}
    for name in module.names:
        adaptor = {k.removeprefix(f"projectors.{name}."): v for k, v in heads.items()
                   if k.startswith(f"projectors.{name}.")}
        phi_s = {k.removeprefix(f"whiteners.{name}.phi_s."): v for k, v in heads.items()
                 if k.startswith(f"whiteners.{name}.phi_s.")}
        entries[name] = (module.head_spec(name), adaptor, phi_s)
    return save_adaptors(path, entries, student=cfg.student.name, student_model=cfg.student.model,
                         student_kwargs=json.dumps(student_kwargs(cfg.student)))


def distill_data(cfg: DictConfig) -> ClassificationData:
    """The distillation DataModule of a config: one augmented view at the student's resolution (and the data
    benchmark's subject)."""
    size = int(cfg.student.img_size)
    return ClassificationData(cfg.data, cfg.distill.batch_size, fd_train_transform(size, cfg.data.min_scale),
                              eval_transform(size), seed=cfg.seed)


STAGE = Distill()
run = STAGE.run


def build_distillation(cfg: DictConfig) -> FeatureDistillation:
    """The checked LightningModule of a config, as a run builds it (for benchmarks and notebooks)."""
    STAGE.validate(cfg)
    return FeatureDistillation.from_config(cfg, compile=bool(cfg.trainer.compile))
