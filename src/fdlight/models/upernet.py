"""UPerNet (Xiao et al. 2018) on a timm backbone: the FD/BEiT semantic-segmentation model.

Pyramid pooling on the coarsest map, a top-down FPN over the four levels, all levels fused at stride 4, and an
auxiliary FCN head on the third level (loss weight 0.4 in the BEiT/mmseg recipe). Norm layers are BatchNorm (SyncBN
under DDP, as the recipe) or GroupNorm: the 1x1 pooled map of the pyramid-pooling branch leaves BatchNorm a single
value per channel when a device holds one image, so that case needs `norm=gn`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fdlight.constants import IGNORE
from fdlight.models.pyramid import Backbone, BeitPyramid, _norm2d


def conv_norm_act(cin: int, cout: int, kernel: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), _norm2d(norm, cout),
                         nn.ReLU(inplace=True))


def _interp_matrix(n_in: int, n_out: int, device, dtype) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear interpolation with align_corners=False (PyTorch's bilinear rule)."""
    pos = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(min=0)
    lo = pos.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    w = (pos - lo).clamp(0, 1)
    m = torch.zeros(n_out, n_in, device=device, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - w
    m[torch.arange(n_out), hi] += w
    return m.to(dtype)


def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """F.interpolate(x, size, mode='bilinear', align_corners=False) as two matmuls: the same values, but a GEMM
    backward instead of atomic adds, which made the upsampling the slowest part of a GPU training step."""
    h, w = x.shape[-2:]
    mh, mw = _interp_matrix(h, size[0], x.device, x.dtype), _interp_matrix(w, size[1], x.device, x.dtype)
    return mh @ x @ mw.T


class PyramidPooling(nn.Module):
    """PSP module: average-pool to each scale, 1x1 conv, upsample, concatenate with the input, 3x3 bottleneck."""

    def __init__(self, cin: int, channels: int, scales=(1, 2, 3, 6), norm: str = "bn"):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_norm_act(cin, channels, 1, norm))
                                    for s in scales)
        self.bottleneck = conv_norm_act(cin + len(scales) * channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize_bilinear(stage(x), x.shape[-2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerHead(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 norm: str = "bn", dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales, norm)
        self.lateral = nn.ModuleList(conv_norm_act(c, channels, 1, norm) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(conv_norm_act(channels, channels, 3, norm) for _ in in_channels[:-1])
        self.fuse = conv_norm_act(len(in_channels) * channels, channels, 3, norm)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:-1])] + [self.ppm(feats[-1])]
        for i in range(len(lat) - 1, 0, -1):  # top-down pathway
            lat[i - 1] = lat[i - 1] + resize_bilinear(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.smooth, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0]] + [resize_bilinear(o, size) for o in outs[1:]], dim=1)
        return self.classifier(self.fuse(fused))


class FCNHead(nn.Module):
    """The auxiliary head: 3x3 conv, norm, ReLU, dropout, 1x1 classifier."""

    def __init__(self, cin: int, channels: int, num_classes: int, norm: str = "bn", dropout: float = 0.1):
        super().__init__()
        self.conv = conv_norm_act(cin, channels, 3, norm)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class UPerNet(nn.Module):
    """Backbone -> (ViT: BEiT pyramid) -> UPerNet head; logits at stride 4, plus auxiliary logits when training."""

    def __init__(self, backbone: Backbone, num_classes: int, channels: int = 512, aux_channels: int = 256,
                 aux_level: int = 2, norm: str = "bn", pool_scales=(1, 2, 3, 6), dropout: float = 0.1,
                 out_strides=None):
        super().__init__()
        self.backbone = backbone
        if backbone.is_vit:
            self.neck = BeitPyramid(backbone.channels[0], backbone.patch_size, out_strides, norm)
            in_channels, self.strides = self.neck.channels, self.neck.strides
        else:
            self.neck = nn.Identity()
            in_channels, self.strides = backbone.channels, backbone.strides
        self.head = UPerHead(in_channels, channels, num_classes, pool_scales, norm, dropout)
        self.aux_level = aux_level
        self.aux_head = FCNHead(in_channels[aux_level], aux_channels, num_classes, norm, dropout) \
            if aux_channels else None
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        logits = self.head(feats)
        if self.training and self.aux_head is not None:
            return logits, self.aux_head(feats[self.aux_level])
        return logits


def segmentation_loss(out, y: torch.Tensor, aux_weight: float = 0.4) -> torch.Tensor:
    """Cross-entropy (255 ignored) of logits upsampled to the label size, plus the weighted auxiliary term; in fp32
    (autocast off), as the upsampled logits are the loss's input."""
    logits, aux = out if isinstance(out, tuple) else (out, None)
    size = y.shape[-2:]
    with torch.autocast(y.device.type, enabled=False):
        loss = F.cross_entropy(resize_bilinear(logits.float(), size), y, ignore_index=IGNORE)
        if aux is not None and aux_weight:
            loss = loss + aux_weight * F.cross_entropy(resize_bilinear(aux.float(), size), y, ignore_index=IGNORE)
    return loss
