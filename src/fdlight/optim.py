"""AdamW parameter groups (official no-decay rules, layer-wise lr scales) and the per-step warmup + cosine or poly
schedule."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn as nn

from fdlight.errors import check


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter's name without the segments FSDP, activation checkpointing and torch.compile insert."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def original_ndims(module: nn.Module) -> dict[str, int]:
    """Each parameter's number of dimensions, recorded before any wrapping: under FSDP (use_orig_params) the
    optimizer sees flat 1-D shards, which would otherwise all look like biases."""
    return {clean_name(n): p.ndim for n, p in module.named_parameters()}


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, no_decay_keywords=(),
                 layer_of: Callable[[str], int] | None = None, num_layers: int = 1, layer_decay: float = 1.0,
                 ndims: dict[str, int] | None = None) -> list[dict]:
    """Split trainable parameters into AdamW groups. No weight decay for 1-D tensors, biases and names containing a
    keyword (docs/method.md §1.9). With `layer_of`, each group also carries lr_scale = decay^(num_layers-1-layer).
    `ndims` (from original_ndims) gives the true dimensions of parameters that FSDP has flattened."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        name = clean_name(name)
        ndim = ndims.get(name, p.ndim) if ndims else p.ndim
        decay = ndim > 1 and not name.endswith(".bias") and not any(k in name for k in no_decay_keywords)
        layer = layer_of(name) if layer_of else num_layers - 1
        g = groups.setdefault((layer, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers - 1 - layer), "layer_id": layer})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


DECAYS = ("cosine", "poly")


class WarmupSchedule:
    """lr(step) / peak for one param group: linear warmup from `start` to `peak`, then from `peak` to `end` along a
    cosine, or along (1 - t)^power (`poly`, mmseg's PolyLR). As in the official code (timm 0.4.12), start and end are
    not layer-scaled; the peak is, exactly once."""

    def __init__(self, peak: float, start: float, end: float, warmup_steps: int, total_steps: int,
                 decay: str = "cosine", power: float = 1.0):
        check(decay in DECAYS, f"unknown schedule {decay!r}; use {' or '.join(DECAYS)}")
        self.peak, self.start, self.end, self.decay, self.power = peak, start, end, decay, power
        self.warmup_steps, self.total_steps = int(warmup_steps), max(int(total_steps), 1)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        t = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        if self.decay == "poly":
            return (self.peak - self.end) * (1.0 - t) ** self.power + self.end
        return self.end + 0.5 * (self.peak - self.end) * (1.0 + math.cos(math.pi * t))

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.peak if self.peak else 0.0


def scaled_lr(base: float, total_batch: int) -> float:
    """The official linear scaling rule: lr = base x total batch / 512."""
    return base * total_batch / 512.0


def adamw_with_schedule(groups: list[dict], lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
                        total_steps: int, betas=(0.9, 0.999), fused: bool = False, decay: str = "cosine",
                        power: float = 1.0):
    """AdamW whose groups peak at lr x lr_scale, and a per-step LambdaLR that follows a WarmupSchedule per group.
    The update is torch's fused kernel when `fused` or when every parameter is on a CPU, where torch's default
    AdamW runs one small op per tensor and is several times slower than the fused one."""
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    on_cpu = all(p.device.type == "cpu" for g in clean for p in g["params"])
    opt = torch.optim.AdamW(clean, lr=lr, betas=tuple(betas), eps=1e-8, fused=(fused or on_cpu) or None)
    curves = [WarmupSchedule(g["lr"], warmup_lr, min_lr, warmup_steps, total_steps, decay, power)
              for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, curves)
    return opt, sched


def closure_loss(closure):
    """An optimizer step's closure run with gradients on (the loss it returns), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
