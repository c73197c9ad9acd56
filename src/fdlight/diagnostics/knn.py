"""Weighted k-NN classification of frozen features, the protocol self-supervised papers report (DINO's): the
L2-normalised pooled features of a labelled bank, cosine similarity, the k most similar bank rows voting for their
class with weight exp(similarity / T); top-1 and top-5 of the queries. Also the pooled features themselves
(`pooled`), their spatial map (`token_grid`), and gathering rows across DDP ranks (`gather_rows`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fdlight.errors import check

POOLS = ("auto", "cls", "mean")


# ------------------------------------------------------------------------------------------------------- features
def prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def as_tokens(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """forward_features' output as tokens, (B, N, D): prefix tokens first, then the map row by row."""
    if out.ndim == 4:  # Swin gives NHWC, a CNN NCHW
        out = out.flatten(1, 2) if out.shape[-1] == int(getattr(model, "num_features", -1)) else \
            out.flatten(2).transpose(1, 2)
    return out


def tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every token of a timm model after its final norm, (B, N, D)."""
    return as_tokens(model, model.forward_features(x))


def check_subject_settings(s, key: str) -> None:
    """The settings of a stage that embeds images with one model (`knn`, `embed`): its `pretrained` and `pool`,
    checked before anything loads."""
    check(bool(s.get("pretrained")), f"{key}.pretrained is not set; pass {key}.pretrained=<run directory, "
                                     f"student.safetensors or checkpoint>, or {key}.pretrained=teacher with "
                                     f"teacher=<config>")
    check(s.pool in POOLS, f"{key}.pool={s.pool} is not a pooling; choose one of: {', '.join(POOLS)}")


def check_pool(pool: str, model: nn.Module, what: str, setting: str) -> str:
    """The pooling a model gets: `auto` is the model's own (timm's pre-logits features: its `global_pool`), else the
    CLS token for a model with a prefix token and the mean of its map for one without; `cls`, `mean` as named."""
    check(pool in POOLS, f"{setting}={pool} is not a pooling; choose one of: {', '.join(POOLS)}")
    if pool == "auto":
        return "auto" if hasattr(model, "forward_head") else "cls" if prefix_tokens(model) else "mean"
    check(pool != "cls" or prefix_tokens(model) > 0, f"{setting}=cls but {what} has no CLS token; use "
                                                     f"{setting}=mean (or auto)")
    return pool


def describe_pool(pool: str, model: nn.Module) -> str:
    return f"auto ({getattr(model, 'global_pool', None) or 'own'})" if pool == "auto" else pool


def pool_tokens(t: torch.Tensor, pool: str, prefix: int) -> torch.Tensor:
    return t[:, 0] if pool == "cls" else t[:, prefix:].mean(dim=1)


def pooled(model: nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, D) pooled features in float32 (`pool` as check_pool resolved it)."""
    return pooled_and_grid(model, x, pool, grid=False)[0]


def pooled_and_grid(model: nn.Module, x: torch.Tensor, pool: str, grid: bool) -> tuple:
    """(B, D) float32 pooled features and, with `grid`, the (B, D, H, W) spatial map they come from (else None)."""
    out = model.forward_features(x)
    if pool == "auto":
        p = model.forward_head(out, pre_logits=True)
    else:
        p = pool_tokens(as_tokens(model, out), pool, prefix_tokens(model))
    return p.float(), token_grid(model, as_tokens(model, out)) if grid else None


def token_grid(model: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """The spatial map of `tokens`' output, (B, D, H, W) for a square grid (the prefix tokens dropped)."""
    grid = t[:, prefix_tokens(model):]
    side = int(round(grid.shape[1] ** 0.5))
    return grid.transpose(1, 2).reshape(grid.shape[0], grid.shape[2], side, grid.shape[1] // side)


# -------------------------------------------------------------------------------------------------------- k-NN
@dataclass
class KnnResult:
    top1: float
    top5: float
    num_bank: int
    num_queries: int

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "num_bank": self.num_bank, "num_queries": self.num_queries}


def class_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float,
                 num_classes: int, exclude_self: bool = False, chunk: int = 1024) -> torch.Tensor:
    """(Q, C) votes: each query's k most cosine-similar bank rows add exp(sim / T) to their class. `exclude_self`
    (queries are the bank, row for row) leaves each row out of its own neighbours (leave-one-out)."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    scores = []
    for start in range(0, len(queries), chunk):
        sim = queries[start:start + chunk] @ bank.T
        if exclude_self:
            rows = torch.arange(start, start + len(sim), device=sim.device)
            sim[torch.arange(len(sim), device=sim.device), rows] = -float("inf")
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device, dtype=sim.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp()))
    return torch.cat(scores)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 k: int, temperature: float, num_classes: int, exclude_self: bool = False) -> KnnResult:
    """Top-1 and top-5 (top-min(5, classes)) accuracy of the weighted k-NN vote, as fractions."""
    scores = class_scores(bank, bank_labels.long(), queries, k, temperature, num_classes, exclude_self)
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    hits = ranked == query_labels.long().view(-1, 1)
    return KnnResult(float(hits[:, 0].float().mean()), float(hits.any(dim=1).float().mean()), len(bank),
                     len(queries))


def check_k(k: int, bank_size: int, setting: str = "knn.k", exclude_self: bool = False) -> None:
    usable = bank_size - int(exclude_self)
    check(k <= usable, f"{setting}={k} is larger than the memory bank ({usable} images); pass {setting}<={usable} "
                       f"or use more labelled images")


# ---------------------------------------------------------------------------------------------------------- DDP
def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (rank 0's first, then rank 1's, ...), on every rank; the rows as they are without DDP.
    Ranks may hold different counts (padded for the collective, trimmed after)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    device = rows.device if dist.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())
    n = torch.tensor([len(rows)], device=device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[:len(rows)] = rows.to(device)
    out = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([o[:int(c.item())] for o, c in zip(out, counts)]).to(rows.device)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------------ datasets
def has_labels(dataset) -> bool:
    """Whether a dataset's samples carry class labels (the ImageFolder interface: a non-empty `classes`)."""
    return bool(getattr(dataset, "classes", None))


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """`limit` indices spread evenly over range(n), first and last included (all of them when limit is None)."""
    if limit is None or limit >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, limit).round().long().unique().tolist()


def autocast(device: torch.device):
    """bf16 on a GPU (the pooled features are returned in float32), nothing on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def embed_labelled(model: nn.Module, dataset, indices: list[int], batch_size: int, pool: str, device: torch.device,
                   prepare=None, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 pooled features and (N,) labels of dataset[indices], in that order. Under DDP each rank embeds
    every world-th index and the rows are gathered on every rank."""
    from torch.utils.data import DataLoader, Subset

    rank, world = rank_and_world()
    mine = indices[rank::world]
    feats, labels = [], []
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device):
            feats.append(pooled(model, prepare(x) if prepare else x, pool).cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    width = int(getattr(model, "num_features", 0) or 0)
    f = torch.cat(feats) if feats else torch.zeros(0, width)
    y = torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.long)
    if world == 1:
        return f, y
    order = gather_rows(torch.tensor(mine, dtype=torch.long))
    perm = order.argsort()
    return gather_rows(f)[perm], gather_rows(y)[perm]
