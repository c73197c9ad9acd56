"""The feature-distillation LightningModule (docs/method.md §1): student -> 1x1 projector -> smooth-L1 against the
teacher's whitened token map; with several teachers (§1.11), one adaptor and one whitening per teacher and the
weighted sum of their losses. Teachers are held outside the module tree, so they are never in the optimizer, a
checkpoint, an FSDP unit or a DDP bucket; the adaptors and PHI-S statistics are."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig
from timm.layers import DropPath

from fdlight.config import group_config, several_teachers, student_seed, teacher_configs
from fdlight.constants import IMAGENET_MEAN, IMAGENET_STD
from fdlight.errors import FDLightError, check
from fdlight.models.adaptors import ADAPTORS, HeadSpec, build_adaptor
from fdlight.models.attention import set_attention
from fdlight.models.drop_path import set_drop_path_mode
from fdlight.models.layout import TokenLayout, check_grids, resample_grid, timm_tokens
from fdlight.models.students import build_student, check_drop_path, student_layout
from fdlight.models.teachers import Teacher, build_teacher
from fdlight.models.whitening import PhiS, check_hadamard_order
from fdlight.modules.base import TrainingModule
from fdlight.optim import adamw_with_schedule, original_ndims, param_groups, scaled_lr

WHITENINGS = ("fd_ln", "none", "phi_s")
ALIGNS = ("teacher_to_student", "student_to_teacher")  # which map is resized when the grids differ (null: refused)
FIRST_LOSSES_KEY = "fdlight_first_teacher_losses"


def whiten(target: torch.Tensor, method: str, eps: float = 1e-5) -> torch.Tensor:
    """FD whitening: per-token standardisation over channels (a LayerNorm without affine), in fp32."""
    if method == "fd_ln":
        return F.layer_norm(target.float(), target.shape[-1:], eps=eps)
    if method == "none":
        return target.float()
    raise FDLightError(f"unknown whitening {method!r}; use whitening=fd_ln or whitening=none")


class Whitening(nn.Module):
    """One teacher's target whitening: the stateless fd_ln / none, or PHI-S with its statistics as buffers."""

    def __init__(self, method: str, dim: int, eps: float, phi_s_batches: int):
        super().__init__()
        self.method, self.eps = method, eps
        self.phi_s = PhiS(dim, phi_s_batches, eps) if method == "phi_s" else None

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        return self.phi_s(target) if self.phi_s is not None else whiten(target, self.method, self.eps)


@dataclass(frozen=True)
class TargetSpec:
    """One teacher's part of the objective (the keys of conf/teacher/_base.yaml, the whitening resolved)."""
    whitening: str = "fd_ln"
    eps: float = 1e-5
    adaptor: str = "linear"
    loss_weight: float = 1.0
    resample_tokens: bool = False
    phi_s_batches: int = 100


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def target_spec(tcfg: DictConfig, whitening: DictConfig, who: str) -> TargetSpec:
    """A teacher config's TargetSpec, each key checked; a whitening other than the run's takes its shipped eps."""
    method = tcfg.get("whitening") or whitening.name
    check(method in WHITENINGS, f"{who}.whitening={method!r} is unknown; choose one of: {', '.join(WHITENINGS)}")
    eps = whitening.eps if method == whitening.name else group_config("whitening", method).eps
    weight, batches = tcfg.get("loss_weight", 1.0), whitening.get("phi_s_batches", 100)
    adaptor, resample = tcfg.get("adaptor", "linear"), tcfg.get("resample_tokens", False)
    check(_number(weight) and weight >= 0, f"{who}.loss_weight={weight!r} must be a number >= 0 (1.0: the default)")
    check(adaptor in ADAPTORS, f"{who}.adaptor={adaptor!r} is unknown; choose one of: {', '.join(ADAPTORS)}")
    check(isinstance(resample, bool), f"{who}.resample_tokens={resample!r} must be true or false")
    check(isinstance(batches, int) and not isinstance(batches, bool) and batches >= 1,
          f"whitening.phi_s_batches={batches!r} must be a whole number >= 1")
    return TargetSpec(method, eps, adaptor, float(weight), resample, batches)


