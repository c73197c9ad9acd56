"""stage=distill: build teacher, student and data from the config, train, export `student.safetensors`."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fdlight.config import group_config, group_choices
from fdlight.data.classification import ClassificationData
from fdlight.data.transforms import fd_train_transform
from fdlight.errors import check
from fdlight.models.layout import TokenLayout, check_grids
from fdlight.models.students import block_classes, check_drop_path, student_kwargs
from fdlight.models.teachers import looks_like_file
from fdlight.models.exports import export_timm
from fdlight.models.weights import check_weights_file
from fdlight.modules.distill import FeatureDistillation
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

    def validate(self, cfg: DictConfig) -> None:
        """Drop-path rates, the teacher's weights file and the token grids, before anything is built (a hub download
        included); the grids are checked again on the built models."""
        check_drop_path(cfg.drop_path.student, "drop_path.student")
        check_drop_path(cfg.drop_path.teacher, "drop_path.teacher")
        if looks_like_file(cfg.teacher.weights):  # a missing file (not an open_clip tag such as `openai`)
            check_weights_file(cfg.teacher.weights, "teacher.weights")
        declared = [declared_layout(cfg.student, "student"), declared_layout(cfg.teacher, "teacher")]
        if all(declared) and declared[0].grid != declared[1].grid:  # the suggestions compose every student config
            check_grids(*declared, matching=students_with_grid(declared[1].grid))

    def build(self, cfg: DictConfig) -> Training:
        data = distill_data(cfg)
        data.setup()  # a bad data root fails before any model is built
        module = FeatureDistillation.from_config(cfg, compile=bool(cfg.trainer.compile))
        return Training(module, data, wrap_classes=block_classes(cfg.student), validate=False)

    def describe(self, cfg: DictConfig, built: Training) -> dict:
        return {"teacher": cfg.teacher.name, "student": cfg.student.name,
                "skipped_images": built.data.skipped_images}

    def export(self, cfg: DictConfig, run_dir: Path, built: Training, state: dict) -> list[Path]:
        return [export_timm(state, run_dir / "student.safetensors", cfg.student.model, student_kwargs(cfg.student),
                            teacher=cfg.teacher.name, stage="distill")]

    def summary(self, metrics: dict) -> str:
        first, last = (f"{v:.4f}" if isinstance(v, float) else "n/a" for v in (metrics["first_loss"],
                                                                               metrics["last_loss"]))
        return f"distilled {metrics['student']} <- {metrics['teacher']}: loss {first} -> {last} over " \
               f"{metrics['steps']} steps"


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
