"""stage=linear: linear probe on frozen features (fd-method.md §2.5): the backbone as fine-tuning builds it
(mean-pooled patch tokens through a fresh, identity fc_norm), drop path 0, frozen and in eval mode; a BatchNorm
without affine then a Linear are the only trained parameters. Writes `head.safetensors`, `metrics.json` and the
checkpoints."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from fdlight.data.finetune_transforms import linear_train_transform
from fdlight.data.transforms import eval_transform
from fdlight.errors import check
from fdlight.models.layout import timm_layout
from fdlight.models.pretrained import build_from_pretrained
from fdlight.models.weights import atomic_save_safetensors
from fdlight.modules.classify import LinearProbe
from fdlight.stages.common import cpu_threads, timed_fit, write_metrics
from fdlight.stages.finetune import classification_data, fit_and_validate, optim_dict

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, callbacks=()) -> dict:
    with cpu_threads(cfg, cfg.linear):
        return probe(cfg, run_dir, callbacks)


def probe(cfg: DictConfig, run_dir: Path, callbacks=()) -> dict:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    c = cfg.linear
    check(bool(c.get("pretrained")), "linear.pretrained is not set; pass linear.pretrained=<run>/student.safetensors "
                                     "(or a teacher's weights file with teacher=<its config>)")
    data = classification_data(cfg, int(c.batch_size))
    num_classes = data.num_classes
    path = Path(str(c.pretrained)).expanduser()
    overrides = {"img_size": int(c.img_size)} if c.get("img_size") else {}
    backbone, arch = build_from_pretrained(path, num_classes=0, drop_path=0.0, teacher_cfg=cfg.teacher,
                                           pool=c.get("global_pool") or "", **overrides)
    img_size = timm_layout(backbone).img_size
    data.set_transforms(linear_train_transform(img_size, c.min_scale), eval_transform(img_size, c.crop_pct))
    module = LinearProbe(backbone, num_classes, optim_dict(c))
    trainer, meter, val, wall = timed_fit(cfg, c, run_dir, module, data, fit_and_validate, callbacks)
    metrics = {"stage": "linear", "pretrained": str(path), "model": arch.timm_model, "num_classes": num_classes,
               "img_size": img_size, **val, "first_loss": module.first_loss, "last_loss": module.last_loss,
               "steps": trainer.global_step, "img_per_s": meter.img_per_s, "wall_s": wall,
               "skipped_images": data.skipped_images}
    if trainer.is_global_zero:
        atomic_save_safetensors({f"head.{k}": v for k, v in module.head.state_dict().items()},
                                run_dir / "head.safetensors", {"format": "fdlight", "stage": "linear",
                                                               "pretrained": str(path)})
        write_metrics(run_dir, metrics)
        log.info("linear probe on %s: top-1 %.2f%% after %d steps, %.0f img/s", path,
                 100 * metrics.get("val/top1", float("nan")), metrics["steps"], metrics["img_per_s"])
    return metrics
