"""`python -m fdlight.bench`: time one distillation step of fdlight's own module on synthetic batches.

Prints img/s, teacher vs student milliseconds (the student with its projector(s), and alone: its own
forward_features and backward), peak memory and model FLOPs utilisation (FLOPs counted with
torch's FlopCounterMode on the real step, not estimated). Any config override may follow the flags, e.g.
`python -m fdlight.bench --batch 128 --compile teacher=clip_vitb student=vit_b16`; several teachers run one after
another on the same batch: `python -m fdlight.bench 'teacher=[clip_vitb,dino_vitb]'` (teacher_ms is all of them).
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from fdlight.bench.students import students_bench
from fdlight.bench.timing import peak_tflops, profile_step, timed
from fdlight.config import compose, teacher_label
from fdlight.models.attention import set_attention
from fdlight.models.pretrained import Architecture, build_from_pretrained
from fdlight.models.students import student_kwargs
from fdlight.optim import adamw_with_schedule, param_groups
from fdlight.stages.distill import build_distillation

# The paper's ViT-B step, the default on a GPU: CLIP ViT-B/16 teacher (random weights) -> ViT-B/16, drop path 0.2.
GPU_STEP = ["teacher=clip_vitb", "teacher.weights=null", "student=vit_b16", "drop_path.student=0.2"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None, help="default: 128 on GPU, 8 on CPU")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile the distillation step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--finetune", action="store_true",
                    help="time the fine-tuning step of the student instead (Mixup/CutMix, soft-target CE, AdamW)")
    ap.add_argument("--students", type=int, default=0, metavar="K",
                    help="time a shared-teacher step of K students beside K separate steps (hydra/launcher="
                         "shared_teacher)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, print where the step's time goes: totals per kind and the N longest kernels")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. teacher=clip_vitb student=vit_b16")
    args = ap.parse_args(argv)
    dev = args.device
    base = GPU_STEP if dev == "cuda" else []  # overrides apply on top (the last value of a key wins)
    cfg = compose([*base, *args.overrides, f"trainer.compile={args.compile}"])
    batch = args.batch or (128 if dev == "cuda" else 8)
    torch.set_float32_matmul_precision("high")
    if args.finetune:
        return finetune_bench(cfg, batch, args, dev)
    if args.students:
        if args.students < 1:
            ap.error(f"--students {args.students}: give the number of students, 1 or more")
        return students_bench(cfg, batch, args.students, args, dev)
    module = build_distillation(cfg).to(dev)
    bf16 = dev == "cuda"
    for teacher in module.teachers.values():
        teacher.to(device=dev, dtype=torch.bfloat16 if bf16 else torch.float32)
    opt, sched = module.build_optimizer(total_steps=10_000, total_batch=batch, fused=dev == "cuda")
    params = [p for g in opt.param_groups for p in g["params"]]
    size = module.student_layout.img_size
    x = torch.randn(batch, 3, size, size, device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = module.distill_loss(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, module.optim_cfg["clip_grad"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    with FlopCounterMode(display=False) as counter:  # eager, one image: teacher fwd + student fwd/bwd + projector
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            module._distill_loss(x[:1]).backward()
    flops_per_img = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(step, args.steps, dev)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")

    def teacher_only():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            module.targets(x)

    def student_only():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            sum(p.float().square().mean() for p in module.predictions(x).values()).backward()
        opt.zero_grad(set_to_none=True)

    def student_alone():  # the student's own forward_features and backward, no projector: its floor in the step
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            module.student.forward_features(x).float().square().mean().backward()
        opt.zero_grad(set_to_none=True)

    # each part alone and eager (the step may be compiled), after warm-up calls of its own
    teacher_s = timed(teacher_only, max(args.steps // 2, 1), dev, warmup=max(args.warmup, 1))
    student_s = timed(student_only, max(args.steps // 2, 1), dev, warmup=max(args.warmup, 1))
    alone_s = timed(student_alone, max(args.steps // 2, 1), dev, warmup=max(args.warmup, 1))
    ips = batch / step_s
    peak = peak_tflops(dev, args.peak_tflops)
    achieved = ips * flops_per_img / 1e12
    result = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", teacher=teacher_label(cfg),
                  student=cfg.student.name, batch=batch, compile=args.compile, img_per_s=round(ips, 1),
                  step_ms=round(step_s * 1e3, 2), teacher_ms=round(teacher_s * 1e3, 2),
                  student_fwd_bwd_ms=round(student_s * 1e3, 2), student_alone_ms=round(alone_s * 1e3, 2),
                  peak_mem_gib=round(mem, 2),
                  gflop_per_img=round(flops_per_img / 1e9, 2), tflops=round(achieved, 1),
                  mfu=round(achieved / peak, 3) if peak else None)
    print("fdlight.bench " + " ".join(f"{k}={v}" for k, v in result.items()))
    if args.profile:
        result["profile"] = profile_step(step, dev, args.profile)
    return result


def finetune_bench(cfg, batch: int, args, dev: str) -> dict:
    """One fine-tuning step of the configured student (per-block bias, mean pooling, 1000 classes)."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    arch = Architecture(cfg.student.model, student_kwargs(cfg.student))
    model, _ = build_from_pretrained(None, num_classes=1000, drop_path=0.1, arch=arch)
    set_attention(model, cfg.trainer.attention)
    model = model.to(dev)
    opt, sched = adamw_with_schedule(param_groups(model.named_parameters(), 0.05, cfg.student.no_decay_keywords),
                                     5e-3, 1e-6, 1e-6, 100, 10_000, fused=dev == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    mix, criterion = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000), \
        SoftTargetCrossEntropy()
    forward = torch.compile(model) if args.compile else model
    size = int(cfg.student.img_size)
    x, y = torch.randn(batch, 3, size, size, device=dev), torch.randint(0, 1000, (batch,), device=dev)

    def step():
        xm, ym = mix(x, y)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = criterion(forward(xm).float(), ym)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    step_s = timed(step, args.steps, dev, warmup=args.warmup)
    result = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", stage="finetune",
                  student=cfg.student.name, batch=batch, compile=args.compile, img_per_s=round(batch / step_s, 1),
                  step_ms=round(step_s * 1e3, 2),
                  peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None)
    print("fdlight.bench " + " ".join(f"{k}={v}" for k, v in result.items()))
    if args.profile:
        result["profile"] = profile_step(step, dev, args.profile)
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
