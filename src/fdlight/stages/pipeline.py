"""stage=pipeline: the whole method in one process, each step a stage run in its own subfolder.

1. teacher: train the teacher config's architecture from scratch with labels (the DeiT-like case), or take
   teacher=<config> as it is (`pipeline.train_teacher=false`);
2. distill: FD from that teacher into a fresh student;
3. finetune_teacher / finetune_student: the same fine-tuning recipe and budget for both (and, optionally, for the
   student architecture from random weights);
4. optionally (`pipeline.diagnose`): attention-distance spread and loss-landscape sharpness of teacher and FD student,
   both landscapes on one loss (a linear probe's cross entropy);
5. optionally (`pipeline.segment`): UPerNet segmentation of teacher and FD student with the same budget;
6. optionally (`pipeline.knn`): k-NN top-1 of the frozen features of the teacher, the FD student and the scratch
   baseline (stage=knn);
7. results.md and metrics.json: top-1 of each fine-tuned model, the FD loss first -> last, the wall time of each step.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fdlight.artifacts import write_json, write_text
from fdlight.console import finish_wandb
from fdlight.config import group_config, with_stage
from fdlight.constants import IMAGENET_MEAN, IMAGENET_STD
from fdlight.data.source import data_used
from fdlight.errors import check
from fdlight.models.weights import read_export_metadata
from fdlight.runs.directory import Claim, save_config
from fdlight.runs.template import Stage
from fdlight.stages.diagnose import STAGE as DIAGNOSE, read_summary
from fdlight.stages.distill import STAGE as DISTILL
from fdlight.stages.finetune import STAGE as FINETUNE
from fdlight.stages.knn import STAGE as KNN
from fdlight.stages.segment import segmentation_miou

log = logging.getLogger(__name__)
STEP_STAGES = {"distill": DISTILL, "finetune": FINETUNE, "diagnose": DIAGNOSE, "knn": KNN}
LABELS = {"teacher": "teacher trained from scratch with labels", "distill": "FD: teacher -> fresh student",
          "finetune_teacher": "teacher fine-tuned", "finetune_student": "FD student fine-tuned",
          "finetune_scratch": "student architecture fine-tuned from random weights",
          "diagnose": "attention and loss landscape of teacher and FD student",
          "segment_teacher": "segmentation on the teacher", "segment_fd_student": "segmentation on the FD student",
          "knn_teacher": "k-NN of the teacher", "knn_fd_student": "k-NN of the FD student",
          "knn_scratch": "k-NN of the scratch baseline"}
NUMBERS = {"teacher": "1", "distill": "2", "finetune_teacher": "3a", "finetune_student": "3b",
           "finetune_scratch": "3c", "diagnose": "4", "segment_teacher": "5", "segment_fd_student": "5",
           "knn_teacher": "6", "knn_fd_student": "6", "knn_scratch": "6"}
# step 6: the row of the results table whose model each k-NN step evaluates (frozen features)
KNN_STEPS = {"teacher": "knn_teacher", "distill": "knn_fd_student", "finetune_scratch": "knn_scratch"}
# diagnose step: every checkpoint is scored on this one loss, so that the sharpness row compares like with like
LANDSCAPE_LOSS = "probe"


def announce(name: str, stage: str, step_dir: Path) -> None:
    """The header of one pipeline step."""
    log.info("pipeline step %s: %s (stage=%s) in %s", NUMBERS[name], LABELS[name], stage, step_dir)


def trained_teacher_config(model_file: Path) -> DictConfig:
    """teacher=timm pointed at step 1's model.safetensors: its timm name and kwargs, ImageNet statistics."""
    meta = read_export_metadata(model_file)
    kwargs = {k: v for k, v in meta["timm_kwargs"].items() if k != "num_classes"}  # the teacher drops its head
    return OmegaConf.merge(group_config("teacher", "timm"), {"name": "trained_teacher", "model": meta["timm_model"], "weights": str(model_file),
                                  "kwargs": kwargs, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})


