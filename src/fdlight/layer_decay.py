"""Layer ids for layer-wise lr decay (docs/method.md §2.4). The scale decay^(L-1-id) is applied once, by
`fdlight.optim.param_groups` + `adamw_with_schedule`, never again by a scheduler."""
from __future__ import annotations

import logging
import re
from typing import Callable

import torch.nn as nn

log = logging.getLogger("fdlight")

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
    """(name -> layer id, number of layers L) for a timm ViT/Beit (L = depth + 2) or Swin (L = sum(depths) + 2) by
    the official numbering; for any other timm model by its group_matcher; a model without one gets a single layer
    (a flat rate) and a one-line notice naming `key`, the setting that cannot act."""
    blocks = getattr(model, "blocks", None)
    patches = hasattr(model, "patch_embed")  # a ViT or Swin, not a CNN whose stages are named blocks (EfficientNet)
    if patches and isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        depth = len(blocks)
        return (lambda name: vit_layer_id(name, depth)), depth + 2
    layers = getattr(model, "layers", None)
    if patches and isinstance(layers, (nn.Sequential, nn.ModuleList)) and all(hasattr(s, "blocks") for s in layers):
        depths = [len(s.blocks) for s in layers]
        return (lambda name: swin_layer_id(name, depths)), sum(depths) + 2
    if hasattr(model, "group_matcher"):
        return matcher_layer_ids(model)
    log.warning("%s has no group_matcher to number its layers by: %s is not applied (one learning rate for every "
                "layer)", type(model).__name__, key)
    return (lambda name: 0), 1


def matcher_layer_ids(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """Any other timm model: the layers timm's own fine group_matcher numbers (stem first, each block, the head
    last), as timm's own layer decay groups them; a parameter it leaves out sits with the head."""
    from timm.models import group_parameters

    layer_map = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    num_layers = max(layer_map.values()) + 1
    return (lambda name: layer_map.get(name, num_layers - 1)), num_layers
