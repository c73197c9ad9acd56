"""stage=knn: weighted k-NN classification of frozen features (fdlight.diagnostics.knn): the pooled features of the
labelled train split are the memory bank, the val split is classified; writes results.md and metrics.json.

`knn.pretrained` is anything the diagnostics load (fdlight.diagnostics.loading): a run directory, an export
(`student.safetensors`, `model.safetensors`), a distillation `.ckpt`, an official checkpoint, a teacher's own weights
with `teacher=<its config>`, or `teacher` / `teacher:<name>` for a teacher config as it is. The trainer config says
where it runs (bf16 on a GPU); under trainer.strategy=ddp every rank embeds its share of both splits and the rows are
gathered."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from fdlight.artifacts import write_text
from fdlight.config import section
from fdlight.data.classification import ClassificationData, check_root
from fdlight.data.source import data_used
from fdlight.data.transforms import eval_transform
from fdlight.diagnostics import knn
from fdlight.diagnostics.loading import Subject, load_subject
from fdlight.errors import check
from fdlight.runs.directory import Claim, is_secondary_rank, save_config
from fdlight.runs.template import Stage, percent

log = logging.getLogger(__name__)


@dataclass
class Built:
    subject: Subject
    pool: str
    bank: object      # the labelled train split (eval transform)
    queries: object   # the val split
    num_classes: int


def launch(trainer_cfg: DictConfig) -> torch.device:
    """The trainer config's processes (trainer.strategy=ddp: Lightning starts the other ranks, as for training), joined
    in one process group; the device of this rank."""
    import lightning as L

    t = trainer_cfg
    strategy = "ddp" if str(t.strategy) in ("ddp", "fsdp") else "auto"  # nothing is trained: nothing to shard
    fabric = L.Fabric(accelerator=str(t.accelerator), devices=t.devices, num_nodes=int(t.num_nodes),
                      strategy=strategy, precision="32-true")
    fabric.launch()
    return fabric.device


def labelled_splits(cfg: DictConfig, img_size: int, batch_size: int) -> tuple:
    """(train, val) of data= with the eval transform at the model's resolution; both must carry labels."""
    tf = eval_transform(img_size)
    data = ClassificationData(cfg.data, batch_size, tf, tf, with_val=True, seed=cfg.seed, stage="knn")
    train, val = data.splits(cfg.data)
    for split, ds in (("train", train), ("val", val)):
        check(knn.has_labels(ds), f"the {split} split of data={cfg.data.name} has no class labels, so k-NN cannot "
                                  f"classify with it; use a labelled data source (class folders, shards with .cls)")
    return train, val


class Knn(Stage):
    name = "knn"
    checkpointed = False

    def settings(self, cfg: DictConfig) -> DictConfig:
        return section(cfg, "knn")

    def validate(self, cfg: DictConfig) -> None:
        knn.check_subject_settings(self.settings(cfg), "knn")
        if cfg.data.name != "synthetic":
            check_root(cfg.data, with_val=True)

    def build(self, cfg: DictConfig) -> Built:
        s = self.settings(cfg)
        subject = load_subject(str(s.pretrained), cfg, setting="knn.pretrained")
        pool = knn.check_pool(str(s.pool), subject.model, subject.source, "knn.pool")
        bank, queries = labelled_splits(cfg, subject.img_size, int(s.batch_size))
        knn.check_k(int(s.k), len(knn.evenly_spaced(len(bank), s.get("max_bank"))))
        return Built(subject, pool, bank, queries, len(bank.classes))

    def execute(self, cfg: DictConfig, run_dir: Path, built: Built, claimed: Claim) -> dict:
        s = self.settings(cfg)
        device = launch(cfg.trainer)
        save_config(cfg, run_dir)
        start = time.perf_counter()
        model = built.subject.model.to(device)
        workers = int(cfg.data.get("num_workers", 0) or 0)

        def embed(ds, limit):
            return knn.embed_labelled(model, ds, knn.evenly_spaced(len(ds), limit), int(s.batch_size), built.pool,
                                      device, built.subject.prepare, workers)

        bank, bank_labels = embed(built.bank, s.get("max_bank"))
        queries, query_labels = embed(built.queries, s.get("max_queries"))
        result = knn.knn_accuracy(bank, bank_labels, queries, query_labels, int(s.k), float(s.temperature),
                                  built.num_classes)
        metrics = {"stage": "knn", **data_used(cfg.data, len(bank), len(queries)),
                   "pretrained": str(s.pretrained), "model": built.subject.name,
                   "kind": built.subject.kind, "k": int(s.k), "temperature": float(s.temperature),
                   "pool": knn.describe_pool(built.pool, model),
                   "num_classes": built.num_classes, **result.as_dict(), "wall_s": time.perf_counter() - start}
        if is_secondary_rank():
            return metrics
        written = [write_text(run_dir / "results.md", results_markdown(cfg, metrics))]
        if cfg.logger.name == "wandb":
            log_to_wandb(cfg, run_dir, metrics)
        self.finish(run_dir, metrics, written)
        return metrics

    def summary(self, metrics: dict) -> str:
        return f"k-NN (k={metrics['k']}, T={metrics['temperature']:g}) of {metrics['model']}: top-1 " \
               f"{percent(metrics['top1'])}, top-5 {percent(metrics['top5'])} on {metrics['num_queries']} images"


def results_markdown(cfg: DictConfig, m: dict) -> str:
    return "\n".join([
        f"# k-NN classification on data={cfg.data.name}", "",
        f"{m['num_bank']} labelled train images as the bank, {m['num_queries']} val images classified; "
        f"k={m['k']}, T={m['temperature']:g}, {m['pool']} pooling, cosine similarity, weights exp(sim / T).", "",
        "| model | source | top-1 | top-5 |", "|---|---|---|---|",
        f"| {m['model']} | {m['pretrained']} | {percent(m['top1'])} | {percent(m['top5'])} |", ""])


def log_to_wandb(cfg: DictConfig, run_dir: Path, m: dict) -> None:
    """The result as scalars and as a one-row table of the run."""
    from fdlight.console import finish_wandb
    from fdlight.runs.trainer import build_logger

    logger = build_logger(cfg, run_dir)
    logger.log_metrics({"knn/top1": m["top1"], "knn/top5": m["top5"]})
    columns = ["model", "pretrained", "k", "temperature", "pool", "top1", "top5"]
    logger.log_table(key="knn/results", columns=columns, data=[[m[c] for c in columns]])
    finish_wandb()


def config(overrides=()) -> DictConfig:
    """The config `python -m fdlight stage=knn <overrides>` runs (for the demo and notebooks)."""
    from fdlight.config import compose

    return compose(["stage=knn", *overrides])


STAGE = Knn()
run = STAGE.run