def run_step(name: str, sub: DictConfig, run_dir: Path, resume: bool) -> dict:
    """Run step `name` in its folder (run_dir/<number>_<name>); when resuming, a finished step is read back and an
    unfinished one continues."""
    step_dir = run_dir / f"{NUMBERS[name]}_{name}"
    if resume and (step_dir / "metrics.json").is_file():
        log.info("pipeline step %s: %s already done, reusing %s", NUMBERS[name], LABELS[name], step_dir)
        return json.loads((step_dir / "metrics.json").read_text())
    sub.resume = bool(resume and (step_dir / "config.yaml").is_file())  # started: continued, or begun again
    announce(name, sub.stage, step_dir)
    start = time.perf_counter()
    metrics = STEP_STAGES[sub.stage].run(sub, step_dir)
    finish_wandb()  # with logger=wandb, each step its own W&B run (a new WandbLogger reuses an open run)
    metrics["step_wall_s"] = time.perf_counter() - start  # model building and data set-up included
    write_json(step_dir / "metrics.json", metrics)
    return metrics


class Pipeline(Stage):
    name = "pipeline"
    checkpointed = False

    def validate(self, cfg: DictConfig) -> None:
        if not cfg.pipeline.train_teacher:
            weights = Path(str(cfg.teacher.weights or "")).expanduser()
            check(weights.is_file(), f"pipeline.train_teacher=false fine-tunes the teacher's own weights, so "
                                     f"teacher.weights must be a local file, not {cfg.teacher.weights!r}")

    def execute(self, cfg: DictConfig, run_dir: Path, built, claimed: Claim) -> dict:
        save_config(cfg, run_dir)
        metrics = run_steps(cfg, run_dir)
        self.finish(run_dir, metrics, [run_dir / "results.md"])
        return metrics

    def summary(self, metrics: dict) -> str:
        return f"pipeline done in {metrics['total_wall_s']:.0f} s"


STAGE = Pipeline()
run = STAGE.run


def run_steps(cfg: DictConfig, run_dir: Path) -> dict:
    p = cfg.pipeline
    resume = bool(cfg.get("resume"))
    steps: dict[str, dict] = {}
    if p.train_teacher:
        steps["teacher"] = run_step("teacher", with_stage(cfg, "finetune", {"finetune": dict(p.teacher)}), run_dir,
                                    resume)
        teacher_file = run_dir / "1_teacher" / "model.safetensors"
        teacher_cfg = trained_teacher_config(teacher_file)
    else:
        teacher_file = Path(str(cfg.teacher.weights)).expanduser()
        teacher_cfg = cfg.teacher
    distill_cfg = with_stage(cfg, "distill")
    distill_cfg.teacher = teacher_cfg
    steps["distill"] = run_step("distill", distill_cfg, run_dir, resume)
    runs = {"finetune_teacher": {"pretrained": str(teacher_file)},
            "finetune_student": {"pretrained": str(run_dir / "2_distill" / "student.safetensors")}}
    if p.scratch_baseline:
        runs["finetune_scratch"] = {"pretrained": None, "scratch": "student"}
    for name, source in runs.items():
        sub = with_stage(cfg, "finetune", {"finetune": {**dict(p.finetune), **source}})
        steps[name] = run_step(name, sub, run_dir, resume)
    pair = {"teacher": teacher_file, "fd_student": run_dir / "2_distill" / "student.safetensors"}
    extra = {}
    if p.get("diagnose"):
        extra["diagnose"] = diagnose_step(cfg, pair, run_dir, resume)
    if p.get("segment"):
        extra["segment"] = segment_step(cfg, pair, run_dir, resume)
    if p.get("knn"):
        models = {"teacher": teacher_file, "distill": pair["fd_student"],
                  "finetune_scratch": run_dir / "3c_finetune_scratch" / "model.safetensors"}
        for row, path in models.items():
            if row in steps:
                settings = {**dict(p.get("knn_settings") or {}), "pretrained": str(path)}
                sub = with_stage(cfg, "knn", {"knn": settings})
                steps[row]["knn_top1"] = run_step(KNN_STEPS[row], sub, run_dir, resume)["top1"]
    metrics = summarize(steps)
    read = steps["finetune_teacher"]  # every step reads the same data; fine-tuning reads both splits
    metrics.update(data_used(cfg.data, read.get("train_images"), read.get("val_images")))
    metrics.update(flatten_extra(extra))
    metrics["total_wall_s"] = sum(v for k, v in metrics.items() if k.endswith("wall_s") and v is not None)
    text = results_markdown(cfg, steps, metrics, extra)
    log.info("pipeline step 7: results (results.md, metrics.json) in %s", run_dir)
    write_text(run_dir / "results.md", text)
    print(text, flush=True)
    return metrics


