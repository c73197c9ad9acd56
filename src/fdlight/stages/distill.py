"""stage=distill: build teacher(s), student and data from the config, train, export `student.safetensors` (and, with
several teachers, `adaptors.safetensors`)."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from fdlight.config import group_config, group_choices, several_teachers, teacher_configs, teacher_label
from fdlight.data.classification import ClassificationData
from fdlight.data.transforms import fd_train_transform
from fdlight.errors import check
from fdlight.models.adaptors import save_adaptors
from fdlight.models.layout import TokenLayout, check_grids
from fdlight.models.students import block_classes, check_drop_path, student_kwargs
from fdlight.models.teachers import looks_like_file
from fdlight.models.exports import export_timm
from fdlight.models.weights import check_weights_file
from fdlight.models.whitening import check_hadamard_order
from fdlight.modules.distill import FeatureDistillation, target_specs
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
    """Shipped student configs whose declared token grid is `grid`."""
    return [name for name in group_choices("student")
            if (lambda c: int(c.img_size) // int(c.patch_size))(group_config("student", name)) == grid]


class Distill(TrainingStage):
    name = "distill"
    weights_prefix = "student."
    monitored = "student"

    def validate(self, cfg: DictConfig) -> None:
        """Drop-path rates, each teacher's weights file, loss weight, whitening and token grid, before anything is
        built (a hub download included); the grids are checked again on the built models."""
        check_drop_path(cfg.drop_path.student, "drop_path.student")
        check_drop_path(cfg.drop_path.teacher, "drop_path.teacher")
        specs = target_specs(cfg)
        student = declared_layout(cfg.student, "student")
        for name, t in teacher_configs(cfg).items():
            who = f"teacher.{name}" if several_teachers(cfg) else "teacher"
            if looks_like_file(t.weights):  # a missing file (not an open_clip tag such as `openai`)
                check_weights_file(t.weights, f"{who}.weights")
            teacher = declared_layout(t, who)
            if student and teacher and not specs[name].resample_tokens and student.grid != teacher.grid:
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
        module = FeatureDistillation.from_config(cfg, compile=bool(cfg.trainer.compile))
        return Training(module, data, wrap_classes=block_classes(cfg.student), validate=False)

    def fit(self, trainer, built: Training, resume) -> dict:
        val = super().fit(trainer, built, resume)
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
        written = [export_timm(state, run_dir / "student.safetensors", cfg.student.model, student_kwargs(cfg.student),
                               teacher=teacher_label(cfg), stage="distill")]
        if not built.module.single:
            written.append(export_adaptors(run_dir / "adaptors.safetensors", built.module, built.extra["heads"],
                                           cfg))
        return written

    def summary(self, metrics: dict) -> str:
        first, last = (f"{v:.4f}" if isinstance(v, float) else "n/a" for v in (metrics["first_loss"],
                                                                               metrics["last_loss"]))
        return f"distilled {metrics['student']} <- {metrics['teacher']}: loss {first} -> {last} over " \
               f"{metrics['steps']} steps"


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
    return ClassificationData(cfg.data, cfg.distill.batch_size,
                              fd_train_transform(int(cfg.student.img_size), cfg.data.min_scale), seed=cfg.seed)


STAGE = Distill()
run = STAGE.run


def build_distillation(cfg: DictConfig) -> FeatureDistillation:
    """The checked LightningModule of a config, as a run builds it (for benchmarks and notebooks)."""
    STAGE.validate(cfg)
    return FeatureDistillation.from_config(cfg, compile=bool(cfg.trainer.compile))
