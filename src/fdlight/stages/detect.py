"""stage=detect: Mask R-CNN on a pretrained backbone (ViTDet simple feature pyramid for a ViT, FPN for a Swin), fed
fixed-size squares; writes `model.safetensors`, `metrics.json` (`val/bbox_mAP`, `val/segm_mAP`) and
`predictions.png`. The backbone comes from `detect.pretrained` as in stage=segment (random `cfg.student` without it).
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from fdlight.data.dense import DetectionData
from fdlight.diagnostics.predictions import plot_detections
from fdlight.errors import check
from fdlight.models.attention import set_attention
from fdlight.models.exports import rebuild_backbone
from fdlight.models.pyramid import Backbone, DetectionBackbone, is_vit
from fdlight.models.weights import read_export_metadata, read_state_dict
from fdlight.modules.detect import InstanceSegmentation, build_mask_rcnn
from fdlight.runs.template import Training, percent
from fdlight.stages.dense import DenseStage, backbone_model, optim_config

HEAD_KEYS = ("anchor_sizes", "box_head_dim", "mask_head_dim", "rpn_pre_nms_train", "rpn_post_nms_train",
             "rpn_pre_nms_test", "rpn_post_nms_test", "box_batch_size_per_image", "detections_per_img")


def detector(backbone_net, head: dict):
    """Mask R-CNN on a timm backbone; a ViT feeds its last block to the simple pyramid unless `indices` says else."""
    indices = head["indices"]
    if indices is None and is_vit(backbone_net):
        indices = [len(backbone_net.blocks) - 1] * 4
    body = Backbone(backbone_net, indices)
    neck = DetectionBackbone(body, head["fpn_channels"])
    return build_mask_rcnn(neck, head["num_classes"], head["img_size"], **{k: head[k] for k in HEAD_KEYS})


def build_detection(cfg: DictConfig, s: DictConfig, num_classes: int):
    """The LightningModule, the backbone architecture, its timm kwargs and the head config (for model.safetensors)."""
    model, arch, kwargs = backbone_model(cfg, s, int(s.img_size), "detect")
    set_attention(model, cfg.trainer.attention)
    indices = list(s.indices) if s.get("indices") is not None else None
    head = dict(indices=indices, num_classes=int(num_classes), img_size=int(s.img_size),
                fpn_channels=int(s.fpn_channels), anchor_sizes=[int(a) for a in s.anchor_sizes],
                **{k: int(s[k]) for k in HEAD_KEYS if k != "anchor_sizes"})
    module = InstanceSegmentation(detector(model, head), optim_config(s), s.mask_threshold)
    return module, arch, kwargs, head


def load_detector(path: str | Path):
    """Rebuild the Mask R-CNN from the `model.safetensors` this stage writes (eval mode)."""
    meta = read_export_metadata(path)
    check(meta.get("task") == "detect", f"{path} is not a detection model written by stage=detect")
    model = detector(rebuild_backbone(meta), json.loads(meta["head"]))
    model.load_state_dict(read_state_dict(path))
    return model.eval()


class Detect(DenseStage):
    name = "detect"

    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        sizes = list(cfg.detect.anchor_sizes)
        check(len(sizes) == 5, f"detect.anchor_sizes needs 5 sizes (levels of stride 4..64), got {sizes}")

    def build(self, cfg: DictConfig) -> Training:
        s = cfg.detect
        data = DetectionData(cfg.data, s.batch_size, s.img_size, s.scale_range, s.eval_batch_size, seed=cfg.seed)
        data.setup()
        module, arch, kwargs, head = build_detection(cfg, s, data.num_classes)
        return Training(module, data, extra=dict(arch=arch, kwargs=kwargs, head=head))

    def describe(self, cfg: DictConfig, built: Training) -> dict:
        return {**super().describe(cfg, built), "img_size": int(cfg.detect.img_size), **built.data.image_counts}

    def export(self, cfg: DictConfig, run_dir: Path, built: Training, state: dict) -> list[Path]:
        data = built.data
        return [self.save(cfg, run_dir, built, state, classes=json.dumps(data.classes)),
                plot_detections(built.module, data.val_set, data.classes, run_dir / "predictions.png",
                                cfg.detect.num_vis)]

    def summary(self, metrics: dict) -> str:
        pct = {k: percent(metrics.get(f"val/{k}_mAP")) for k in ("bbox", "segm")}
        return f"detection: box mAP {pct['bbox']}, mask mAP {pct['segm']} after " \
               f"{metrics['steps']} steps ({metrics['wall_s']:.0f} s)"


STAGE = Detect()
run = STAGE.run