def diagnose_config(cfg: DictConfig, checkpoints: list[Path], names: list[str]) -> DictConfig:
    """Step 4's config: pipeline.diagnose_settings over the diagnose stage's defaults, with the landscape loss forced
    to LANDSCAPE_LOSS for every checkpoint (left to itself the stage scores the teacher, which has a head, with cross
    entropy and the distilled student with its FD loss: two scales that do not compare)."""
    sub = with_stage(cfg, "diagnose", {"diagnose": {"checkpoints": [str(c) for c in checkpoints], "names": names,
                                                    **dict(cfg.pipeline.diagnose_settings)}})
    sub.diagnose.landscape.loss = LANDSCAPE_LOSS
    return sub


def diagnose_step(cfg: DictConfig, pair: dict[str, Path], run_dir: Path, resume: bool) -> dict:
    """Step 4: the diagnose stage on teacher and FD student, both scored with a linear-probe loss so their
    landscapes compare (the FD loss exists for the student only)."""
    names = {"teacher": "teacher", "fd_student": "FD student"}
    sub = diagnose_config(cfg, list(pair.values()), [names[k] for k in pair])
    start = time.perf_counter()
    run_step("diagnose", sub, run_dir, resume)
    summary = read_summary(run_dir / "4_diagnose")
    rows = {key: {k: summary.get(names[key], summary.get(key, {})).get(k)  # key: a run from before the renaming
                  for k in ("attn_distance_spread", "sharpness", "landscape_loss")} for key in pair}
    rows["teacher"]["wall_s"] = time.perf_counter() - start  # one run for both, counted once
    return rows


def segment_step(cfg: DictConfig, pair: dict[str, Path], run_dir: Path, resume: bool) -> dict:
    """Step 5: the same small UPerNet fine-tune on teacher and FD student; val/mIoU of each."""
    out = {}
    for name, path in pair.items():
        step_dir = run_dir / f"5_segment_{name}"
        start = time.perf_counter()
        if resume and (step_dir / "metrics.json").is_file():
            log.info("pipeline step 5: %s already done, reusing %s", LABELS[f"segment_{name}"], step_dir)
            miou = json.loads((step_dir / "metrics.json").read_text())["val/mIoU"]
        else:
            announce(f"segment_{name}", "segment", step_dir)
            miou = segmentation_miou(cfg, path, step_dir, resume=resume and step_dir.is_dir(),
                                     **dict(cfg.pipeline.segment_settings))
            finish_wandb()
        out[name] = {"val/mIoU": miou, "wall_s": time.perf_counter() - start}
    return out


def flatten_extra(extra: dict) -> dict:
    return {f"{step}/{name}/{key}": value for step, rows in extra.items() for name, row in rows.items()
            for key, value in row.items()}


