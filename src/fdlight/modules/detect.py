"""Instance detection and segmentation: torchvision Mask R-CNN on a ViTDet simple feature pyramid (ViT) or an FPN
(Swin), fed fixed-size squares so a fixed-window backbone works; box and mask mAP by torchmetrics with the
faster-coco-eval backend, measured in each image's original frame."""
from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from fdlight.constants import IMAGENET_MEAN, IMAGENET_STD
from fdlight.errors import FDLightError
from fdlight.models.pyramid import DetectionBackbone
from fdlight.modules.segment import DenseTask

LEVELS = ["0", "1", "2", "3"]


class FixedSizeTransform(GeneralizedRCNNTransform):
    """Normalise and batch without resizing: the data already arrive as size x size squares (large-scale jitter),
    which is the only input a fixed-window backbone accepts."""

    def __init__(self, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(size, size, list(mean), list(std), size_divisible=1)
        self.size = int(size)

    def resize(self, image, target=None):
        if tuple(image.shape[-2:]) != (self.size, self.size):
            raise FDLightError(f"the detector takes {self.size}x{self.size} padded squares, got "
                               f"{tuple(image.shape[-2:])}; feed it through the large-scale-jitter transform")
        return image, target


def build_mask_rcnn(backbone: DetectionBackbone, num_classes: int, img_size: int, anchor_sizes=(32, 64, 128, 256, 512),
                    box_head_dim: int = 1024, mask_head_dim: int = 256, rpn_pre_nms_train: int = 2000,
                    rpn_post_nms_train: int = 2000, rpn_pre_nms_test: int = 1000, rpn_post_nms_test: int = 1000,
                    box_batch_size_per_image: int = 512, detections_per_img: int = 100) -> MaskRCNN:
    """Mask R-CNN for `num_classes` object classes (labels 1..K; 0 is background)."""
    ch = backbone.out_channels
    anchors = AnchorGenerator(sizes=tuple((int(s),) for s in anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    model = MaskRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(LEVELS, 7, 2), mask_roi_pool=MultiScaleRoIAlign(LEVELS, 14, 2),
        box_head=TwoMLPHead(ch * 7 * 7, box_head_dim), box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        mask_head=MaskRCNNHeads(ch, [mask_head_dim] * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_dim, mask_head_dim, num_classes + 1),
        min_size=img_size, max_size=img_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_pre_nms_top_n_train=rpn_pre_nms_train, rpn_post_nms_top_n_train=rpn_post_nms_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_test, rpn_post_nms_top_n_test=rpn_post_nms_test,
        box_batch_size_per_image=box_batch_size_per_image, box_detections_per_img=detections_per_img)
    model.transform = FixedSizeTransform(img_size)
    return model


def to_original_frame(out: dict, target: dict, mask_threshold: float = 0.5) -> dict:
    """A detector output on the padded square mapped back to the image's original size (boxes and masks)."""
    sx, sy = (float(v) for v in target["scale"])
    h, w = (int(v) for v in target["size"])
    boxes = out["boxes"] / out["boxes"].new_tensor([sx, sy, sx, sy])
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                         boxes[:, 3].clamp(0, h)], dim=1)
    masks = out["masks"][:, 0, :max(1, round(h * sy)), :max(1, round(w * sx))]
    if masks.shape[0]:
        masks = F.interpolate(masks[None].float(), (h, w), mode="bilinear", align_corners=False)[0]
    masks = masks.reshape(-1, h, w) > mask_threshold
    return {"boxes": boxes, "labels": out["labels"], "scores": out["scores"], "masks": masks}


def metric_target(target: dict) -> dict:
    t = {"boxes": target["boxes"], "labels": target["labels"], "masks": target["masks"].bool(),
         "iscrowd": target.get("iscrowd", torch.zeros_like(target["labels"]))}
    if "area" in target:
        t["area"] = target["area"]
    return t


def new_map_metric() -> MeanAveragePrecision:
    return MeanAveragePrecision(iou_type=("bbox", "segm"), box_format="xyxy", backend="faster_coco_eval")


class InstanceSegmentation(DenseTask):
    backbone_path = "backbone.body"

    def __init__(self, model: MaskRCNN, optim: dict, mask_threshold: float = 0.5):
        super().__init__(model, optim)
        self.mask_threshold = float(mask_threshold)
        self.map = new_map_metric()
        self.val_results: dict = {}
        self.val_step = -1

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        targets = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
        losses = self.model(list(images), targets)
        loss = sum(losses.values())
        self.record_loss(loss, "detection", "lower detect.lr or check the data")
        for k, v in losses.items():
            self.log(f"train/{k}", v.detach())
        return loss

    @torch.no_grad()
    def predict(self, images, targets) -> list[dict]:
        """Detections in each image's original frame (targets carry `scale` and `size` from the eval transform)."""
        outs = self.model(list(images))
        return [to_original_frame(o, t, self.mask_threshold) for o, t in zip(outs, targets)]

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.map.update(self.predict(images, targets), [metric_target(t) for t in targets])

    def on_validation_epoch_end(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # the COCO evaluator prints its summary table
            r = self.map.compute()
        self.map.reset()
        results = {f"val/{kind}_{name}": float(r[f"{kind}_{key}"]) for kind in ("bbox", "segm")
                   for name, key in (("mAP", "map"), ("mAP_50", "map_50"), ("mAP_75", "map_75"))}
        for k, v in results.items():
            self.log(k, v, prog_bar=k == "val/bbox_mAP")
        self.val_results, self.val_step = results, self.global_step

