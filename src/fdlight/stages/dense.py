"""What the dense stages (segment, detect) share: the backbone (pretrained or a random student) at the task's input
size, the optimizer settings, the template's fit that ends on validated final weights, and the task-model export."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from fdlight.errors import check
from fdlight.models.exports import save_task_model
from fdlight.models.pretrained import Architecture, build_from_pretrained, downstream_kwargs
from fdlight.models.students import check_drop_path, student_kwargs
from fdlight.models.weights import check_readable_weights, check_weights_file, read_export_metadata
from fdlight.runs.template import Training, TrainingStage

OPTIM_KEYS = ("lr", "warmup_lr", "min_lr", "warmup_steps", "schedule", "power", "layer_decay", "weight_decay",
              "betas", "no_decay_keywords", "clip_grad")


def backbone_model(cfg: DictConfig, s: DictConfig, img_size: int, key: str) -> tuple[nn.Module, Architecture, dict]:
    """The timm backbone at img_size: from `<key>.pretrained`, else a random `cfg.student`. Returns the model, its
    architecture and the timm kwargs that rebuild it."""
    drop_path = check_drop_path(s.drop_path, f"{key}.drop_path")
    path = s.get("pretrained")
    if path:
        model, arch = build_from_pretrained(Path(str(path)).expanduser(), num_classes=0, drop_path=drop_path,
                                            teacher_cfg=cfg.get("teacher"), student_cfg=cfg.get("student"),
                                            img_size=img_size)
    else:
        arch = Architecture(cfg.student.model, student_kwargs(cfg.student))
        model, arch = build_from_pretrained(None, num_classes=0, drop_path=drop_path, arch=arch, img_size=img_size)
    return model, arch, downstream_kwargs(arch, 0, drop_path, "avg", img_size=img_size)


def optim_config(s: DictConfig) -> dict:
    return {k: (list(s[k]) if OmegaConf.is_list(s[k]) else s[k]) for k in OPTIM_KEYS}


class DenseStage(TrainingStage):
    """A stage that trains a task model (backbone + neck + head) and exports it whole as `model.safetensors`."""

    def validate(self, cfg: DictConfig) -> None:
        s = cfg[self.name]
        check_drop_path(s.drop_path, f"{self.name}.drop_path")
        path = s.get("pretrained")
        if path:
            path = check_weights_file(Path(str(path)).expanduser(), "pretrained")  # the message users know
            check_readable_weights(path, f"{self.name}.pretrained")
            if path.suffix == ".safetensors":
                task = read_export_metadata(path).get("task")
                check(task is None, f"{self.name}.pretrained={path} is a whole {task} model, not a backbone; pass "
                                    f"the student.safetensors of a distill run or a teacher's weights file")

    def fit(self, trainer: L.Trainer, built: Training, resume: Path | None) -> dict:
        """Train, then validate once more unless the last step was just validated."""
        module = built.module
        trainer.fit(module, datamodule=built.data, ckpt_path=str(resume) if resume else None)
        if module.val_step != trainer.global_step or not module.val_results:
            trainer.validate(module, datamodule=built.data, verbose=False)
        return dict(module.val_results)

    def describe(self, cfg: DictConfig, built: Training) -> dict:
        s = cfg[self.name]
        return {"backbone": built.extra["arch"].timm_model, "pretrained": str(s.pretrained or "") or None,
                "num_classes": built.data.num_classes}

    def save(self, cfg: DictConfig, run_dir: Path, built: Training, state: dict, **extra) -> Path:
        e, path = built.extra, run_dir / "model.safetensors"
        save_task_model(state, path, self.name, e["arch"], e["kwargs"], e["head"], data=cfg.data.name,
                        pretrained=cfg[self.name].pretrained or "", **extra)
        return path
