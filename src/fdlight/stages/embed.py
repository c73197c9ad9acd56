"""stage=embed: the pooled features (and optionally the spatial map) of every image of a data split, from any model
the diagnostics load (`embed.pretrained`: an export, a run directory, a checkpoint, `teacher`), written to the run
directory as `embeddings.safetensors` (rows in the split's order; `labels` too when the split has them) and
`index.txt` (each row's source: the image's path, the shard and member, or the synthetic scene).

Batched, bf16 on a GPU. Resumable: every `embed.chunk_batches` batches go to `parts/part-<n>.safetensors` as they
are done; `resume=true` after a kill embeds only the missing parts, with the same batches, so the result equals an
uninterrupted run's bit for bit. The parts are joined and removed at the end; metrics.json is written last."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from fdlight.artifacts import save_safetensors, write_text
from fdlight.config import section
from fdlight.data.classification import ClassificationData, check_root
from fdlight.data.source import data_used
from fdlight.data.transforms import eval_transform
from fdlight.diagnostics import knn
from fdlight.diagnostics.loading import Subject, load_subject
from fdlight.errors import check
from fdlight.runs.directory import Claim, save_config
from fdlight.runs.template import Stage
from fdlight.runs.trainer import on_gpu

log = logging.getLogger(__name__)
SPLITS = ("train", "val")
FOLDER_SOURCES = ("imagenet", "shards")
DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class Built:
    subject: Subject
    pool: str
    dataset: object
    names: list[str]


def split_dataset(cfg: DictConfig, split: str, transform):
    """One split of data= through `transform` (whatever source the data config names)."""
    data = ClassificationData(cfg.data, 1, transform, transform, with_val=split == "val", seed=cfg.seed,
                              stage="embed")
    train, val = data.splits(cfg.data)
    return val if split == "val" else train


def sample_names(dataset, source: str) -> list[str]:
    """Each sample's source, in row order: a dataset's own `samples` names (an image path; a shard and its member),
    else `<source>/<index>` (generated data)."""
    if hasattr(dataset, "samples"):
        return [str(s[0]) for s in dataset.samples]
    return [f"{source}/{i:06d}" for i in range(len(dataset))]


class Embed(Stage):
    name = "embed"
    checkpointed = False  # resumed from its parts

    def settings(self, cfg: DictConfig) -> DictConfig:
        return section(cfg, "embed")

    def validate(self, cfg: DictConfig) -> None:
        s = self.settings(cfg)
        knn.check_subject_settings(s, "embed")
        check(s.split in SPLITS, f"embed.split={s.split} is not a split; choose one of: {', '.join(SPLITS)}")
        check(str(s.dtype) in DTYPES, f"embed.dtype={s.dtype} is not stored; choose one of: {', '.join(DTYPES)}")
        if cfg.data.name in FOLDER_SOURCES:  # the ImageFolder layout, checked before anything loads
            check_root(cfg.data, with_val=s.split == "val")

    def build(self, cfg: DictConfig) -> Built:
        s = self.settings(cfg)
        subject = load_subject(str(s.pretrained), cfg, setting="embed.pretrained")
        pool = knn.check_pool(str(s.pool), subject.model, subject.source, "embed.pool")
        dataset = split_dataset(cfg, str(s.split), eval_transform(subject.img_size))
        return Built(subject, pool, dataset, sample_names(dataset, f"{cfg.data.name}/{s.split}"))

    def execute(self, cfg: DictConfig, run_dir: Path, built: Built, claimed: Claim) -> dict:
        s = self.settings(cfg)
        device = torch.device("cuda") if on_gpu(cfg.trainer) else torch.device("cpu")
        save_config(cfg, run_dir)
        parts = run_dir / "parts"
        parts.mkdir(exist_ok=True)
        start = time.perf_counter()
        n, batch, per_part = len(built.dataset), int(s.batch_size), int(s.batch_size) * int(s.chunk_batches)
        model = built.subject.model.to(device).eval()
        done = 0
        for p, first in enumerate(range(0, n, per_part)):
            path = parts / f"part-{p:06d}.safetensors"
            if path.is_file():  # written whole by an earlier (killed) run of this directory
                continue
            rows = embed_rows(model, built, range(first, min(first + per_part, n)), batch, device, s,
                              int(cfg.data.get("num_workers", 0) or 0))
            save_safetensors(rows, path, {"format": "fdlight embedding part"})
            done += len(range(first, min(first + per_part, n)))
        wall = time.perf_counter() - start
        tensors = join_parts(sorted(parts.glob("part-*.safetensors")))
        written = [save_safetensors(tensors, run_dir / "embeddings.safetensors",
                                    {"format": "fdlight embeddings", "pretrained": str(s.pretrained),
                                     "model": built.subject.name, "pool": knn.describe_pool(built.pool, model),
                                     "split": str(s.split), "data": str(cfg.data.name)}),
                   write_text(run_dir / "index.txt", "".join(f"{name}\n" for name in built.names))]
        shutil.rmtree(parts)
        metrics = {"stage": "embed", **data_used(cfg.data, **{str(s.split): n}), "pretrained": str(s.pretrained),
                   "model": built.subject.name, "rows": n,
                   "dim": int(tensors["embeddings"].shape[1]), "dtype": str(s.dtype), "spatial": bool(s.spatial),
                   "embedded_now": done, "img_per_s": done / wall if done and wall > 0 else None, "wall_s": wall}
        self.finish(run_dir, metrics, written)
        return metrics

    def summary(self, metrics: dict) -> str:
        speed = metrics["img_per_s"]
        return f"embedded {metrics['rows']} images ({metrics['dim']} features, {metrics['dtype']})" + \
            (f" at {speed:.0f} img/s" if speed else "")


@torch.no_grad()
def embed_rows(model, built: Built, indices: range, batch: int, device: torch.device, s: DictConfig,
               workers: int = 0) -> dict:
    """One part: the pooled features (and maps, labels) of dataset[indices], in batches of `batch` (the same batches
    whichever run computes the part)."""
    from torch.utils.data import DataLoader, Subset

    dtype = DTYPES[str(s.dtype)]
    pooled, grids, labels = [], [], []
    loader = DataLoader(Subset(built.dataset, list(indices)), batch_size=batch, shuffle=False, num_workers=workers,
                        collate_fn=images_and_targets)
    for x, y in loader:
        with knn.autocast(device):
            p, g = knn.pooled_and_grid(model, built.subject.prepare(x.to(device)), built.pool, bool(s.spatial))
        pooled.append(p.to(dtype).cpu())
        if g is not None:
            grids.append(g.to(dtype).cpu())
        labels.append(y)
    rows = {"embeddings": torch.cat(pooled)}
    if grids:
        rows["spatial"] = torch.cat(grids).contiguous()
    if knn.has_labels(built.dataset):
        rows["labels"] = torch.tensor([int(y) for batch_targets in labels for y in batch_targets])
    return rows


def images_and_targets(batch: list) -> tuple:
    """A batch of (image, target) pairs: the images stacked, the targets as they are (None for unlabelled data)."""
    return torch.stack([x for x, _ in batch]), [y for _, y in batch]


def join_parts(paths: list[Path]) -> dict[str, torch.Tensor]:
    loaded = [load_file(str(p)) for p in paths]
    return {k: torch.cat([part[k] for part in loaded]) for k in loaded[0]}


STAGE = Embed()
run = STAGE.run
