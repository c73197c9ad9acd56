"""Layer ids for layer-wise lr decay (docs/method.md §2.4). The scale decay^(L-1-id) is applied once, by
`fdlight.optim.param_groups` + `adamw_with_schedule`, never again by a scheduler."""
from __future__ import annotations

import re
from typing import Callable

import torch.nn as nn

from fdlight.errors import FDLightError

# ViT parameters that sit before the first block (timm's norm_pre is CLIP's ln_pre).
VIT_STEM = ("cls_token", "reg_token", "pos_embed", "mask_token", "patch_embed.", "norm_pre.")


def vit_layer_id(name: str, depth: int) -> int:
    """0 for the stem, i + 1 for blocks.i.*, depth + 1 for the rest (fc_norm, head, a shared bias table)."""
    if name.startswith(VIT_STEM):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


def swin_layer_id(name: str, depths: list[int]) -> int:
    """Official numbering with timm's names: patch_embed -> 0, layers.s.blocks.b -> sum(depths[:s]) + b + 1, the
    patch merging that opens stage s (timm) closes stage s-1 (official) -> sum(depths[:s]), final norm/head -> last."""
    if name.startswith(("patch_embed.", "absolute_pos_embed")):
        return 0
    m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", name)
    if m:
        s, b = int(m.group(1)), int(m.group(2))
        return sum(depths[:s]) + b + 1
    m = re.match(r"layers\.(\d+)\.downsample\.", name)
    if m:
        return sum(depths[:int(m.group(1))])
    return sum(depths) + 1


def layer_ids(model: nn.Module, key: str = "finetune.layer_decay") -> tuple[Callable[[str], int], int]:
    """(name -> layer id, number of layers L) for a timm ViT/Beit (L = depth + 2) or Swin (L = sum(depths) + 2).
    `key` is the config key that turns layer decay off, for the error on any other model."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        depth = len(blocks)
        return (lambda name: vit_layer_id(name, depth)), depth + 2
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.Sequential, nn.ModuleList)) and all(hasattr(s, "blocks") for s in layers):
        depths = [len(s.blocks) for s in layers]
        return (lambda name: swin_layer_id(name, depths)), sum(depths) + 2
    raise FDLightError(f"layer-wise lr decay knows ViT and Swin layouts, not {type(model).__name__}; "
                       f"set {key}=1.0 for this model")
