"""Stochastic depth that skips the dropped samples' work (`drop_path.mode=subset`, opt-in).

timm's DropPath (the paper's, `drop_path.mode=bernoulli`) computes a residual branch for every sample and then zeroes
each sample's branch with probability p. The subset form computes the branch only on round(B * (1 - p)) samples
drawn without replacement and adds it back scaled by B / kept, so the expected update is unchanged and the dropped
samples cost nothing: with the linear drop-path schedule to 0.2 of the FD ViT-B recipe, about 10% of the student's
block compute. Two differences from per-sample Bernoulli drops: the kept count is fixed per block (not binomial), and
each sample's keep probability is round(B * (1 - p)) / B, within 1 / (2B) of 1 - p (0.4% at B = 128; a block with
B * p < 0.5 drops nothing, so use it with large per-device batches).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models.beit import Block as BeitBlock

from fdlight.errors import check

DROP_PATH_MODES = ("bernoulli", "subset")


def subset_residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], gamma: Optional[torch.Tensor],
                    rate: float, training: bool) -> torch.Tensor:
    """x + drop_path(gamma * branch(x)), with the branch run only on the kept samples."""
    if not training or rate <= 0.0:
        y = branch(x)
        return x + (y * gamma if gamma is not None else y)
    b = x.shape[0]
    keep = max(1, int(round(b * (1.0 - rate))))
    idx = torch.randperm(b, device=x.device)[:keep]
    y = branch(x[idx])
    if gamma is not None:
        y = y * gamma
    return torch.index_add(x, 0, idx, y.to(x.dtype), alpha=b / keep)


def _rate(module: nn.Module) -> float:
    return float(module.drop_prob) if isinstance(module, DropPath) else 0.0


class SubsetDropPathBeitBlock(BeitBlock):
    """timm's Beit block with subset stochastic depth; same parameters and state dict."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = subset_residual(x, lambda z: self.attn(self.norm1(z), shared_rel_pos_bias=shared_rel_pos_bias),
                            self.gamma_1, _rate(self.drop_path1), self.training)
        return subset_residual(x, lambda z: self.mlp(self.norm2(z)), self.gamma_2, _rate(self.drop_path2),
                               self.training)


def set_drop_path_mode(model: nn.Module, mode: str) -> int:
    """Switch the model's Beit blocks to `mode`; returns the number of blocks switched."""
    check(mode in DROP_PATH_MODES, f"drop_path.mode={mode!r} is not one of {', '.join(DROP_PATH_MODES)}")
    blocks = [m for m in model.modules() if isinstance(m, BeitBlock)]
    if mode == "subset":
        check(blocks, f"drop_path.mode=subset needs a timm Beit student (vit_b16, vit_l14, tiny); "
                      f"{type(model).__name__} has no Beit blocks; use drop_path.mode=bernoulli")
    for block in blocks:
        block.__class__ = SubsetDropPathBeitBlock if mode == "subset" else BeitBlock
    return len(blocks)
