"""stage=detect: Mask R-CNN on a pretrained backbone (ViTDet simple feature pyramid for a ViT, FPN for a Swin), fed
fixed-size squares; writes `model.safetensors`, `metrics.json` (`val/bbox_mAP`, `val/segm_mAP`) and
`predictions.png`. The backbone comes from `detect.pretrained` as in stage=segment (random `cfg.student` without it).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from fdlight.data.dense import DetectionData
from fdlight.errors import check
from fdlight.models.attention import set_attention
from fdlight.models.pyramid import Backbone, DetectionBackbone
from fdlight.models.weights import read_export_metadata, read_state_dict
from fdlight.modules.detect import InstanceSegmentation, build_mask_rcnn
from fdlight.stages.common import cpu_threads, timed_fit, trained_state_dict, write_metrics
from fdlight.stages.segment import (backbone_model, fit_and_validate, optim_config, palette,
                                    rebuild_backbone, save_model)

log = logging.getLogger(__name__)
HEAD_KEYS = ("anchor_sizes", "box_head_dim", "mask_head_dim", "rpn_pre_nms_train", "rpn_post_nms_train",
             "rpn_pre_nms_test", "rpn_post_nms_test", "box_batch_size_per_image", "detections_per_img")


def detector(backbone_net, head: dict):
    """Mask R-CNN on a timm backbone; a ViT feeds its last block to the simple pyramid unless `indices` says else."""
    indices = head["indices"]
    if indices is None and hasattr(backbone_net, "blocks"):
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
    check(len(head["anchor_sizes"]) == 5, f"detect.anchor_sizes needs 5 sizes (levels of stride 4..64), got "
                                          f"{head['anchor_sizes']}")
    module = InstanceSegmentation(detector(model, head), optim_config(s), s.mask_threshold)
    return module, arch, kwargs, head


def load_detector(path: str | Path):
    """Rebuild the Mask R-CNN from the `model.safetensors` this stage writes (eval mode)."""
    meta = read_export_metadata(path)
    check(meta.get("task") == "detect", f"{path} is not a detection model written by stage=detect")
    model = detector(rebuild_backbone(meta), json.loads(meta["head"]))
    model.load_state_dict(read_state_dict(path))
    return model.eval()


def plot_detections(module: InstanceSegmentation, dataset, classes: list[str], path: Path, count: int = 4,
                    min_score: float = 0.5) -> None:
    """Ground truth (left) beside predictions with score >= min_score (right), masks tinted, boxes labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = min(int(count), len(dataset))
    if count <= 0:
        return
    colours = palette(len(classes) + 1) / 255.0
    fig, axes = plt.subplots(count, 2, figsize=(7, 3.4 * count), squeeze=False)
    module.eval()
    for row in range(count):
        image, target = dataset[row]
        pred = module.predict([image.to(module.device)], [target])[0]
        h, w = (int(v) for v in target["size"])
        sx, sy = (float(v) for v in target["scale"])
        picture = image[:, :round(h * sy), :round(w * sx)]
        picture = torch.nn.functional.interpolate(picture[None], (h, w), mode="bilinear")[0]
        picture = picture.clamp(0, 1).permute(1, 2, 0).numpy()
        scores = pred["scores"].cpu()
        keep = scores >= min_score
        shown_title = f"prediction (score >= {min_score})"
        if not keep.any():  # a weak model: show its best three, with their scores
            keep = torch.arange(len(scores)) < 3
            shown_title = f"top predictions (all scores < {min_score})"
        sides = [(target["boxes"], target["labels"], target["masks"].bool(), None, "ground truth"),
                 (pred["boxes"].cpu()[keep], pred["labels"].cpu()[keep], pred["masks"].cpu()[keep],
                  scores[keep], shown_title)]
        for ax, (boxes, labels, masks, scores, title) in zip(axes[row], sides):
            shown = picture.copy()
            for m, lab in zip(masks.numpy(), labels.tolist()):
                shown[m] = 0.45 * shown[m] + 0.55 * colours[lab]
            ax.imshow(shown, interpolation="nearest")
            for i, (box, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, ec=colours[lab]))
                text = classes[lab - 1] + (f" {float(scores[i]):.2f}" if scores is not None else "")
                ax.text(x0, y0, text, fontsize=7, va="bottom", color="white",
                        bbox=dict(facecolor=colours[lab], alpha=0.8, pad=1, lw=0))
            ax.set_title(f"{title}: {len(labels)}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    with cpu_threads(cfg, cfg.detect):
        return train_detection(cfg, run_dir)


def train_detection(cfg: DictConfig, run_dir: Path) -> dict:
    s = cfg.detect
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = DetectionData(cfg.data, s.batch_size, s.img_size, s.scale_range, s.eval_batch_size, seed=cfg.seed)
    data.setup()
    module, arch, kwargs, head = build_detection(cfg, s, data.num_classes)
    trainer, meter, _, wall = timed_fit(cfg, s, run_dir, module, data, fit_and_validate)  # after the checks above
    metrics = {"stage": "detect", "backbone": arch.timm_model, "pretrained": str(s.pretrained or "") or None,
               "data": cfg.data.name, "num_classes": data.num_classes, "img_size": int(s.img_size),
               **module.val_results, **data.image_counts, "first_loss": module.first_loss,
               "last_loss": module.last_loss, "steps": trainer.global_step, "img_per_s": meter.img_per_s,
               "wall_s": wall}
    model_state = trained_state_dict(trainer, module, "model.")  # collective under FSDP: every rank
    if trainer.is_global_zero:
        save_model(model_state, run_dir / "model.safetensors", "detect", arch, kwargs, head, data=cfg.data.name,
                   pretrained=s.pretrained or "", classes=json.dumps(data.classes))
        write_metrics(run_dir, metrics)
        plot_detections(module, data.val_set, data.classes, run_dir / "predictions.png", s.num_vis)
        log.info("detection on %s: box mAP %.2f%%, mask mAP %.2f%% after %d steps (%.0f s); model at %s",
                 cfg.data.name, 100 * metrics.get("val/bbox_mAP", np.nan), 100 * metrics.get("val/segm_mAP", np.nan),
                 metrics["steps"], wall, run_dir / "model.safetensors")
    return metrics
