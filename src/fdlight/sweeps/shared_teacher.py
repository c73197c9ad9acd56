"""A distillation sweep run as one process (`-m ... hydra/launcher=shared_teacher`): one data stream and one teacher
forward per batch for K students, each job's directory holding what its separate run would write (docs/method.md
§1.13). The Hydra launcher (hydra_plugins.fdlight_launcher) hands each job's config and directory to `run`.

Only student-side settings may differ between the jobs (fdlight.sweeps.rules); anything that changes the teacher's
output or the batches must be the same, or the sweep is refused in one line before any directory is made."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from fdlight.artifacts import save_torch, write_text
from fdlight.config import student_seed, teacher_configs
from fdlight.console import finish_wandb, job as console_job
from fdlight.errors import FDLightError, check
from fdlight.models.students import block_classes
from fdlight.models.teachers import build_teacher
from fdlight.modules.distill import FeatureDistillation
from fdlight.modules.shared import SharedTeacherDistillation, merge_checkpoints, split_checkpoint
from fdlight.runs.callbacks import Throughput
from fdlight.runs.directory import Claim, claim, exclusive, is_secondary_rank, save_config
from fdlight.runs.monitor import build_monitor, check_monitor
from fdlight.runs.gather import full_state_dict
from fdlight.runs.template import Training, worker_error
from fdlight.runs.trainer import AtomicCheckpointIO, build_logger, build_trainer, cpu_threads, on_gpu
from fdlight.runs.world import peers
from fdlight.settings import check_sections
from fdlight.stages.distill import STAGE as DISTILL, distill_data
from fdlight.sweeps.rules import Job, check_jobs

log = logging.getLogger("fdlight")

def claim_all(jobs: list[Job]) -> list[Claim]:
    """Claim every job's directory; they all start, all resume, or are all complete."""
    claims = []
    for j in jobs:
        try:
            claims.append(claim(j.cfg, j.run_dir, dir_key="hydra.sweep.dir"))
        except FDLightError as e:
            raise FDLightError(f"{j.label}: {e}") from None
    kinds = {("complete" if c.finished is not None else "resume" if c.resume_from else "new") for c in claims}
    if len(kinds) > 1:
        state = ["complete" if c.finished is not None else "checkpoint" if c.resume_from else "new" for c in claims]
        found = ", ".join(f"{j.label}: {s}" for j, s in zip(jobs, state))
        raise FDLightError(f"the sweep's job directories are at different points ({found}); resume each job on its "
                           f"own, without hydra/launcher=shared_teacher")
    return claims


COMMIT = ".sweep-commit"  # in job 0's checkpoints/: every job's next checkpoint is complete


def pending(path: Path) -> Path:
    return path.with_name(f".{path.name}.next")


class JobCheckpoints(AtomicCheckpointIO):
    """The sweep's checkpoints saved as each job's own (split_checkpoint) under the same name in its directory, and
    read back from them; the trainer's checkpoint callback writes to job 0's directory.

    The K files change together: each job's new checkpoint is written beside the old one (`.last.ckpt.next`), then
    a commit mark, then the renames. A sweep killed before the mark keeps every old checkpoint; one killed during
    the renames is completed by `settle` when it resumes. Either way every job resumes from the same step."""

    def __init__(self, run_dirs: list[Path]):
        super().__init__()
        self.lead, self.run_dirs = run_dirs[0], run_dirs

    def paths(self, path) -> list[Path]:
        rel = Path(path).resolve().relative_to(self.lead.resolve())
        return [d / rel for d in self.run_dirs]

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        paths = self.paths(path)
        for k, p in enumerate(paths):
            p.parent.mkdir(parents=True, exist_ok=True)
            save_torch(split_checkpoint(checkpoint, k), pending(p))
        write_text(commit_mark(self.run_dirs), "\n".join(str(p) for p in paths))
        settle(self.run_dirs)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return merge_checkpoints([super(JobCheckpoints, self).load_checkpoint(p, map_location, weights_only)
                                  for p in self.paths(path)])

    def remove_checkpoint(self, path) -> None:
        for p in self.paths(path):
            p.unlink(missing_ok=True)


def commit_mark(run_dirs: list[Path]) -> Path:
    return run_dirs[0] / "checkpoints" / COMMIT


