"""stage=finetune: image classification fine-tuning of a distilled student, a fine-tuned model or a teacher's own
weights (the paper's baseline) with the recipe of fd-method.md §2. Writes `model.safetensors` (loadable in plain
timm), `metrics.json` (val/top1, val/top5, img_per_s) and `checkpoints/last.ckpt`."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from fdlight.data.classification import ClassificationData
from fdlight.data.finetune_transforms import finetune_train_transform
from fdlight.data.transforms import eval_transform
from fdlight.errors import FDLightError, check
from fdlight.models.attention import set_attention
from fdlight.models.layout import timm_layout
from fdlight.models.pretrained import Architecture, build_from_pretrained, downstream_kwargs
from fdlight.models.students import check_drop_path, student_kwargs
from fdlight.models.weights import ADAPTERS, classifier_prefixes, export_timm, read_state_dict
from fdlight.modules.classify import Classifier, FineTune
from fdlight.stages.common import cpu_threads, timed_fit, trained_state_dict, write_metrics

log = logging.getLogger(__name__)

# Training-only kwargs left out of the exported architecture.
TRAIN_ONLY_KWARGS = ("drop_path_rate", "head_init_scale")


# ----------------------------------------------------------------------------------------------------------- data
def classification_data(cfg: DictConfig, batch_size: int) -> ClassificationData:
    """Train and val sets, checked before anything is built: data.root set and existing, val/ with class folders,
    and data.num_classes (when given) equal to the folders' count. Transforms are attached once the model is known."""
    d = cfg.data
    data = ClassificationData(d, batch_size, None, None, with_val=True, seed=cfg.seed)
    data.setup()
    found = len(data.train_set.classes)
    declared = d.get("num_classes")
    check(declared in (None, found), f"data.num_classes={declared} but {d.root}/train has {found} class folders; "
                                     f"set data.num_classes=null to take the count from the folders")
    return data


# ---------------------------------------------------------------------------------------------------------- model
def scratch_architecture(cfg: DictConfig, which: str) -> Architecture:
    """The architecture of the teacher or student config group, for training from random weights."""
    if which == "student":
        return Architecture(cfg.student.model, student_kwargs(cfg.student))
    if which == "teacher":
        check(cfg.teacher.builder == "timm", f"finetune.scratch=teacher needs a timm teacher config, not "
                                             f"teacher.builder={cfg.teacher.builder}")
        kwargs = (OmegaConf.to_container(cfg.teacher.kwargs, resolve=True) if cfg.teacher.kwargs else {})
        return Architecture(cfg.teacher.model.split(".")[0], kwargs, cfg.teacher.get("adapter"))
    raise FDLightError(f"finetune.scratch={which!r} is not known; use teacher or student (the config group whose "
                       f"architecture trains from random weights)")


def load_head(model: nn.Module, path: Path, arch: Architecture, num_classes: int) -> None:
    """Keep the file's classifier (and fc_norm): its class count must be the data's."""
    sd = ADAPTERS[arch.adapter](read_state_dict(path))
    head = classifier_prefixes(model)
    found = {k: v for k, v in sd.items() if k.startswith((*head, "fc_norm."))}
    weight = next((v for k, v in found.items() if k.startswith(head) and k.endswith("weight")), None)
    check(weight is not None, f"finetune.keep_head=true but {path} has no classifier head ({head[0]}*); set "
                              f"finetune.keep_head=false to train a fresh one")
    check(weight.shape[0] == num_classes,
          f"the classifier head in {path} has {weight.shape[0]} classes but the data has {num_classes}; set "
          f"finetune.keep_head=false to train a fresh {num_classes}-class head, or use the {weight.shape[0]}-class "
          f"data")
    result = model.load_state_dict(found, strict=False)
    check(not result.unexpected_keys, f"{path}: head keys {result.unexpected_keys[:4]} do not fit {arch.timm_model}")


