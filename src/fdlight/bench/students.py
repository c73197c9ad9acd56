"""`python -m fdlight.bench --students K`: a shared-teacher step (one teacher forward, K students; the step of
hydra/launcher=shared_teacher) beside K separate distillation steps, in one process on the same batch.

Prints both times, their ratio (the shared step's speed-up) and the FLOP bound of that ratio: with the teacher's
forward counted once instead of K times, (K x (teacher + student)) / (teacher + K x student), FLOPs counted with
torch's FlopCounterMode on the real step of one image."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from fdlight.bench.timing import timed
from fdlight.config import teacher_configs, teacher_label
from fdlight.models.teachers import build_teacher
from fdlight.modules.distill import FeatureDistillation
from fdlight.modules.shared import student_losses


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def students_bench(cfg, batch: int, k: int, args, dev: str) -> dict:
    bf16 = dev == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    teachers = {n: build_teacher(t, seed=int(cfg.seed)).to(device=dev, dtype=dtype).freeze()
                for n, t in teacher_configs(cfg).items()}
    students = [FeatureDistillation.from_config(cfg, compile=args.compile, teachers=teachers).to(dev)
                for _ in range(k)]
    optims = [fd.build_optimizer(total_steps=10_000, total_batch=batch, fused=dev == "cuda") for fd in students]
    size = students[0].student_layout.img_size
    x = torch.randn(batch, 3, size, size, device=dev)

    def update(fd, opt, sched):
        params = [p for g in opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, fd.optim_cfg["clip_grad"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def shared_step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            losses = [loss for loss, _ in student_losses(students, x)]
        sum(losses).backward()
        for fd, (opt, sched) in zip(students, optims):
            update(fd, opt, sched)

    def separate_steps():  # each student's own step, its teacher forward included
        for fd, (opt, sched) in zip(students, optims):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                loss = fd.distill_loss(x)
            loss.backward()
            update(fd, opt, sched)

    lead, one = students[0], x[:1]
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        teacher_flops = flops(lambda: lead.targets(one))
        step_flops = flops(lambda: lead._distill_loss(one).backward())
    lead.zero_grad(set_to_none=True)
    student_flops = step_flops - teacher_flops
    bound = k * step_flops / (teacher_flops + k * student_flops)

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    shared_s = timed(shared_step, args.steps, dev, warmup=args.warmup)
    mem = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None
    separate_s = timed(separate_steps, args.steps, dev, warmup=args.warmup)
    speedup = separate_s / shared_s
    result = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", teacher=teacher_label(cfg),
                  student=cfg.student.name, students=k, batch=batch, compile=args.compile,
                  shared_ms=round(shared_s * 1e3, 2), separate_ms=round(separate_s * 1e3, 2),
                  speedup=round(speedup, 3), flop_bound=round(bound, 3), of_bound=round(speedup / bound, 3),
                  teacher_gflop_per_img=round(teacher_flops / 1e9, 3),
                  student_gflop_per_img=round(student_flops / 1e9, 3), shared_peak_mem_gib=mem)
    print("fdlight.bench " + " ".join(f"{key}={v}" for key, v in result.items()))
    return result