def settle(run_dirs: list[Path]) -> None:
    """Finish a committed checkpoint change (rename every job's pending file), or drop an uncommitted one."""
    mark = commit_mark(run_dirs)
    if mark.is_file():
        for p in map(Path, mark.read_text().splitlines()):
            if pending(p).is_file():
                os.replace(pending(p), p)
        mark.unlink()
    else:
        for d in run_dirs:
            for p in (d / "checkpoints").glob(".*.next"):
                p.unlink()


class JobLogs(Callback):
    """Each job's own logger (the config's, in its directory) with the step metrics a separate run logs."""

    def __init__(self, loggers: list, every: int):
        self.loggers, self.every = loggers, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every and not trainer.is_last_batch:
            return
        for k, (lg, fd, opt) in enumerate(zip(self.loggers, module.students, trainer.optimizers[0].optimizers)):
            norm = module.last_norms[k]
            values = {"train/loss": fd.last_loss, "train/lr": opt.param_groups[-1]["lr"],
                      "train/grad_norm": norm, "train/img_per_s": trainer.callback_metrics.get("train/img_per_s"),
                      "epoch": trainer.current_epoch}  # img/s: the shared step's, which every job took
            values.update(module.teacher_metrics[k])
            lg.log_metrics({n: float(v) for n, v in values.items() if v is not None}, step=trainer.global_step)

    def on_train_end(self, trainer, module) -> None:
        for lg in self.loggers:
            lg.finalize("success")
            if getattr(lg, "_experiment", None) is not None and hasattr(lg._experiment, "finish"):  # W&B: one run each
                finish_wandb(lg._experiment)


# The job whose own lines are being logged (its closing line); None: a line about the whole sweep.
CURRENT_JOB: contextvars.ContextVar[int | None] = contextvars.ContextVar("fdlight_job", default=None)


class OneJob(logging.Filter):
    """Job k's log file: the sweep's lines and job k's own, not the other jobs'."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def filter(self, record) -> bool:
        return CURRENT_JOB.get() in (None, self.k)


@contextlib.contextmanager
def job_log_files(jobs: list[Job]):
    """Every job's directory gets its log (fdlight.log), as a separate run gets its own: the sweep's lines (the
    shared training) and the job's own."""
    root = logging.getLogger()
    handlers = []
    for k, job in enumerate(jobs):
        job.run_dir.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(job.run_dir / "fdlight.log")
        h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s] %(message)s"))
        h.addFilter(OneJob(k))
        root.addHandler(h)
        handlers.append(h)
    try:
        yield
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()