# ------------------------------------------------------------------------------------------------------- results
def summarize(steps: dict[str, dict]) -> dict:
    out: dict = {"stage": "pipeline"}
    for name, m in steps.items():
        for key in ("val/top1", "val/top5", "knn_top1", "img_per_s", "first_loss", "last_loss", "steps"):
            if m.get(key) is not None:
                out[f"{name}/{key}"] = m[key]
        out[f"{name}/wall_s"] = m.get("step_wall_s", m.get("wall_s"))
    out["fd/first_loss"], out["fd/last_loss"] = steps["distill"]["first_loss"], steps["distill"]["last_loss"]
    out["delta_top1"] = out["finetune_student/val/top1"] - out["finetune_teacher/val/top1"]
    return out


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value, spec: str) -> str:
    """A number, or a dash where it is missing (null in a metrics.json, NaN in memory)."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def sharpness_label(d: dict, settings: DictConfig) -> str:
    """What the sharpness row measured: the loss each checkpoint was scored on, how far out, on how many images."""
    losses = {key: row.get("landscape_loss") for key, row in d.items()}
    ls = settings.landscape
    where = (f"at ±{ls.span:g} along a filter-normalised random direction, mean of both ends "
             f"({ls.num_images or settings.num_images} val images; lower is flatter)")
    if set(losses.values()) == {"probe"}:
        return f"loss-landscape sharpness: rise of a linear probe's cross entropy {where}"
    named = ", ".join(f"{key} {loss}" for key, loss in losses.items())
    return f"loss-landscape sharpness: rise of each model's own loss ({named}: not comparable) {where}"


def extra_rows(extra: dict, diagnose_settings: DictConfig) -> list[str]:
    """Teacher vs FD student rows of the diagnose and segment steps."""
    if not extra:
        return []
    rows = ["| measure | teacher | FD student | wall (s) |", "|---|---|---|---|"]
    d = extra.get("diagnose")
    if d:
        wall = d["teacher"]["wall_s"]
        rows.append(f"| attention-distance spread over heads (px, mean over layers; higher is more diverse) | "
                    f"{d['teacher']['attn_distance_spread']:.3f} | {d['fd_student']['attn_distance_spread']:.3f} | "
                    f"{wall:.1f} |")
        rows.append(f"| {sharpness_label(d, diagnose_settings)} | "
                    f"{d['teacher']['sharpness']:.3f} | {d['fd_student']['sharpness']:.3f} | |")
    s = extra.get("segment")
    if s:
        rows.append(f"| segmentation val mIoU (UPerNet, same budget) | {_pct(s['teacher']['val/mIoU'])} | "
                    f"{_pct(s['fd_student']['val/mIoU'])} | {s['teacher']['wall_s'] + s['fd_student']['wall_s']:.1f} |")
    return ["", *rows]


def results_markdown(cfg: DictConfig, steps: dict[str, dict], metrics: dict, extra: dict | None = None) -> str:
    # img/s: the training steps alone, the run's mean (the progress lines give the same measure per epoch)
    rows = ["| step | run | val top-1 | val top-5 | k-NN top-1 | FD loss first -> last | train-step img/s | wall (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, m in steps.items():
        loss = f"{m['first_loss']:.4f} -> {m['last_loss']:.4f}" if name == "distill" else "–"
        top1 = None if name == "distill" else m.get("val/top1")
        rows.append(f"| {NUMBERS[name]} | {LABELS[name]} ({m.get('steps', '?')} steps) | {_pct(top1)} | "
                    f"{_pct(m.get('val/top5'))} | {_pct(m.get('knn_top1'))} | {loss} | "
                    f"{_num(m.get('img_per_s'), '.0f')} | {_num(m.get('step_wall_s', m.get('wall_s')), '.1f')} |")
    t, s = metrics["finetune_teacher/val/top1"], metrics["finetune_student/val/top1"]
    n = int(cfg.data.get("num_val") or 0)
    noise = f" (one seed, {n} validation images: about ±{200 * math.sqrt((t * (1 - t) + s * (1 - s)) / n):.1f} " \
            f"points is sampling noise at 2 standard errors)" if n else " (one seed)"
    ft = OmegaConf.merge(cfg.finetune, cfg.pipeline.finetune)
    return "\n".join([
        "# fdlight pipeline results", "",
        f"Data: {cfg.data.name} ({cfg.data.get('num_train', '?')} train / {n or '?'} val images); "
        f"step 3: the same fine-tuning recipe and budget for every run, "
        f"{ft.epochs} epoch{'s' * (ft.epochs != 1)} each.",
        "",
        *rows, *extra_rows(extra or {}, diagnose_config(cfg, [], []).diagnose), "",
        f"FD student fine-tuned minus teacher fine-tuned: {100 * (s - t):+.1f} points top-1{noise}.",
        f"Total wall time: {metrics['total_wall_s']:.0f} s.", "",
    ])
