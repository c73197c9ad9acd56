"""The feature-distillation LightningModule (docs/method.md §1): student -> 1x1 projector -> smooth-L1 against the
teacher's whitened token map. The teacher is held outside the module tree, so it is never in the optimizer, a
checkpoint, an FSDP unit or a DDP bucket."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig
from timm.layers import DropPath

from fdlight.constants import IMAGENET_MEAN, IMAGENET_STD
from fdlight.errors import FDLightError, check
from fdlight.models.attention import set_attention
from fdlight.models.drop_path import set_drop_path_mode
from fdlight.models.layout import TokenLayout, check_grids, timm_tokens
from fdlight.models.students import build_student, check_drop_path, student_layout
from fdlight.models.teachers import Teacher, build_teacher
from fdlight.modules.base import TrainingModule
from fdlight.optim import adamw_with_schedule, original_ndims, param_groups, scaled_lr


def whiten(target: torch.Tensor, method: str, eps: float = 1e-5) -> torch.Tensor:
    """FD whitening: per-token standardisation over channels (a LayerNorm without affine), in fp32."""
    if method == "fd_ln":
        return F.layer_norm(target.float(), target.shape[-1:], eps=eps)
    if method == "none":
        return target.float()
    raise FDLightError(f"unknown whitening {method!r}; use whitening=fd_ln or whitening=none")


def fd_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Smooth-L1 with beta (2.0 in FD), mean over every batch x token x channel entry, in fp32."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)


class FeatureDistillation(TrainingModule):
    """`compile_loss` runs the loss (student forward, teacher target, smooth-L1) through torch.compile."""

    def __init__(self, student: nn.Module, student_layout: TokenLayout, teacher: Teacher, optim: dict,
                 whitening: str = "fd_ln", whitening_eps: float = 1e-5, loss_beta: float = 2.0,
                 include_prefix_tokens: bool = True, teacher_resize: str = "bilinear",
                 no_decay_keywords=(), teacher_drop_path: bool = False, compile_loss: bool = False):
        super().__init__(optim)
        check_grids(student_layout, teacher.layout)
        check(whitening != "fd_ln" or whitening_eps > 0,
              f"whitening.eps={whitening_eps} must be > 0 (the paper's LayerNorm whitening uses 1e-5)")
        check(loss_beta >= 0, f"distill.loss_beta={loss_beta} must be >= 0 (the paper's smooth-L1 uses 2.0; 0 is L1)")
        self.student = student
        self.projector = nn.Linear(student_layout.dim, teacher.layout.dim)  # == Conv1d(k=1) over tokens
        self.param_ndims = original_ndims(self)  # before any FSDP wrapping flattens them
        object.__setattr__(self, "teacher", teacher)  # deliberately not a submodule
        self.student_layout = student_layout
        self.whitening, self.whitening_eps, self.loss_beta = whitening, whitening_eps, loss_beta
        self.teacher_resize, self.no_decay_keywords = teacher_resize, tuple(no_decay_keywords)
        self.teacher_drop_path = teacher_drop_path
        same_prefix = student_layout.prefix_tokens == teacher.layout.prefix_tokens
        self.prefix_in_loss = include_prefix_tokens and same_prefix
        # Student input is ImageNet-normalised; the teacher gets its own statistics: x_t = x * a + b per channel.
        mean_in, std_in = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("renorm_scale", (std_in / teacher.std.cpu()), persistent=False)
        self.register_buffer("renorm_shift", ((mean_in - teacher.mean.cpu()) / teacher.std.cpu()), persistent=False)
        self.distill_loss = torch.compile(self._distill_loss) if compile_loss else self._distill_loss

    @classmethod
    def from_config(cls, cfg: DictConfig, student: nn.Module | None = None, train: bool = True,
                    compile: bool = False) -> "FeatureDistillation":
        """The module of a composed config (or a distillation run's config.yaml). `student`: a model already built
        (and loaded) instead of a fresh one with the config's drop path, drop-path mode and attention kernel.
        `train=False` evaluates a fixed student: no optimizer settings and no teacher drop path."""
        dp_teacher = check_drop_path(cfg.drop_path.teacher, "drop_path.teacher") if train else 0.0
        teacher = build_teacher(cfg.teacher, drop_path=dp_teacher, seed=int(cfg.get("seed", 0)))
        if student is None:
            student = build_student(cfg.student, drop_path=cfg.drop_path.student)
            set_drop_path_mode(student, cfg.drop_path.mode)
            set_attention(student, cfg.trainer.attention)
        d = cfg.distill
        optim = dict(batch_size=d.batch_size, base_lr=d.base_lr, warmup_lr=d.warmup_lr, min_lr=d.min_lr,
                     warmup_epochs=d.warmup_epochs, epochs=d.epochs, weight_decay=d.weight_decay,
                     betas=list(d.betas), clip_grad=d.clip_grad) if train else {}
        return cls(student, student_layout(cfg.student, student), teacher, optim, whitening=cfg.whitening.name,
                   whitening_eps=cfg.whitening.eps, loss_beta=d.loss_beta,
                   include_prefix_tokens=d.include_prefix_tokens, teacher_resize=d.teacher_resize,
                   no_decay_keywords=cfg.student.no_decay_keywords, teacher_drop_path=dp_teacher > 0,
                   compile_loss=compile)

    # ------------------------------------------------------------------------------------------------- the step
    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.renorm_scale + self.renorm_shift
        size = self.teacher.layout.img_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode=self.teacher_resize, align_corners=False)
        return x

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Whitened teacher tokens for an ImageNet-normalised batch at the student's resolution."""
        t = self.teacher(self.teacher_input(x).to(self.teacher.mean.dtype))
        if not self.prefix_in_loss:
            t = t[:, self.teacher.layout.prefix_tokens:]
        return whiten(t, self.whitening, self.whitening_eps)

    def prediction(self, x: torch.Tensor) -> torch.Tensor:
        z = timm_tokens(self.student, x)
        if not self.prefix_in_loss:
            z = z[:, self.student_layout.prefix_tokens:]
        return self.projector(z)

    def _distill_loss(self, x: torch.Tensor) -> torch.Tensor:
        return fd_loss(self.prediction(x), self.target(x), self.loss_beta)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        loss = self.distill_loss(x)
        self.record_loss(loss, "FD", "lower distill.base_lr or check the teacher weights and input data")
        return loss

    # ------------------------------------------------------------------------------------- teacher bookkeeping
    def place_teacher(self) -> None:
        """Move the teacher beside the student; bf16 weights when the run computes in bf16."""
        precision = str(getattr(self.trainer, "precision", "32")) if self._trainer is not None else "32"
        dtype = torch.bfloat16 if "bf16" in precision and self.device.type == "cuda" else torch.float32
        self.teacher.to(device=self.device, dtype=dtype).freeze()
        if self.teacher_drop_path:  # symmetric-drop-path ablation: only the DropPath layers train
            for m in self.teacher.modules():
                if isinstance(m, DropPath):
                    nn.Module.train(m, True)

    def on_fit_start(self) -> None:
        self.place_teacher()

    # ---------------------------------------------------------------------------------------------- optimizer
    def build_optimizer(self, total_steps: int, total_batch: int, fused: bool = False):
        """AdamW over student + projector (official no-decay rules) and the per-step warmup + cosine schedule,
        with every lr scaled by total_batch / 512."""
        o = self.optim_cfg
        named = [("student." + n, p) for n, p in self.student.named_parameters()]
        named += [("projector." + n, p) for n, p in self.projector.named_parameters()]
        groups = param_groups(named, o["weight_decay"], self.no_decay_keywords, ndims=self.param_ndims)
        warmup = int(round(total_steps * o["warmup_epochs"] / max(o["epochs"], 1)))
        return adamw_with_schedule(
            groups, scaled_lr(o["base_lr"], total_batch), scaled_lr(o["warmup_lr"], total_batch),
            scaled_lr(o["min_lr"], total_batch), warmup, total_steps, o["betas"], fused=fused)

    def configure_optimizers(self):
        t = self.trainer
        total_batch = self.optim_cfg["batch_size"] * t.world_size * t.accumulate_grad_batches
        opt, sched = self.build_optimizer(int(t.estimated_stepping_batches), total_batch,
                                          fused=self.device.type == "cuda")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
