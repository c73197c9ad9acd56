"""Semantic segmentation LightningModule: UPerNet trained with cross-entropy (255 ignored) plus the auxiliary head,
evaluated by sliding-window or whole-image inference into a dataset-level mIoU (torchmetrics). Also the AdamW +
layer-decay optimizer with a warmup + poly or cosine schedule that the dense stages share."""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from fdlight.data.annotations import IGNORE
from fdlight.errors import FDLightError
from fdlight.models.upernet import UPerNet, segmentation_loss
from fdlight.modules.guards import check_finite, clip_gradients
from fdlight.optim import adamw_with_schedule, original_ndims, param_groups


# --------------------------------------------------------------------------------------------------- optimizer
class WarmupPoly:
    """lr(step) / peak: linear warmup from `start` to `peak`, then (peak - end) * (1 - t)^power + end (mmseg PolyLR)."""

    def __init__(self, peak: float, start: float, end: float, warmup_steps: int, total_steps: int,
                 power: float = 1.0):
        self.peak, self.start, self.end, self.power = peak, start, end, power
        self.warmup_steps, self.total_steps = int(warmup_steps), max(int(total_steps), 1)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        t = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return (self.peak - self.end) * (1.0 - t) ** self.power + self.end

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.peak if self.peak else 0.0


def dense_optimizer(named, optim: dict, layer_of, num_layers: int, total_steps: int, fused: bool = False,
                    ndims: dict | None = None):
    """AdamW over layer-decayed groups (scale applied once) with a per-step warmup + poly or cosine schedule."""
    o = optim
    groups = param_groups(named, o["weight_decay"], o.get("no_decay_keywords", ()), layer_of=layer_of,
                          num_layers=num_layers, layer_decay=o["layer_decay"], ndims=ndims)
    warmup = min(int(o["warmup_steps"]), max(total_steps - 1, 0))
    opt, sched = adamw_with_schedule(groups, o["lr"], o["warmup_lr"], o["min_lr"], warmup, total_steps,
                                     o.get("betas", (0.9, 0.999)), fused=fused)
    if o["schedule"] == "poly":
        curves = [WarmupPoly(g["initial_lr"], o["warmup_lr"], o["min_lr"], warmup, total_steps, o.get("power", 1.0))
                  for g in opt.param_groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, curves)
    elif o["schedule"] != "cosine":
        raise FDLightError(f"unknown schedule {o['schedule']!r}; use poly or cosine")
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------------------------------------------ module
class DenseTask(L.LightningModule):
    """What the dense modules share: layer-decayed AdamW over `model.<backbone_path>`'s layers (necks and heads at
    scale 1), its per-step schedule, and clipping."""

    backbone_path = "backbone"

    def __init__(self, model: torch.nn.Module, optim: dict):
        super().__init__()
        self.model, self.optim_cfg = model, dict(optim)
        self.param_ndims = original_ndims(model)  # before any FSDP wrapping flattens them

    def optimizer(self, total_steps: int) -> dict:
        bb = self.model.get_submodule(self.backbone_path)
        prefix = f"{self.backbone_path}.model."

        def layer_of(name: str) -> int:
            return bb.layer_id(name[len(prefix):]) if name.startswith(prefix) else bb.num_layers - 1

        return dense_optimizer(list(self.model.named_parameters()), self.optim_cfg, layer_of, bb.num_layers,
                               total_steps, fused=self.device.type == "cuda", ndims=self.param_ndims)

    def configure_optimizers(self):
        return self.optimizer(int(self.trainer.estimated_stepping_batches))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, self.optim_cfg.get("clip_grad"))


