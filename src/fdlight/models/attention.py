"""Which kernel computes a Beit model's biased attention: `trainer.attention=sdpa` (default) or `triton`.

`sdpa` is timm's own path (PyTorch's scaled_dot_product_attention with the relative position bias as the mask).
`triton` swaps each timm Beit attention module for one that calls fdlight's flash-style kernels with a bias gradient
(`fdlight.models.biased_attention`); same parameters, same state dict, same result to rounding. Experimental: it
needs the `triton` package and a CUDA GPU (or TRITON_INTERPRET=1, which runs the kernels slowly on a CPU).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn as nn
from timm.models.beit import Attention as BeitAttention

from fdlight.errors import check

ATTENTION = ("sdpa", "triton")


class TritonBiasAttention(BeitAttention):
    """timm's Beit attention, with fdlight's Triton kernel in place of SDPA (no attention dropout)."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        from fdlight.models.biased_attention import biased_attention

        b, n, c = x.shape
        bias_qkv = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = nn.functional.linear(x, self.qkv.weight, bias_qkv)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        if bias is None:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = biased_attention(q, k, v, bias, self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))


def set_attention(model: nn.Module, mode: str) -> int:
    """Switch every timm Beit attention module of `model` to `mode`; returns how many were switched."""
    check(mode in ATTENTION, f"trainer.attention={mode!r} is not one of {', '.join(ATTENTION)}")
    targets = [m for m in model.modules() if isinstance(m, BeitAttention)]
    if mode == "sdpa":
        for m in targets:
            m.__class__ = BeitAttention
        return len(targets)
    check(importlib.util.find_spec("triton") is not None,
          "trainer.attention=triton needs the triton package: pip install triton (or use trainer.attention=sdpa)")
    from fdlight.models.biased_attention import check_head_dim, interpreted

    check(torch.cuda.is_available() or interpreted(),
          "trainer.attention=triton needs a CUDA GPU (TRITON_INTERPRET=1 runs it slowly on a CPU); "
          "use trainer.attention=sdpa")
    check(targets, f"trainer.attention=triton applies to timm Beit models (the FD ViT students); "
                   f"{type(model).__name__} has none; use trainer.attention=sdpa")
    check(all(m.attn_drop.p == 0 for m in targets), "trainer.attention=triton has no attention dropout; set it to 0")
    for m in targets:
        check_head_dim(m.qkv.out_features // 3 // m.num_heads)
    for m in targets:
        m.__class__ = TritonBiasAttention
    return len(targets)
