"""stage=linear: linear probe on frozen features (docs/method.md §2.5): the backbone as fine-tuning builds it
(mean-pooled patch tokens through a fresh, identity fc_norm), drop path 0, frozen and in eval mode; a BatchNorm
without affine then a Linear are the only trained parameters. Writes `head.safetensors`, `metrics.json` and the
checkpoints."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fdlight.artifacts import save_safetensors
from fdlight.data.finetune_transforms import linear_train_transform
from fdlight.data.transforms import eval_transform
from fdlight.errors import check
from fdlight.models.layout import timm_layout
from fdlight.models.pretrained import build_from_pretrained
from fdlight.modules.classify import LinearProbe
from fdlight.runs.template import Training
from fdlight.stages.classify import ClassificationStage, classification_data, optim_dict


class Linear(ClassificationStage):
    name = "linear"
    weights_prefix = ""  # the backbone is frozen: only the head is written

    def validate(self, cfg: DictConfig) -> None:
        check(bool(cfg.linear.get("pretrained")), "linear.pretrained is not set; pass linear.pretrained=<run>/student"
                                                  ".safetensors (or a teacher's weights file with teacher=<its "
                                                  "config>)")
        super().validate(cfg)

    def build(self, cfg: DictConfig) -> Training:
        c = cfg.linear
        data = classification_data(cfg, int(c.batch_size))
        path = Path(str(c.pretrained)).expanduser()
        overrides = {"img_size": int(c.img_size)} if c.get("img_size") else {}
        backbone, arch = build_from_pretrained(path, num_classes=0, drop_path=0.0, teacher_cfg=cfg.teacher,
                                               student_cfg=cfg.student, pool=c.get("global_pool") or "",
                                               **overrides)
        img_size = timm_layout(backbone).img_size
        data.set_transforms(linear_train_transform(img_size, c.min_scale), eval_transform(img_size, c.crop_pct))
        module = LinearProbe(backbone, data.num_classes, optim_dict(c))
        return Training(module, data, extra=dict(path=path, arch=arch, img_size=img_size))

    def describe(self, cfg: DictConfig, built: Training) -> dict:
        e = built.extra
        return {"pretrained": str(e["path"]), "model": e["arch"].timm_model, "num_classes": built.module.num_classes,
                "img_size": e["img_size"], "skipped_images": built.data.skipped_images}

    def export(self, cfg: DictConfig, run_dir: Path, built: Training, state: dict) -> list[Path]:
        head = {f"head.{k}": v for k, v in built.module.head.state_dict().items()}
        return [save_safetensors(head, run_dir / "head.safetensors", {"format": "fdlight", "stage": "linear",
                                                                      "pretrained": str(built.extra["path"])})]


STAGE = Linear()
run = STAGE.run
