"""stage=distill: build teacher, student and data from the config, train, export `student.safetensors`."""
from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from fdlight.data.classification import ClassificationData
from fdlight.data.transforms import fd_train_transform
from fdlight.models.attention import set_attention
from fdlight.models.drop_path import set_drop_path_mode
from fdlight.models.layout import TokenLayout, check_grids
from fdlight.models.students import block_classes, build_student, check_drop_path, student_kwargs, student_layout
from fdlight.models.teachers import build_teacher, looks_like_file
from fdlight.models.weights import check_weights_file, export_timm
from fdlight.modules.distill import FeatureDistillation
from fdlight.stages.common import (Throughput, build_trainer, check_run_dir, cpu_threads, save_config,
                                   trained_state_dict, write_metrics)

log = logging.getLogger(__name__)


def declared_layout(c: DictConfig) -> TokenLayout | None:
    """The token layout a teacher or student config declares, when it declares all of it."""
    fields = ("img_size", "patch_size", "prefix_tokens")
    if any(c.get(f) is None for f in fields):
        return None
    return TokenLayout(int(c.img_size), int(c.patch_size), int(c.prefix_tokens), int(c.get("dim") or 0))


def students_with_grid(grid: int) -> list[str]:
    """Shipped student configs whose declared token grid is `grid`."""
    folder = resources.files("fdlight.conf").joinpath("student")
    names = []
    for f in sorted(folder.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            c = OmegaConf.load(str(f))
            if int(c.img_size) // int(c.patch_size) == grid:
                names.append(f.name[:-5])
    return names


def build_distillation(cfg: DictConfig) -> FeatureDistillation:
    """The LightningModule of a config: checks drop-path rates and token grids before anything trains."""
    dp_student = check_drop_path(cfg.drop_path.student, "drop_path.student")
    dp_teacher = check_drop_path(cfg.drop_path.teacher, "drop_path.teacher")
    if looks_like_file(cfg.teacher.weights):  # a missing file first (not an open_clip tag such as `openai`)
        check_weights_file(cfg.teacher.weights, "teacher.weights")
    declared = [declared_layout(cfg.student), declared_layout(cfg.teacher)]
    if all(declared):  # before building anything (a hub download included); rechecked on the built models
        check_grids(*declared, matching=students_with_grid(declared[1].grid))
    teacher = build_teacher(cfg.teacher, drop_path=dp_teacher, seed=cfg.seed)
    student = build_student(cfg.student, drop_path=dp_student)
    set_drop_path_mode(student, cfg.drop_path.mode)
    set_attention(student, cfg.trainer.attention)
    d = cfg.distill
    module = FeatureDistillation(
        student, student_layout(cfg.student, student), teacher,
        optim=dict(batch_size=d.batch_size, base_lr=d.base_lr, warmup_lr=d.warmup_lr, min_lr=d.min_lr,
                   warmup_epochs=d.warmup_epochs, epochs=d.epochs, weight_decay=d.weight_decay,
                   betas=list(d.betas), clip_grad=d.clip_grad),
        whitening=cfg.whitening.name, whitening_eps=cfg.whitening.eps, loss_beta=d.loss_beta,
        include_prefix_tokens=d.include_prefix_tokens, teacher_resize=d.teacher_resize,
        no_decay_keywords=cfg.student.no_decay_keywords, teacher_drop_path=dp_teacher > 0)
    if cfg.trainer.compile:
        module.distill_loss = torch.compile(module._distill_loss)
    return module


def run(cfg: DictConfig, run_dir: Path) -> dict:
    with cpu_threads(cfg, cfg.distill):
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    resume = check_run_dir(cfg, run_dir)
    data = ClassificationData(cfg.data, cfg.distill.batch_size,
                              fd_train_transform(int(cfg.student.img_size), cfg.data.min_scale), seed=cfg.seed)
    data.setup()  # a bad data root fails before any model is built
    module = build_distillation(cfg)
    meter = Throughput()
    trainer = build_trainer(cfg, cfg.distill, run_dir, callbacks=[meter], wrap_classes=block_classes(cfg.student),
                            checkpoint_every=cfg.distill.checkpoint_every_n_steps)
    save_config(cfg, run_dir)  # only once every check has passed, so a failed start leaves no "run" behind
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    wall = time.perf_counter() - start
    metrics = {"stage": "distill", "teacher": cfg.teacher.name, "student": cfg.student.name,
               "first_loss": module.first_loss, "last_loss": module.last_loss, "steps": trainer.global_step,
               "img_per_s": meter.img_per_s, "wall_s": wall, "skipped_images": data.skipped_images}
    student_state = trained_state_dict(trainer, module, "student.")  # collective under FSDP: every rank
    if trainer.is_global_zero:
        export_timm(student_state, run_dir / "student.safetensors", cfg.student.model, student_kwargs(cfg.student),
                    teacher=cfg.teacher.name, stage="distill")
        write_metrics(run_dir, metrics)
        log.info("distilled %s <- %s: loss %.4f -> %.4f over %d steps; student at %s", cfg.student.name,
                 cfg.teacher.name, metrics["first_loss"], metrics["last_loss"], metrics["steps"],
                 run_dir / "student.safetensors")
    return metrics
