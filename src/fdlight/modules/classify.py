"""Image classification on a pretrained backbone: full fine-tuning (docs/method.md §2.2-2.4) and the linear probe on
frozen features (§2.5). Both report top-1 / top-5 with torchmetrics."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from fdlight.errors import FDLightError, check
from fdlight.layer_decay import layer_ids
from fdlight.modules.base import TrainingModule
from fdlight.optim import WarmupSchedule, adamw_with_schedule, closure_loss, original_ndims, param_groups, scaled_lr

VIT_NO_DECAY = ("pos_embed", "cls_token", "reg_token", "mask_token")
SWIN_NO_DECAY = ("absolute_pos_embed", "cpb_mlp", "logit_scale", "relative_position_bias_table")


def no_decay_keywords(model: nn.Module) -> tuple[str, ...]:
    """Official no-decay names besides 1-D tensors and biases: the ViT bias tables ARE decayed, Swin's are not."""
    return SWIN_NO_DECAY if hasattr(model, "layers") and not hasattr(model, "blocks") else VIT_NO_DECAY


def accuracy_metrics(num_classes: int) -> nn.ModuleDict:
    """top-1, and top-5 when there are at least 5 classes."""
    metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return nn.ModuleDict(metrics)


class Classifier(TrainingModule):
    """What both stages share: validation metrics, the total batch, per-step schedules."""

    stage_key = "finetune"

    def __init__(self, num_classes: int, optim: dict):
        super().__init__(optim)
        self.num_classes = num_classes
        self.val_metrics = accuracy_metrics(num_classes)
        self.validated_step = -1  # the global step the latest validation saw

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def loss_fix(self) -> str:
        return f"lower {self.stage_key}.base_lr or check the pretrained weights"

    def evaluate(self, metrics: nn.ModuleDict, logits: torch.Tensor, y: torch.Tensor, prefix: str) -> None:
        for name, metric in metrics.items():
            metric.update(logits, y)
            self.log(f"{prefix}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "top1")
        self.log(f"{prefix}/loss", F.cross_entropy(logits.float(), y), on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.evaluate(self.val_metrics, self.logits(x), y, "val")

    def on_validation_epoch_end(self) -> None:
        self.validated_step = self.global_step

    def total_batch(self) -> int:
        t = self.trainer
        return int(self.optim_cfg["batch_size"]) * t.world_size * t.accumulate_grad_batches

    def schedule_steps(self) -> tuple[int, int]:
        """(warmup, total) optimizer steps from the epoch counts; max_steps cuts a run short without reshaping it."""
        t = self.trainer
        t.estimated_stepping_batches  # noqa: B018 - sets up the train loader so num_training_batches is known
        per_epoch = math.ceil(t.num_training_batches / t.accumulate_grad_batches)
        epochs = max(int(self.optim_cfg["epochs"]), 1)
        return int(round(per_epoch * float(self.optim_cfg["warmup_epochs"]))), per_epoch * epochs


# ------------------------------------------------------------------------------------------------- fine-tuning
class FineTune(Classifier):
    """Full fine-tuning: Mixup/CutMix with label smoothing and soft-target cross entropy, AdamW with layer-wise lr
    decay (applied once), warmup then per-step cosine, gradient clipping, optional EMA of the weights."""

    def __init__(self, model: nn.Module, num_classes: int, optim: dict, mixup: dict, ema_decay: float | None = None):
        super().__init__(num_classes, optim)
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.model = model
        self.param_ndims = original_ndims(model)  # before any FSDP wrapping flattens them
        smoothing = float(mixup.get("label_smoothing", 0.0))
        self.mixup = None
        if mixup.get("mixup", 0) > 0 or mixup.get("cutmix", 0) > 0:
            check(int(optim["batch_size"]) % 2 == 0,
                  f"finetune.batch_size={optim['batch_size']} is odd, but Mixup/CutMix mixes pairs inside a batch; "
                  f"use an even batch size or turn mixing off with finetune.mixup=0 finetune.cutmix=0")
            self.mixup = Mixup(mixup_alpha=mixup["mixup"], cutmix_alpha=mixup["cutmix"], prob=mixup.get("prob", 1.0),
                               switch_prob=mixup.get("switch_prob", 0.5), mode="batch", label_smoothing=smoothing,
                               num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()
        self.ema = None
        if ema_decay:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(model, decay=float(ema_decay)).requires_grad_(False)
            self.ema_metrics = accuracy_metrics(num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        loss = self.criterion(self.model(x).float(), target)
        self.record_loss(loss, "training", self.loss_fix)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        """The update, then the weight average's: here rather than in on_train_batch_end, so that a checkpoint saved
        at the end of the batch (callbacks run before the module's hook) holds the average of this step too."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)  # global_step counts this step once we return

    def validation_step(self, batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.ema is not None:
            x, y = batch
            self.evaluate(self.ema_metrics, self.ema.module(x), y, "val_ema")

    def configure_optimizers(self):
        o = self.optim_cfg
        named = list(self.model.named_parameters())
        decay = float(o.get("layer_decay", 1.0))
        layer_of, num_layers = layer_ids(self.model, f"{self.stage_key}.layer_decay") if decay != 1.0 else (None, 1)
        groups = param_groups(named, o["weight_decay"], no_decay_keywords(self.model), layer_of=layer_of,
                              num_layers=num_layers, layer_decay=decay, ndims=self.param_ndims)
        warmup, total = self.schedule_steps()
        batch = self.total_batch()
        opt, sched = adamw_with_schedule(groups, scaled_lr(o["base_lr"], batch), scaled_lr(o["warmup_lr"], batch),
                                         scaled_lr(o["min_lr"], batch), warmup, total, o["betas"],
                                         fused=self.device.type == "cuda")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------------------------------------ linear probe
class LARS(torch.optim.Optimizer):
    """SGD with momentum and a per-tensor trust ratio (You et al. 2017) in the MoCo v3 / MAE linear-probe form: weight
    decay and the trust ratio act on matrices only, biases take plain momentum steps."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = torch.where((p_norm > 0) & (d_norm > 0), g["trust_coefficient"] * p_norm / d_norm,
                                        torch.ones_like(p_norm))
                    d = d * ratio
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])
        return loss


class LinearProbe(Classifier):
    """BatchNorm (no affine) + Linear on the frozen backbone's pooled features. The backbone never trains: no
    gradients, eval mode always (so drop path and dropout are off), weights untouched."""

    stage_key = "linear"

    def __init__(self, backbone: nn.Module, num_classes: int, optim: dict):
        super().__init__(num_classes, optim)
        self.backbone = backbone.requires_grad_(False).eval()
        dim = int(backbone.num_features)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)
        self.criterion = nn.CrossEntropyLoss()

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()  # Lightning calls train() every epoch; the frozen features must not change
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).float())

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.criterion(self.logits(x), y)
        self.record_loss(loss, "training", self.loss_fix)
        return loss

    def configure_optimizers(self):
        o = self.optim_cfg
        lr = scaled_lr(o["base_lr"], self.total_batch())
        params = list(self.head.parameters())
        if o.get("optimizer", "lars") == "lars":
            opt = LARS(params, lr=lr, weight_decay=o["weight_decay"], momentum=o["momentum"],
                       trust_coefficient=o["trust_coefficient"])
        elif o["optimizer"] == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=o["momentum"], weight_decay=o["weight_decay"])
        else:
            raise FDLightError(f"linear.optimizer={o['optimizer']!r} is not known; use lars or sgd")
        warmup, total = self.schedule_steps()
        curve = WarmupSchedule(lr, 0.0, scaled_lr(o.get("min_lr", 0.0), self.total_batch()), warmup, total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, curve)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
