"""What a shared-teacher sweep's jobs may differ in (docs/method.md §1.13), checked on their configs alone: the
Hydra launcher runs these checks before torch loads, so a sweep that cannot share its teacher is refused at once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fdlight.config import GROUPS
from fdlight.errors import FDLightError, check
from fdlight.runs.directory import leaves

# Settings that may differ between the jobs: they change a student, not the teacher's output or the batches.
STUDENT_SIDE = ("student", "drop_path.student", "drop_path.mode", "distill.base_lr", "distill.warmup_lr",
                "distill.min_lr", "distill.weight_decay", "distill.betas", "distill.clip_grad", "distill.loss_beta",
                "distill.student_seed")
# ... except these, which change the batches (the crop's size) or are not results at all.
BATCH_SIDE = ("student.img_size",)
IGNORED = ("resume", "resume_allow_changes")


@dataclass
class Job:
    """One job of the sweep: its config (Hydra's node removed), its directory and how messages name it."""
    cfg: DictConfig
    run_dir: Path
    label: str


def student_side(key: str) -> bool:
    def under(k, keys):
        return any(k == f or k.startswith(f + ".") for f in keys)
    return under(key, STUDENT_SIDE) and not under(key, BATCH_SIDE)


def check_stages(jobs: list[Job]) -> None:
    for job in jobs:
        check(job.cfg.get("stage") == "distill",
              f"hydra/launcher=shared_teacher shares a distillation teacher, but {job.label} is "
              f"stage={job.cfg.get('stage')}; sweep other stages without hydra/launcher=shared_teacher")


def differing(jobs: list[Job]) -> tuple[str, list] | None:
    """The first setting that is not student-side and differs between the jobs, as the user would name it (a config
    group's choice, `teacher=tiny_b`, rather than one of the keys it sets), with its values."""
    flat = [leaves(OmegaConf.to_container(j.cfg, resolve=True)) for j in jobs]
    for key in sorted(set().union(*flat)):
        values = [lv.get(key, "<unset>") for lv in flat]
        if any(v != values[0] for v in values) and not student_side(key) and key not in IGNORED:
            group = key.split(".")[0]
            names = [lv.get(f"{group}.name") for lv in flat]
            if group in GROUPS and any(n != names[0] for n in names):
                return f"{group}=", names
            return key, values
    return None


def check_shared(jobs: list[Job]) -> None:
    """Refuse, in one line, a sweep whose jobs cannot share the teacher, the batches and the trainer."""
    found = differing(jobs)
    if found is not None:
        key, values = found
        hint = "; vary the student's own seed with distill.student_seed (the data follow seed)" if key == "seed" else ""
        shown = ", ".join(dict.fromkeys(str(v) for v in values))
        raise FDLightError(f"hydra/launcher=shared_teacher runs every job on one teacher, one data stream and one "
                           f"trainer, so {key} must be the same in every job (the sweep has {shown}); sweep it "
                           f"without hydra/launcher=shared_teacher{hint}")
    lead = jobs[0].cfg
    check(float(lead.drop_path.teacher) == 0.0,
          f"drop_path.teacher={lead.drop_path.teacher} makes the teacher's output random per job, so it cannot be "
          f"shared; use drop_path=asymmetric (teacher 0) or sweep without hydra/launcher=shared_teacher")
    check(lead.trainer.strategy != "fsdp", "hydra/launcher=shared_teacher holds every student whole on each device; "
                                          "use trainer=ddp or one device, or sweep without it under trainer=fsdp")
    check(lead.resume in (True, False), f"resume={lead.resume}: a shared-teacher sweep resumes with resume=true "
                                        f"(each job from its own checkpoints/last.ckpt)")


def check_jobs(jobs: list[Job]) -> None:
    """Every rule above, in the order a user would fix them."""
    check_stages(jobs)
    check_shared(jobs)
