"""`python -m fdlight.bench.fit`: the run-level rate of distillation, beside the bare step.

It builds what `stage=distill` builds (models, the DataModule on the embedded synthetic data, the Trainer with its
callbacks: progress bar, seeded steps, throughput meter, logger) and runs Lightning's fit for `--steps` steps, without
the run's checkpoint and export (at SwinV2-G scale they are tens of GB); then it times the bare step of
`python -m fdlight.bench` on the same config in the same process. It prints the fit's img/s (the step as the run's
meter times it), its wall-clock img/s over the steps after the warm-up (data loading, logging, callbacks included),
peak GPU memory, and the bare step's img/s. Overrides as for `python -m fdlight.bench`; on a GPU the default is the
paper's CLIP ViT-B/16 -> ViT-B/16 step at batch 128 in bf16, e.g. `python -m fdlight.bench.fit --batch 8 --steps 6
student=swinv2_g teacher=esvit_swinb teacher.weights=null trainer=fsdp trainer.devices=1` for SwinV2-G.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from fdlight.bench.distill import GPU_STEP
from fdlight.config import compose


class StepClock(Callback):
    """Wall time of every training step, from one step's start to the next (everything between included)."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def step_seconds(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.starts[warmup:], self.starts[warmup + 1:])]


def run_fit(cfg, run_dir: Path, warmup: int) -> dict:
    from fdlight.runs.callbacks import Throughput
    from fdlight.runs.trainer import build_trainer, cpu_threads
    from fdlight.stages.distill import STAGE

    with cpu_threads(cfg, cfg.distill):
        built = STAGE.build(cfg)
        meter, clock = Throughput(), StepClock()
        run_dir.mkdir(parents=True)
        trainer = build_trainer(cfg, cfg.distill, run_dir, callbacks=[meter, clock], wrap_classes=built.wrap_classes,
                                checkpoint=False)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(built.module, datamodule=built.data)
    steps = clock.step_seconds(warmup)
    batch = int(cfg.distill.batch_size) * trainer.world_size
    return dict(steps=trainer.global_step, meter_img_per_s=round(meter.img_per_s, 1),
                wall_img_per_s=round(batch * len(steps) / sum(steps), 1) if steps else None,
                step_ms_median=round(1e3 * statistics.median(steps), 1) if steps else None,
                peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
                else None)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None, help="default: 128 on GPU, 8 on CPU")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the wall-clock rate")
    ap.add_argument("--no-step", action="store_true", help="skip the bare step's timing")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    batch = args.batch or (128 if cuda else 8)
    base = GPU_STEP if cuda else []
    size = compose([*base, *args.overrides]).student.img_size
    cfg = compose([*base, "stage=distill", "data=synthetic", f"data.raw_size={size}", f"data.num_train={batch * 8}",
                   f"distill.batch_size={batch}", f"distill.max_steps={args.steps}", "distill.log_every_n_steps=10",
                   "logger=csv", *args.overrides])
    torch.set_float32_matmul_precision("high")
    with tempfile.TemporaryDirectory(prefix="fdlight-bench-fit-") as tmp:
        result = dict(student=cfg.student.name, teacher=cfg.teacher.name, batch=batch, trainer=cfg.trainer.strategy,
                      **run_fit(cfg, Path(tmp) / "run", args.warmup))
    print("fdlight.bench.fit " + " ".join(f"{k}={v}" for k, v in result.items()))
    if not args.no_step:
        from fdlight.bench.distill import main as step_bench

        step = step_bench(["--batch", str(batch), "--steps", str(max(args.steps - args.warmup, 1)),
                           "--warmup", str(args.warmup), *args.overrides])
        result["step_img_per_s"] = step["img_per_s"]
        print(f"fdlight.bench.fit run/step = {result['meter_img_per_s'] / step['img_per_s']:.2f} (meter), "
              f"{(result['wall_img_per_s'] or 0) / step['img_per_s']:.2f} (wall)")
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
