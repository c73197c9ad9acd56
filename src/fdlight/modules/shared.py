"""Several students distilled in one process from one teacher forward per batch (a shared-teacher sweep, docs/method.md
§1.13). Each student is the FeatureDistillation module its job would build on its own: its projector, optimizer,
schedule, gradient clipping and seeds. The teacher runs once per batch; each student then takes the step a separate
run would take, so K students trained together equal K separate runs of the same settings.

Lightning steps one optimizer per batch: `StudentOptimizers` puts the students' AdamWs behind one (the trainer counts
steps as a single run does) and `StudentSchedulers` their schedules; both save each student's state as its own, so
`split_checkpoint` turns the sweep's checkpoint into each job's (what a separate run writes) and `merge_checkpoints`
turns the jobs' checkpoints back into the sweep's."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from fdlight.data.seeded import STEP, derived_seed, seed_globals
from fdlight.errors import FDLightError
from fdlight.modules.base import FIRST_LOSS_KEY, LAST_LOSS_KEY, TrainingModule, clip_norm
from fdlight.modules.distill import FIRST_LOSSES_KEY, FeatureDistillation
from fdlight.optim import closure_loss

PREFIX = "students."
log = logging.getLogger("fdlight")


class StudentOptimizers(torch.optim.Optimizer):
    """The students' optimizers as one: `step` runs the closure once, then every student's update; `param_groups`
    and `state` are the students' own (in order), so clipping, zero_grad and device moves see every parameter."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        super().__init__(params, dict(self.optimizers[0].defaults))
        self._alias()

    def _alias(self) -> None:
        """Share the students' groups and state (load_state_dict replaces a student's own containers)."""
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self.state = {p: s for o in self.optimizers for p, s in o.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for o in self.optimizers:
            o.step()
        self._alias()  # a student's first step creates its state
        return loss

    def state_dict(self) -> dict:
        return {"students": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for o, s in zip(self.optimizers, state_dict["students"], strict=True):
            o.load_state_dict(s)
        self._alias()


class StudentSchedulers:
    """The students' lr schedules stepped together (each on its own optimizer), saved as a list of their states."""

    def __init__(self, optimizer: StudentOptimizers, schedulers: list):
        self.optimizer, self.schedulers = optimizer, list(schedulers)

    def step(self, *args) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> list[float]:
        return [lr for s in self.schedulers for lr in s.get_last_lr()]

    def state_dict(self) -> dict:
        return {"students": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for s, d in zip(self.schedulers, state_dict["students"], strict=True):
            s.load_state_dict(d)


class SharedTeacherDistillation(TrainingModule):
    """`students[k]`: job k's FeatureDistillation (built by FeatureDistillation.from_config on the shared teachers);
    `seeds[k]`: its student seed, which seeds its drop path at every step as SeededSteps seeds a separate run;
    `labels[k]`: how errors name the job."""

    def __init__(self, students: list[FeatureDistillation], seeds: list[int], labels: list[str]):
        super().__init__({})
        lead = students[0]
        if any(s.names != lead.names or any(s.teachers[n] is not lead.teachers[n] for n in s.names)
               for s in students):
            raise FDLightError("the students of a shared-teacher sweep must be built on the same teacher objects")
        self.students = nn.ModuleList(students)
        self.seeds, self.labels = [int(s) for s in seeds], list(labels)
        self.last_norms: list[torch.Tensor | None] = [None] * len(students)
        self.teacher_metrics: list[dict] = [{} for _ in students]

    @property
    def lead(self) -> FeatureDistillation:
        return self.students[0]

    def setup(self, stage: str) -> None:
        for fd in self.students:  # each student guards its own loss, which reads the trainer's step and checkpoint
            fd.trainer = self.trainer

    def on_fit_start(self) -> None:
        self.lead.place_teacher()  # the teachers are the same objects in every student
        self._memory_reported = self.device.type != "cuda"

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if not self._memory_reported:  # on a GPU, once: what K students and the teacher took on this device
            self._memory_reported = True
            log.info("peak GPU memory after the first step of %d students: %.2f GiB (rank %d)", len(self.students),
                     torch.cuda.max_memory_allocated(self.device) / 2 ** 30, self.trainer.global_rank)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch

        def seed(k: int) -> None:  # student k's draws, as SeededSteps seeds its separate run at this batch
            seed_globals(derived_seed(self.seeds[k], STEP, self.trainer.current_epoch, batch_idx,
                                      self.trainer.global_rank))

        total = None
        for k, (fd, (loss, losses)) in enumerate(zip(self.students, student_losses(self.students, x, seed))):
            if not fd.single:  # several teachers: each one's loss and share, kept and logged per job
                self.teacher_metrics[k] = fd.keep_teacher_losses(losses, loss)
            try:
                fd.track_loss(loss, "FD", "lower distill.base_lr or check the teacher weights and input data",
                              optimizers=[self.trainer.optimizers[0].optimizers[k]])
            except FDLightError as e:
                raise FDLightError(f"{self.labels[k]}: {e}") from None
            total = loss if total is None else total + loss
        self.log("train/loss_mean", total.detach() / len(self.students), prog_bar=True)  # over students
        return total

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Each student clipped by its own global norm and limit, as its separate run clips it."""
        for k, (fd, opt) in enumerate(zip(self.students, optimizer.optimizers)):
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            self.last_norms[k] = clip_norm(params, fd.optim_cfg.get("clip_grad"))

    def check_losses(self) -> None:
        for k, fd in enumerate(self.students):
            try:
                fd.check_losses()
            except FDLightError as e:
                raise FDLightError(f"{self.labels[k]}: {e}") from None

    def configure_optimizers(self):
        t = self.trainer
        built = [fd.build_optimizer(int(t.estimated_stepping_batches),
                                    fd.optim_cfg["batch_size"] * t.world_size * t.accumulate_grad_batches,
                                    fused=self.device.type == "cuda") for fd in self.students]
        opt = StudentOptimizers([o for o, _ in built])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": StudentSchedulers(opt, [s for _, s in built]),
                                                   "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_losses()  # no checkpoint holds a step after any student's non-finite loss
        checkpoint[FIRST_LOSS_KEY] = [fd.first_loss for fd in self.students]
        checkpoint[LAST_LOSS_KEY] = [fd.last_loss for fd in self.students]
        checkpoint[FIRST_LOSSES_KEY] = [dict(fd.first_losses) for fd in self.students]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        lasts = checkpoint.get(LAST_LOSS_KEY) or [None] * len(self.students)
        for fd, first, last, firsts in zip(self.students, checkpoint[FIRST_LOSS_KEY], lasts,
                                           checkpoint[FIRST_LOSSES_KEY]):
            fd.first_loss, fd.last_loss, fd.first_losses = first, last, dict(firsts or {})


def student_losses(students, x: torch.Tensor, before=None) -> list[tuple[torch.Tensor, dict]]:
    """Every student's FD loss (and its per-teacher losses) on one batch from one forward of the teachers (the
    students share them); `before(k)` runs before student k's forward (its seeding)."""
    lead = students[0]
    tokens = {n: lead.teacher_tokens(n, x) for n in lead.names}
    out = []
    for k, fd in enumerate(students):
        if before is not None:
            before(k)
        losses = fd.distill_losses(x, tokens)
        out.append((fd.weighted(losses), losses))
    return out


def split_checkpoint(checkpoint: dict, k: int) -> dict:
    """Job k's checkpoint out of the sweep's: what its separate run would have saved at this step."""
    out = {key: value for key, value in checkpoint.items()
           if key not in ("state_dict", "optimizer_states", "lr_schedulers", FIRST_LOSS_KEY, LAST_LOSS_KEY,
                          FIRST_LOSSES_KEY)}
    prefix = f"{PREFIX}{k}."
    out["state_dict"] = {name[len(prefix):]: v for name, v in checkpoint["state_dict"].items()
                         if name.startswith(prefix)}
    out["optimizer_states"] = [s["students"][k] for s in checkpoint.get("optimizer_states", [])]
    out["lr_schedulers"] = [s["students"][k] for s in checkpoint.get("lr_schedulers", [])]
    out[FIRST_LOSS_KEY] = checkpoint[FIRST_LOSS_KEY][k]
    out[LAST_LOSS_KEY] = (checkpoint.get(LAST_LOSS_KEY) or [None] * (k + 1))[k]
    out[FIRST_LOSSES_KEY] = checkpoint[FIRST_LOSSES_KEY][k]
    return out


def merge_checkpoints(checkpoints: list[dict]) -> dict:
    """The sweep's checkpoint out of its jobs' (split_checkpoint's inverse); the loops come from job 0's."""
    steps = [c.get("global_step") for c in checkpoints]
    if len(set(steps)) > 1:
        raise FDLightError(f"the jobs' checkpoints are at different steps ({', '.join(map(str, steps))}): the sweep "
                           f"was stopped while it wrote them; resume each job on its own with the basic launcher, or "
                           f"start the sweep again in a new hydra.sweep.dir")
    out = dict(checkpoints[0])
    out["state_dict"] = {f"{PREFIX}{k}.{name}": v for k, c in enumerate(checkpoints)
                         for name, v in c["state_dict"].items()}
    out["optimizer_states"] = [{"students": [c["optimizer_states"][0] for c in checkpoints]}]
    out["lr_schedulers"] = [{"students": [c["lr_schedulers"][0] for c in checkpoints]}]
    out[FIRST_LOSS_KEY] = [c.get(FIRST_LOSS_KEY) for c in checkpoints]
    out[LAST_LOSS_KEY] = [c.get(LAST_LOSS_KEY) for c in checkpoints]
    out[FIRST_LOSSES_KEY] = [c.get(FIRST_LOSSES_KEY) or {} for c in checkpoints]
    return out
