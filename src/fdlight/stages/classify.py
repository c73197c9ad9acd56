"""What the classification stages (finetune, linear) share: the checked train/val data and the template's fit that
ends on validated final weights."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from fdlight.data.classification import ClassificationData, check_root
from fdlight.errors import FDLightError, check
from fdlight.models.weights import check_readable_weights, check_weights_file
from fdlight.runs.template import Training, TrainingStage, percent


def classification_data(cfg: DictConfig, batch_size: int) -> ClassificationData:
    """Train and val sets, checked before anything is built: data.root set and existing, val/ with class folders,
    and data.num_classes (when given) equal to the folders' count. Transforms are attached once the model is known."""
    d = cfg.data
    data = ClassificationData(d, batch_size, None, None, with_val=True, seed=cfg.seed, stage=cfg.stage)
    data.setup()
    found = len(data.train_set.classes)
    declared = d.get("num_classes")
    if declared not in (None, found):  # a folder's count (the embedded data makes the classes it declares)
        raise FDLightError(f"data.num_classes={declared} but {d.root}/train has {found} class folders; set "
                           f"data.num_classes=null to take the count from the folders")
    return data


def optim_dict(stage_cfg: DictConfig) -> dict:
    return OmegaConf.to_container(stage_cfg, resolve=True)


class ClassificationStage(TrainingStage):
    """A stage that trains a classifier on ImageFolder-style data and reports val/top1, val/top5."""

    def validate(self, cfg: DictConfig) -> None:
        """The data folders' layout (when given), then the weights file's container."""
        if cfg.data.name != "synthetic":
            check_root(cfg.data, with_val=True)
        path = cfg[self.name].get("pretrained")
        if path:
            path = check_weights_file(Path(str(path)).expanduser(), "pretrained")  # the message users know
            check_readable_weights(path, f"{self.name}.pretrained")

    def fit(self, trainer: L.Trainer, built: Training, resume: Path | None) -> dict:
        """Train, then make sure the reported metrics belong to the final weights (max_steps can stop mid-epoch)."""
        trainer.fit(built.module, datamodule=built.data, ckpt_path=str(resume) if resume else None)
        if built.module.validated_step != trainer.global_step:
            trainer.validate(built.module, datamodule=built.data, verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ema/"))}

    def summary(self, metrics: dict) -> str:
        speed = metrics["img_per_s"]
        return f"{self.name}: top-1 {percent(metrics.get('val/top1'))} after {metrics['steps']} steps, " \
               f"{'n/a' if speed is None or math.isnan(speed) else f'{speed:.0f}'} img/s"
