"""The one place fdlight builds a timm model: timm's own builder, then the patch embedding computed as one GEMM."""
from __future__ import annotations

import timm
import torch.nn as nn

from fdlight.models.patch_embed import gemm_patch_embed


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """`timm.create_model(name, pretrained, **kwargs)` with the patchify convolution swapped for its GEMM form (same
    parameters, same state dict, same result)."""
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    gemm_patch_embed(model)
    return model
