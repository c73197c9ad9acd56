"""stage=segment: UPerNet semantic segmentation on a pretrained backbone; writes `model.safetensors`, `metrics.json`
(`val/mIoU`) and `predictions.png`.

With `segment.pretrained=PATH` the backbone comes from an earlier run's `student.safetensors` (its shared relative
position bias copied into each block and resized to the crop) or a teacher's weights (`teacher=<config>`); without it,
from a randomly initialised `cfg.student` (the tiny student by default: the embedded run measures the pipeline, not
pretraining).
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from fdlight.config import with_stage
from fdlight.data.dense import SegmentationData
from fdlight.diagnostics.predictions import plot_segmentation
from fdlight.errors import check
from fdlight.models.attention import set_attention
from fdlight.models.pyramid import Backbone
from fdlight.models.upernet import UPerNet
from fdlight.modules.segment import SemanticSegmentation
from fdlight.runs.template import Training, percent
from fdlight.runs.trainer import on_gpu, world_size
from fdlight.stages.dense import DenseStage, backbone_model, optim_config


def build_segmentation(cfg: DictConfig, s: DictConfig, num_classes: int):
    """The LightningModule, the backbone architecture, its timm kwargs and the head config (for model.safetensors)."""
    model, arch, kwargs = backbone_model(cfg, s, int(s.crop_size), "segment")
    set_attention(model, cfg.trainer.attention)
    indices = list(s.indices) if s.get("indices") is not None else None
    backbone = Backbone(model, indices)
    head = dict(indices=indices, num_classes=int(num_classes), channels=int(s.channels),
                aux_channels=int(s.aux_channels), norm=str(s.norm), dropout=float(s.dropout))
    seg = UPerNet(backbone, num_classes=head["num_classes"], channels=head["channels"],
                  aux_channels=head["aux_channels"], norm=head["norm"], dropout=head["dropout"])
    module = SemanticSegmentation(seg, optim_config(s), s.eval_mode, s.get("eval_stride"), s.aux_weight,
                                  s.get("eval_chunk", 8), compile_model=bool(cfg.trainer.compile))
    return module, arch, kwargs, head


class Segment(DenseStage):
    name = "segment"

    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        s = cfg.segment
        check(s.norm in ("bn", "gn"), f"segment.norm={s.norm!r} is unknown; use bn or gn")
        check(s.eval_mode in ("slide", "whole"), f"segment.eval_mode={s.eval_mode!r} is unknown; use slide or whole")
        check(s.norm != "bn" or s.batch_size * (world_size(cfg.trainer) if self.sync_bn(cfg) else 1) > 1,
              f"segment.batch_size={s.batch_size} per BatchNorm leaves it one value per channel on the 1x1 "
              f"pyramid-pooling map; use segment.batch_size>=2 or segment.norm=gn")

    @staticmethod
    def sync_bn(cfg: DictConfig) -> bool:
        """The recipe's SyncBN (statistics over the whole batch) on several GPUs; PyTorch has it for CUDA only, so
        processes on CPUs keep their own statistics."""
        return cfg.segment.norm == "bn" and world_size(cfg.trainer) > 1 and on_gpu(cfg.trainer)

    def build(self, cfg: DictConfig) -> Training:
        s = cfg.segment
        data = SegmentationData(cfg.data, s.batch_size, s.crop_size, s.ratio_range, s.cat_max_ratio, s.photometric,
                                s.eval_batch_size, seed=cfg.seed)
        data.setup()
        module, arch, kwargs, head = build_segmentation(cfg, s, data.num_classes)
        if self.sync_bn(cfg):
            module.model = nn.SyncBatchNorm.convert_sync_batchnorm(module.model)
        return Training(module, data, extra=dict(arch=arch, kwargs=kwargs, head=head))

    def describe(self, cfg: DictConfig, built: Training) -> dict:
        s = cfg.segment
        return {**super().describe(cfg, built), "eval_mode": s.eval_mode, "crop_size": int(s.crop_size)}

    def export(self, cfg: DictConfig, run_dir: Path, built: Training, state: dict) -> list[Path]:
        return [self.save(cfg, run_dir, built, state),
                plot_segmentation(built.module, built.data.val_set, run_dir / "predictions.png", cfg.segment.num_vis)]

    def summary(self, metrics: dict) -> str:
        return f"segmentation: mIoU {percent(metrics.get('val/mIoU'))} after " \
               f"{metrics['steps']} steps ({metrics['wall_s']:.0f} s)"


STAGE = Segment()
run = STAGE.run


def segmentation_miou(cfg: DictConfig, pretrained: str | Path | None, run_dir: str | Path,
                      teacher_cfg: DictConfig | None = None, resume: bool = False, **overrides) -> float:
    """Fine-tune UPerNet on `pretrained` (None: random `cfg.student`) with this stage's shipped settings, updated by
    cfg.segment (if any) and `overrides`, on cfg.data; return val/mIoU. `teacher_cfg` names the architecture of a
    teacher's weights file. run_dir must be new unless `resume` (the run's artifacts are written there)."""
    sub = with_stage(cfg, "segment", {"segment": {**overrides, "pretrained": str(pretrained) if pretrained else None},
                                      "resume": resume})
    if teacher_cfg is not None:
        sub.teacher = OmegaConf.create(OmegaConf.to_container(teacher_cfg, resolve=True))
    return float(run(sub, Path(run_dir))["val/mIoU"])