class SemanticSegmentation(DenseTask):
    def __init__(self, model: UPerNet, optim: dict, eval_mode: str = "slide", eval_stride: int | None = None,
                 aux_weight: float = 0.4, eval_chunk: int = 8, compile_model: bool = False):
        if eval_mode not in ("slide", "whole"):
            raise FDLightError(f"segment.eval_mode={eval_mode!r}; use slide or whole")
        super().__init__(model, optim)
        self.eval_mode, self.aux_weight, self.eval_chunk = eval_mode, float(aux_weight), int(eval_chunk)
        self.crop = model.backbone.img_size
        self.eval_stride = int(eval_stride or math.ceil(self.crop * 2 / 3))  # mmseg: 341 for 512
        k = model.num_classes
        self.miou = MulticlassJaccardIndex(k, ignore_index=IGNORE, average="macro")
        self.acc = MulticlassAccuracy(k, ignore_index=IGNORE, average="micro")
        self.first_loss = self.last_loss = None
        self.val_results: dict = {}
        self.val_step = -1
        self.compile_model = compile_model
        self._compiled = None

    def train_forward(self, x: torch.Tensor):
        """The model's training forward, compiled on request (`trainer.compile=true`) on first use, i.e. after any
        SyncBatchNorm conversion or sharding. Held outside the module tree, where the compiled wrapper would add a
        second copy of every parameter name to the state dict."""
        if not self.compile_model:
            return self.model(x)
        if self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self.model))
        return self._compiled(x)

    def setup(self, stage: str) -> None:
        # cuDNN's convolutions of the head run in NHWC. Converted here, before the strategy wraps the model (DDP's
        # gradient buckets take the parameters' strides when they are built).
        if self.trainer.strategy.root_device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = segmentation_loss(self.train_forward(x), y, self.aux_weight)
        value = check_finite(loss, self, "segmentation", "lower segment.base_lr or check the data")
        self.first_loss = value if self.first_loss is None else self.first_loss
        self.last_loss = value
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
        return loss

    # ---------------------------------------------------------------------------------------------- inference
    def _forward_chunks(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(c) for c in x.split(self.eval_chunk)])

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) for same-sized images (B, 3, H, W), by sliding crop windows or by one whole-image
        pass at crop x crop (the fixed-window backbone sees exactly its training size either way)."""
        h, w = x.shape[-2:]
        c = self.crop
        if self.eval_mode == "whole":
            logits = self._forward_chunks(F.interpolate(x, (c, c), mode="bilinear", align_corners=False))
            return F.interpolate(logits.float(), (h, w), mode="bilinear", align_corners=False)
        ph, pw = max(h, c), max(w, c)
        x = F.pad(x, (0, pw - w, 0, ph - h))  # 0 = the mean colour after normalisation
        s = self.eval_stride
        tops = [min(i * s, ph - c) for i in range((max(ph - c, 0) + s - 1) // s + 1)]
        lefts = [min(j * s, pw - c) for j in range((max(pw - c, 0) + s - 1) // s + 1)]
        spots = [(t, left) for t in tops for left in lefts]
        windows = torch.cat([x[:, :, t:t + c, left:left + c] for t, left in spots])
        logits = self._forward_chunks(windows).float()
        logits = F.interpolate(logits, (c, c), mode="bilinear", align_corners=False)
        b, k = x.shape[0], logits.shape[1]
        total = x.new_zeros((b, k, ph, pw), dtype=torch.float32)
        count = x.new_zeros((1, 1, ph, pw), dtype=torch.float32)
        for i, (t, left) in enumerate(spots):
            total[:, :, t:t + c, left:left + c] += logits[i * b:(i + 1) * b]
            count[:, :, t:t + c, left:left + c] += 1
        return (total / count)[:, :, :h, :w]

    @torch.no_grad()
    def predict(self, images, sizes) -> list[torch.Tensor]:
        """Label maps (H, W) for a list of images, each resized back to its annotation size."""
        out = []
        for image, size in zip(images, sizes):
            logits = self.predict_logits(image[None])
            out.append(F.interpolate(logits, tuple(size), mode="bilinear", align_corners=False)[0].argmax(0))
        return out

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        if all(im.shape == images[0].shape for im in images) and all(lb.shape == labels[0].shape for lb in labels):
            logits = self.predict_logits(torch.stack(images))  # one batched pass when sizes agree
            preds = F.interpolate(logits, labels[0].shape, mode="bilinear", align_corners=False).argmax(1)
        else:
            preds = self.predict(images, [lb.shape for lb in labels])
        for pred, label in zip(preds, labels):
            self.miou.update(pred[None], label[None])
            self.acc.update(pred[None], label[None])

    def on_validation_epoch_end(self) -> None:
        results = {"val/mIoU": float(self.miou.compute()), "val/aAcc": float(self.acc.compute())}
        self.miou.reset()
        self.acc.reset()
        for k, v in results.items():
            self.log(k, v, prog_bar=k == "val/mIoU", sync_dist=False)
        self.val_results, self.val_step = results, self.global_step