def state_bytes(module: torch.nn.Module) -> int:
    """A student's trainable weights with their gradients and AdamW's two moments."""
    return 4 * sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def size(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def check_memory(cfg: DictConfig, students: list[FeatureDistillation]) -> None:
    """Log what each student holds; on a GPU, refuse K students whose weights and optimizer state alone exceed the
    free memory (activations come on top)."""
    per = [state_bytes(fd) for fd in students]
    log.info("weights, gradients and AdamW state of each student: %s (the teacher comes once on top)",
             ", ".join(f"job {k} {size(b)}" for k, b in enumerate(per)))
    if on_gpu(cfg.trainer):
        free, _ = torch.cuda.mem_get_info()
        check(sum(per) < free, f"{len(students)} students need {sum(per) / 2 ** 30:.1f} GiB for weights, gradients and "
                               f"AdamW state alone, more than the {free / 2 ** 30:.1f} GiB free on the GPU; share the "
                               f"teacher among fewer jobs at a time with hydra.sweeper.max_batch_size=N")


def build(jobs: list[Job]) -> tuple[SharedTeacherDistillation, L.LightningDataModule]:
    """One DataModule and the teachers from job 0's config; each student as its separate run builds it."""
    lead = jobs[0].cfg
    data = distill_data(lead)
    data.setup()
    teachers = {n: build_teacher(t, drop_path=0.0, seed=int(lead.seed)) for n, t in teacher_configs(lead).items()}
    students = [FeatureDistillation.from_config(j.cfg, compile=bool(lead.trainer.compile), teachers=teachers)
                for j in jobs]
    check_memory(lead, students)
    return SharedTeacherDistillation(students, [student_seed(j.cfg) for j in jobs], [j.label for j in jobs]), data


def run(jobs: list[Job]) -> list[dict]:
    """Train the jobs' students together; each job's metrics (what its metrics.json holds)."""
    check_jobs(jobs)  # the launcher has run them already; a caller of run() may not have
    lead = jobs[0].cfg
    with cpu_threads(lead, lead.distill):
        L.seed_everything(lead.seed, workers=True, verbose=False)
        for job in jobs:
            try:
                check_sections(job.cfg)
                check_monitor(job.cfg.monitor)
                DISTILL.validate(job.cfg)
            except FDLightError as e:
                raise FDLightError(f"{job.label}: {e}") from None
        new = [j.run_dir for j in jobs if not j.run_dir.exists()]
        with contextlib.ExitStack() as held:
            for job in jobs:  # one process per job directory, as for a run of its own
                held.enter_context(exclusive(job.run_dir, dir_key="hydra.sweep.dir"))
            if lead.resume:
                settle([j.run_dir for j in jobs])
            claims = claim_all(jobs)
            if claims[0].finished is not None:
                log.info("the sweep's %d jobs are complete; nothing to do (files left as they are)", len(jobs))
                return [c.finished for c in claims]
            log.info("%d jobs in one process, one teacher forward and one data stream for all:", len(jobs))
            for job in jobs:
                log.info("  %s -> %s", job.label, job.run_dir)
            with job_log_files(jobs), console_job():
                try:
                    return train(jobs, claims)
                except FDLightError as e:
                    error = e  # a first batch that fails (data.strict) leaves no job directory, as a run leaves none
                    error.run_started = any(c.resume_from for c in claims) or any(
                        (j.run_dir / "checkpoints" / "last.ckpt").exists() for j in jobs)
        if not error.run_started and not is_secondary_rank():
            for d in new:
                shutil.rmtree(d, ignore_errors=True)
        raise error


def train(jobs: list[Job], claims: list[Claim]) -> list[dict]:
    lead, dirs = jobs[0].cfg, [j.run_dir for j in jobs]
    module, data = build(jobs)
    meter = Throughput()
    loggers = [build_logger(j.cfg, j.run_dir, group=str(j.run_dir.parent)) for j in jobs]
    s = lead.distill
    monitors = [build_monitor(j.cfg, int(j.cfg.student.img_size), "student", k, [loggers[k]])
                for k, j in enumerate(jobs)]  # each job its own curve, in its own logs
    trainer = build_trainer(lead, s, dirs[0], callbacks=[meter, JobLogs(loggers, int(s.log_every_n_steps)),
                                                         *(m for m in monitors if m)],
                            wrap_classes=block_classes(lead.student),
                            checkpoint_every=s.get("checkpoint_every_n_steps"),
                            logger=False, checkpoint_io=JobCheckpoints(dirs), logs=loggers)
    for job, c in zip(jobs, claims):
        save_config(job.cfg, job.run_dir)
        if c.resume_from is not None and not is_secondary_rank():
            (job.run_dir / "metrics.json").unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        with peers(lead.trainer):
            trainer.fit(module, datamodule=data,
                        ckpt_path=str(claims[0].resume_from) if claims[0].resume_from else None)
    except torch.OutOfMemoryError:
        raise FDLightError(f"{len(jobs)} students and the teacher do not fit on the device; share the teacher among "
                           f"fewer jobs at a time with hydra.sweeper.max_batch_size=N, or lower distill.batch_size") \
            from None
    except FDLightError as e:
        raise worker_error(e) from None
    wall = time.perf_counter() - start
    results = []
    for k, (job, fd) in enumerate(zip(jobs, module.students)):
        built = Training(fd, data, validate=False)
        state = full_state_dict(fd, "", sharded=False)
        if not fd.single:
            built.extra["heads"] = {n: v for n, v in state.items() if not n.startswith("student.")}
        metrics = {**DISTILL.record(job.cfg, built), "first_loss": fd.first_loss,
                   "last_loss": fd.last_loss, "steps": trainer.global_step, "img_per_s": meter.img_per_s,
                   "wall_s": wall, "shared_teacher": {"job": k, "jobs": len(jobs)},
                   **(monitors[k].metrics() if monitors[k] else {})}
        if trainer.is_global_zero:
            student = {n[len("student."):]: v for n, v in state.items() if n.startswith("student.")}
            token = CURRENT_JOB.set(k)
            try:
                artifacts = DISTILL.export(job.cfg, job.run_dir, built, student)
                DISTILL.finish(job.run_dir, metrics, [*artifacts, job.run_dir / "checkpoints" / "last.ckpt"])
            finally:
                CURRENT_JOB.reset(token)
        results.append(metrics)
    return results