def target_specs(cfg: DictConfig) -> dict[str, TargetSpec]:
    """{teacher: TargetSpec} of a config, in the teachers' order; some loss weight must be > 0."""
    many = several_teachers(cfg)
    specs = {name: target_spec(t, cfg.whitening, f"teacher.{name}" if many else "teacher")
             for name, t in teacher_configs(cfg).items()}
    check(any(s.loss_weight > 0 for s in specs.values()),
          "every teacher's loss_weight is 0, so nothing would be learned; give a teacher a weight > 0")
    return specs


def fd_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Smooth-L1 with beta (2.0 in FD), mean over every batch x token x channel entry, in fp32."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)


class FeatureDistillation(TrainingModule):
    """`teacher`: one Teacher (the paper's setting: `projector`, `whitener`) or {name: Teacher} (several teachers:
    `projectors[name]`, `whiteners[name]`). `targets` gives each teacher's TargetSpec (default: `whitening`,
    `whitening_eps`, a linear adaptor, weight 1). `compile_loss` runs the loss (student forward, teacher targets,
    smooth-L1) through torch.compile."""

    def __init__(self, student: nn.Module, student_layout: TokenLayout, teacher: Teacher | Mapping[str, Teacher],
                 optim: dict, whitening: str = "fd_ln", whitening_eps: float = 1e-5, loss_beta: float = 2.0,
                 include_prefix_tokens: bool = True, teacher_resize: str = "bilinear",
                 no_decay_keywords=(), teacher_drop_path: bool = False, compile_loss: bool = False,
                 targets: Mapping[str, TargetSpec] | None = None, align: str | None = None):
        super().__init__(optim)
        single = isinstance(teacher, Teacher)
        teachers = {teacher.name: teacher} if single else dict(teacher)
        specs = dict(targets) if targets is not None else {n: TargetSpec(whitening, whitening_eps) for n in teachers}
        check(list(specs) == list(teachers), f"targets name {list(specs)} but the teachers are {list(teachers)}")
        check(loss_beta >= 0, f"distill.loss_beta={loss_beta} must be >= 0 (the paper's smooth-L1 uses 2.0; 0 is L1)")
        check_align(align)
        for name, t in teachers.items():
            check_target(specs[name], student_layout, t.layout, "teacher" if single else f"teacher.{name}", align)
        check(any(s.loss_weight > 0 for s in specs.values()),
              "every teacher's loss_weight is 0, so nothing would be learned; give a teacher a weight > 0")
        self.student = student
        heads = {n: build_adaptor(specs[n].adaptor, student_layout.dim, t.layout.dim) for n, t in teachers.items()}
        whiteners = {n: Whitening(specs[n].whitening, t.layout.dim, specs[n].eps, specs[n].phi_s_batches)
                     for n, t in teachers.items()}
        if single:  # the paper's layout: checkpoint keys projector.*, as always
            self.projector, self.whitener = heads[teacher.name], whiteners[teacher.name]
        else:
            self.projectors, self.whiteners = nn.ModuleDict(heads), nn.ModuleDict(whiteners)
        self.param_ndims = original_ndims(self)  # before any FSDP wrapping flattens them
        self.single, self.specs = single, specs
        object.__setattr__(self, "teachers", teachers)  # deliberately not submodules
        if single:
            object.__setattr__(self, "teacher", teacher)
        self.student_layout = student_layout
        self.whitening, self.whitening_eps, self.loss_beta = whitening, whitening_eps, loss_beta
        self.teacher_resize, self.no_decay_keywords = teacher_resize, tuple(no_decay_keywords)
        self.teacher_drop_path = teacher_drop_path
        self.prefix_in_loss = {n: include_prefix_tokens and student_layout.prefix_tokens == t.layout.prefix_tokens
                               for n, t in teachers.items()}
        # which side of each pair is resized when the grids differ (equal grids: neither, the paper's path)
        self.resample_teacher = {n: specs[n].resample_tokens or align == "teacher_to_student" for n in teachers}
        self.resample_student = {n: align == "student_to_teacher" and not self.resample_teacher[n] for n in teachers}
        # Student input is ImageNet-normalised; each teacher gets its own statistics: x_t = x * a + b per channel.
        mean_in, std_in = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        stats = [(t.mean.cpu(), t.std.cpu()) for t in teachers.values()]
        self.register_buffer("renorm_scale", torch.stack([std_in / s for _, s in stats]), persistent=False)
        self.register_buffer("renorm_shift", torch.stack([(mean_in - m) / s for m, s in stats]), persistent=False)
        self.first_losses: dict[str, float] = {}
        self.last_losses: dict[str, float] = {}
        self.validated_step = -1  # the global step the latest held-out evaluation saw
        self.distill_losses = torch.compile(self._distill_losses) if compile_loss else self._distill_losses
        self.distill_loss = torch.compile(self._distill_loss) if compile_loss else self._distill_loss

    @classmethod
    def from_config(cls, cfg: DictConfig, student: nn.Module | None = None, train: bool = True,
                    compile: bool = False, teachers: Mapping[str, Teacher] | None = None) -> "FeatureDistillation":
        """The module of a composed config (or a distillation run's config.yaml), one teacher or several.
        `student`: a model already built (and loaded) instead of a fresh one with the config's drop path, drop-path
        mode and attention kernel, drawn under the student seed (config.student_seed; the adaptors' init follows).
        `train=False` evaluates a fixed student: no optimizer settings and no teacher drop path. `teachers`: the
        config's teachers already built (a shared-teacher sweep builds them once for every student)."""
        dp_teacher = check_drop_path(cfg.drop_path.teacher, "drop_path.teacher") if train else 0.0
        specs = target_specs(cfg)
        seed = int(cfg.get("seed", 0))
        if teachers is None:
            teachers = {n: build_teacher(t, drop_path=dp_teacher, seed=seed) for n, t in teacher_configs(cfg).items()}
        if student is None:
            torch.manual_seed(student_seed(cfg))
            student = build_student(cfg.student, drop_path=cfg.drop_path.student)
            set_drop_path_mode(student, cfg.drop_path.mode)
            set_attention(student, cfg.trainer.attention)
        d = cfg.distill
        optim = dict(batch_size=d.batch_size, base_lr=d.base_lr, warmup_lr=d.warmup_lr, min_lr=d.min_lr,
                     warmup_epochs=d.warmup_epochs, epochs=d.epochs, weight_decay=d.weight_decay,
                     betas=list(d.betas), clip_grad=d.clip_grad) if train else {}
        teacher = teachers if several_teachers(cfg) else next(iter(teachers.values()))
        return cls(student, student_layout(cfg.student, student), teacher, optim, whitening=cfg.whitening.name,
                   whitening_eps=cfg.whitening.eps, loss_beta=d.loss_beta,
                   include_prefix_tokens=d.include_prefix_tokens, teacher_resize=d.teacher_resize,
                   no_decay_keywords=cfg.student.no_decay_keywords, teacher_drop_path=dp_teacher > 0,
                   compile_loss=compile, targets=specs, align=d.get("align"))

    # ------------------------------------------------------------------------------------------- per teacher
    @property
    def names(self) -> list[str]:
        return list(self.teachers)

    def head(self, name: str) -> tuple[nn.Module, Whitening]:
        """(adaptor, whitening) of one teacher."""
        if self.single:
            return self.projector, self.whitener
        return self.projectors[name], self.whiteners[name]

    def head_spec(self, name: str) -> HeadSpec:
        """What load_adaptors needs to rebuild this teacher's head (fdlight.models.adaptors)."""
        s, t = self.specs[name], self.teachers[name]
        return HeadSpec(s.adaptor, self.student_layout.dim, t.layout.dim, s.whitening,
                        self.student_layout.prefix_tokens, self.prefix_in_loss[name], self.student_layout.grid,
                        s.loss_weight, t.name)

    def _only(self) -> str:
        check(self.single, f"this module distils {len(self.teachers)} teachers; use targets() / predictions()")
        return self.names[0]

    # ------------------------------------------------------------------------------------------------- the step
    def teacher_input(self, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
        i = self.names.index(name or self._only())
        x = x * self.renorm_scale[i] + self.renorm_shift[i]
        size = self.teachers[self.names[i]].layout.img_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode=self.teacher_resize, align_corners=False)
        return x

    @torch.no_grad()
    def teacher_tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One teacher's every token (prefix + its own grid), before whitening, for an ImageNet-normalised batch at
        the student's resolution: what a shared-teacher sweep computes once for students of any grid."""
        teacher = self.teachers[name]
        return teacher(self.teacher_input(x, name).to(teacher.mean.dtype))

    def paired(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A teacher's tokens as this student's loss pairs them: its prefix dropped unless the student has as many,
        its map resized to the student's grid when that side is resampled."""
        prefix = self.teachers[name].layout.prefix_tokens
        if not self.prefix_in_loss[name]:
            t, prefix = t[:, prefix:], 0
        if self.resample_teacher[name]:
            t = resample_grid(t, prefix, self.student_layout.grid)
        return t

    @torch.no_grad()
    def target_of(self, name: str, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One teacher's whitened tokens (`tokens`: its teacher_tokens, when already computed)."""
        return self.head(name)[1](self.paired(name, self.teacher_tokens(name, x) if tokens is None else tokens))

    def targets(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every teacher's target, one teacher after the other on the same batch."""
        return {n: self.target_of(n, x) for n in self.names}

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_of(self._only(), x)

    def prediction_of(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        """One teacher's adaptor on the student's tokens (patch tokens only when the prefix is out of its loss)."""
        if not self.prefix_in_loss[name]:
            tokens = tokens[:, self.student_layout.prefix_tokens:]
        pred = self.head(name)[0](tokens)
        if self.resample_student[name]:  # after the 1x1 projector (both linear: the same map), on fewer channels
            prefix = self.student_layout.prefix_tokens if self.prefix_in_loss[name] else 0
            pred = resample_grid(pred, prefix, self.teachers[name].layout.grid)
        return pred

    def predictions(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every adaptor's prediction from one student forward."""
        tokens = timm_tokens(self.student, x)
        return {n: self.prediction_of(n, tokens) for n in self.names}

    def prediction(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_of(self._only(), timm_tokens(self.student, x))

    def _distill_losses(self, x: torch.Tensor, tokens: Mapping[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
        """{teacher: its FD loss}, unweighted; the student runs first, as in the single-teacher step. `tokens`:
        each teacher's teacher_tokens of `x`, when another module computed them (a shared-teacher sweep)."""
        preds = self.predictions(x)
        return {n: fd_loss(preds[n], self.target_of(n, x, None if tokens is None else tokens[n]), self.loss_beta)
                for n in self.names}

    def weighted(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: sum over teachers of loss_weight x loss."""
        return sum(self.specs[n].loss_weight * losses[n] for n in self.names)

    def _distill_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.weighted(self._distill_losses(x))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        losses = self.distill_losses(x)
        loss = self.weighted(losses)
        self.record_loss(loss, "FD", "lower distill.base_lr or check the teacher weights and input data")
        if not self.single:
            self.record_teacher_losses(losses, loss)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        """The FD loss on the held-out images (data=images' data.val_root or data.val_fraction)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.log("val/loss", self._distill_loss(x), sync_dist=True, batch_size=x.shape[0])

    def on_validation_epoch_end(self) -> None:
        self.validated_step = self.global_step

    def record_teacher_losses(self, losses: Mapping[str, torch.Tensor], total: torch.Tensor) -> None:
        """Log each teacher's loss and its weighted share of the total; keep its first and last value."""
        for key, value in self.keep_teacher_losses(losses, total).items():
            self.log(key, value)

    def keep_teacher_losses(self, losses: Mapping[str, torch.Tensor], total: torch.Tensor) -> dict[str, float]:
        """Keep each teacher's first and last loss; what to log: its loss and its weighted share of the total."""
        *values, whole = torch.stack([*(losses[n].detach().float() for n in self.names),
                                      total.detach().float()]).tolist()  # one device sync for all
        logged = {}
        for n, v in zip(self.names, values):
            self.first_losses.setdefault(n, v)
            self.last_losses[n] = v
            logged[f"train/loss/{n}"] = v
            logged[f"train/loss_share/{n}"] = self.specs[n].loss_weight * v / whole if whole > 0 else 0.0
        return logged

    def teacher_losses(self) -> dict[str, dict]:
        """{teacher: loss weight, whitening, adaptor, first and last loss} for metrics.json."""
        return {n: {"loss_weight": s.loss_weight, "whitening": s.whitening, "adaptor": s.adaptor,
                    "resample_tokens": s.resample_tokens, "first_loss": self.first_losses.get(n),
                    "last_loss": self.last_losses.get(n)} for n, s in self.specs.items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[FIRST_LOSSES_KEY] = dict(self.first_losses)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.first_losses = dict(checkpoint.get(FIRST_LOSSES_KEY) or {})

    # ------------------------------------------------------------------------------------- teacher bookkeeping
    def place_teacher(self) -> None:
        """Move every teacher beside the student; bf16 weights when the run computes in bf16."""
        precision = str(getattr(self.trainer, "precision", "32")) if self._trainer is not None else "32"
        dtype = torch.bfloat16 if "bf16" in precision and self.device.type == "cuda" else torch.float32
        for teacher in self.teachers.values():
            teacher.to(device=self.device, dtype=dtype).freeze()
            if self.teacher_drop_path:  # symmetric-drop-path ablation: only the DropPath layers train
                for m in teacher.modules():
                    if isinstance(m, DropPath):
                        nn.Module.train(m, True)

    def on_fit_start(self) -> None:
        self.place_teacher()

    # ---------------------------------------------------------------------------------------------- optimizer
    def build_optimizer(self, total_steps: int, total_batch: int, fused: bool = False):
        """AdamW over student + projector(s) (official no-decay rules) and the per-step warmup + cosine schedule,
        with every lr scaled by total_batch / 512."""
        o = self.optim_cfg
        named = [("student." + n, p) for n, p in self.student.named_parameters()]
        for name in self.names:
            prefix = "projector." if self.single else f"projectors.{name}."
            named += [(prefix + n, p) for n, p in self.head(name)[0].named_parameters()]
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


def check_align(align) -> None:
    check(align is None or align in ALIGNS, f"distill.align={align!r} is unknown; use {' or '.join(ALIGNS)} (or null: "
                                            f"the grids must be equal, as in the paper)")


def check_target(spec: TargetSpec, student: TokenLayout, teacher: TokenLayout, who: str,
                 align: str | None = None) -> None:
    """A teacher's grid fits the student's (or one of them is resampled), its whitening has what it needs."""
    if not spec.resample_tokens and align is None:
        check_grids(student, teacher, who=who)
    check(spec.whitening != "fd_ln" or spec.eps > 0,
          f"whitening.eps={spec.eps} must be > 0 (the paper's LayerNorm whitening uses 1e-5)")
    if spec.whitening == "phi_s":
        check_hadamard_order(teacher.dim, who)
