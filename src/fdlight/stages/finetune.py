"""stage=finetune: image classification fine-tuning of a distilled student, a fine-tuned model or a teacher's own
weights (the paper's baseline) with the recipe of docs/method.md §2. Writes `model.safetensors` (loadable in plain
timm), `metrics.json` (val/top1, val/top5, img_per_s) and `checkpoints/last.ckpt`."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from fdlight.data.finetune_transforms import finetune_train_transform
from fdlight.data.transforms import eval_transform
from fdlight.errors import FDLightError, check
from fdlight.models.attention import set_attention
from fdlight.models.layout import timm_layout
from fdlight.models.pretrained import Architecture, build_from_pretrained, downstream_kwargs
from fdlight.models.students import check_drop_path, student_kwargs
from fdlight.models.exports import export_timm
from fdlight.models.weights import ADAPTERS, classifier_prefixes, read_state_dict
from fdlight.modules.classify import FineTune
from fdlight.runs.template import Training
from fdlight.stages.classify import ClassificationStage, classification_data, optim_dict

# Training-only kwargs left out of the exported architecture.
TRAIN_ONLY_KWARGS = ("drop_path_rate", "head_init_scale")


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
    drop_path = float(f.drop_path)
    overrides = {"img_size": int(f.img_size)} if f.get("img_size") else {}
    pool = f.get("global_pool") or ""
    path = Path(str(f.pretrained)).expanduser() if f.get("pretrained") else None
    if path is None:
        arch = scratch_architecture(cfg, f.scratch)
        model, arch = build_from_pretrained(None, num_classes, drop_path, arch=arch, pool=pool, **overrides)
    else:
        model, arch = build_from_pretrained(path, num_classes, drop_path, teacher_cfg=cfg.teacher,
                                            student_cfg=cfg.student, pool=pool, **overrides)
        if f.get("keep_head"):
            load_head(model, path, arch, num_classes)
    kwargs = downstream_kwargs(arch, num_classes, drop_path, pool, **overrides)
    return model, arch, {k: v for k, v in kwargs.items() if k not in TRAIN_ONLY_KWARGS}, path


def block_types(model: nn.Module) -> set[type]:
    """The transformer block classes: the FSDP wrap unit."""
    blocks = getattr(model, "blocks", None) or [b for s in getattr(model, "layers", []) for b in s.blocks]
    return {type(b) for b in blocks}


def finetune_transforms(cfg: DictConfig, img_size: int) -> tuple:
    """The training and evaluation transforms of the fine-tuning recipe at `img_size` (the data benchmark's too)."""
    f = cfg.finetune
    return (finetune_train_transform(img_size, f.auto_augment, f.re_prob, f.min_scale),
            eval_transform(img_size, f.crop_pct))


# ---------------------------------------------------------------------------------------------------------- stage
class Finetune(ClassificationStage):
    name = "finetune"
    monitored = "model"

    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        f = cfg.finetune
        check_drop_path(f.drop_path, "finetune.drop_path")
        check(not (f.get("ema") and cfg.trainer.strategy == "fsdp"),
              "finetune.ema keeps a whole copy of the weights that trainer=fsdp's shards cannot update; use "
              "trainer=ddp or finetune.ema=null")
        if not f.get("pretrained"):
            check(bool(f.get("scratch")), "finetune.pretrained is not set; pass finetune.pretrained=<run>/student."
                                          "safetensors (or a teacher's weights file with teacher=<its config>), or "
                                          "finetune.scratch=teacher|student to train from random weights")
            scratch_architecture(cfg, f.scratch)

    def build(self, cfg: DictConfig) -> Training:
        f = cfg.finetune
        data = classification_data(cfg, int(f.batch_size))
        num_classes = data.num_classes
        model, arch, export_kwargs, path = build_classifier(cfg, num_classes)
        set_attention(model, cfg.trainer.attention)
        img_size = timm_layout(model).img_size
        data.set_transforms(*finetune_transforms(cfg, img_size))
        mixup = dict(mixup=f.mixup, cutmix=f.cutmix, prob=f.mixup_prob, switch_prob=f.mixup_switch_prob,
                     label_smoothing=f.label_smoothing)
        module = FineTune(model, num_classes, optim_dict(f), mixup, ema_decay=f.get("ema"))
        source = str(path) if path else f"scratch:{f.scratch}"
        return Training(module, data, wrap_classes=block_types(model),
                        extra=dict(arch=arch, export_kwargs=export_kwargs, source=source, img_size=img_size))

    def describe(self, cfg: DictConfig, built: Training) -> dict:
        e = built.extra
        return {"pretrained": e["source"], "model": e["arch"].timm_model, "num_classes": built.module.num_classes,
                "img_size": e["img_size"], "skipped_images": built.data.skipped_images}

    def export(self, cfg: DictConfig, run_dir: Path, built: Training, state: dict) -> list[Path]:
        e, module = built.extra, built.module
        meta = dict(stage="finetune", pretrained=e["source"], num_classes=module.num_classes)
        out = [export_timm(state, run_dir / "model.safetensors", e["arch"].timm_model, e["export_kwargs"], **meta)]
        if module.ema is not None:
            out.append(export_timm(module.ema.module, run_dir / "model_ema.safetensors", e["arch"].timm_model,
                                   e["export_kwargs"], ema=cfg.finetune.ema, **meta))
        return out


STAGE = Finetune()
run = STAGE.run