def build_classifier(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, Architecture, dict, Path | None]:
    """(model, architecture, exported timm kwargs, pretrained path) of the fine-tuning run."""
    f = cfg.finetune
    drop_path = check_drop_path(f.drop_path, "finetune.drop_path")
    overrides = {"img_size": int(f.img_size)} if f.get("img_size") else {}
    pool = f.get("global_pool") or ""
    path = Path(str(f.pretrained)).expanduser() if f.get("pretrained") else None
    if path is None:
        check(bool(f.get("scratch")), "finetune.pretrained is not set; pass finetune.pretrained=<run>/student."
                                      "safetensors (or a teacher's weights file with teacher=<its config>), or "
                                      "finetune.scratch=teacher|student to train from random weights")
        arch = scratch_architecture(cfg, f.scratch)
        model, arch = build_from_pretrained(None, num_classes, drop_path, arch=arch, pool=pool, **overrides)
    else:
        model, arch = build_from_pretrained(path, num_classes, drop_path, teacher_cfg=cfg.teacher, pool=pool,
                                            **overrides)
        if f.get("keep_head"):
            load_head(model, path, arch, num_classes)
    kwargs = downstream_kwargs(arch, num_classes, drop_path, pool, **overrides)
    return model, arch, {k: v for k, v in kwargs.items() if k not in TRAIN_ONLY_KWARGS}, path


def block_types(model: nn.Module) -> set[type]:
    """The transformer block classes: the FSDP wrap unit."""
    blocks = getattr(model, "blocks", None) or [b for s in getattr(model, "layers", []) for b in s.blocks]
    return {type(b) for b in blocks}


# ---------------------------------------------------------------------------------------------------------- run
def fit_and_validate(trainer: L.Trainer, module: Classifier, data: ClassificationData, resume) -> dict:
    """Train, then make sure the reported metrics belong to the final weights (max_steps can stop mid-epoch)."""
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    if module.validated_step != trainer.global_step:
        trainer.validate(module, datamodule=data, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ema/"))}


def optim_dict(stage_cfg: DictConfig) -> dict:
    return OmegaConf.to_container(stage_cfg, resolve=True)


def run(cfg: DictConfig, run_dir: Path, callbacks=()) -> dict:
    with cpu_threads(cfg, cfg.finetune):
        return finetune(cfg, run_dir, callbacks)


def finetune(cfg: DictConfig, run_dir: Path, callbacks=()) -> dict:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    f = cfg.finetune
    check(not (f.get("ema") and cfg.trainer.strategy == "fsdp"),
          "finetune.ema keeps a whole copy of the weights that trainer=fsdp's shards cannot update; use trainer=ddp "
          "or finetune.ema=null")
    data = classification_data(cfg, int(f.batch_size))
    num_classes = data.num_classes
    model, arch, export_kwargs, path = build_classifier(cfg, num_classes)
    set_attention(model, cfg.trainer.attention)
    img_size = timm_layout(model).img_size
    data.set_transforms(finetune_train_transform(img_size, f.auto_augment, f.re_prob, f.min_scale),
                      eval_transform(img_size, f.crop_pct))
    mixup = dict(mixup=f.mixup, cutmix=f.cutmix, prob=f.mixup_prob, switch_prob=f.mixup_switch_prob,
                 label_smoothing=f.label_smoothing)
    module = FineTune(model, num_classes, optim_dict(f), mixup, ema_decay=f.get("ema"))
    trainer, meter, val, wall = timed_fit(cfg, f, run_dir, module, data, fit_and_validate, callbacks,
                                          wrap_classes=block_types(model))
    source = str(path) if path else f"scratch:{f.scratch}"
    metrics = {"stage": "finetune", "pretrained": source, "model": arch.timm_model, "num_classes": num_classes,
               "img_size": img_size, **val, "first_loss": module.first_loss, "last_loss": module.last_loss,
               "steps": trainer.global_step, "img_per_s": meter.img_per_s, "wall_s": wall,
               "skipped_images": data.skipped_images}
    model_state = trained_state_dict(trainer, module, "model.")  # collective under FSDP: every rank
    if trainer.is_global_zero:
        export_timm(model_state, run_dir / "model.safetensors", arch.timm_model, export_kwargs, stage="finetune",
                    pretrained=source, num_classes=num_classes)
        if module.ema is not None:
            export_timm(module.ema.module, run_dir / "model_ema.safetensors", arch.timm_model, export_kwargs,
                        stage="finetune", pretrained=source, num_classes=num_classes, ema=f.ema)
        write_metrics(run_dir, metrics)
        log.info("fine-tuned %s (%s): top-1 %.2f%% after %d steps, %.0f img/s; model at %s", arch.timm_model, source,
                 100 * metrics.get("val/top1", float("nan")), metrics["steps"], metrics["img_per_s"],
                 run_dir / "model.safetensors")
    return metrics
