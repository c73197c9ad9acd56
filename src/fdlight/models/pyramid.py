"""Multi-scale maps from a timm backbone for dense heads.

`Backbone` turns a ViT (timm Beit / VisionTransformer) into the token maps of four blocks, all at the patch stride,
or a hierarchical model (Swin, ConvNeXt, ResNet, EfficientNet: any timm model whose feature_info has maps at strides
4, 8, 16, 32) into those four maps. Two pyramids bring the ViT maps to strides 4, 8, 16, 32:
`BeitPyramid` (the BEiT/FD recipe for UPerNet: one block per level, deconvolutions up, max-pooling down) and
`SimpleFeaturePyramid` (ViTDet, for Mask R-CNN: the last block only, then a 1x1 + 3x3 conv per level).
`DetectionBackbone` gives torchvision's detectors the OrderedDict and `out_channels` they expect.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from fdlight.errors import FDLightError, check
from fdlight.layer_decay import layer_ids

PYRAMID_STRIDES = (4, 8, 16, 32)


def pyramid_strides(patch: int) -> tuple:
    """Strides 4, 8, 16, 32 from a power-of-two patch; otherwise the BEiT factors x4, x2, x1, /2 of the patch grid
    (e.g. 3.5, 7, 14, 28 for a /14 ViT)."""
    if patch & (patch - 1) == 0 and patch >= 4:
        return PYRAMID_STRIDES
    return (patch / 4, patch / 2, patch, patch * 2)


def default_indices(depth: int) -> list[int]:
    """The blocks feeding the four levels: BEiT's choice for 12 and 24 blocks, quarters of the depth otherwise."""
    known = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}
    return known.get(depth, [max(round(depth * (k + 1) / 4) - 1, 0) for k in range(4)])


def _side(value) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def is_vit(model: nn.Module) -> bool:
    """A plain ViT: patch embedding and one stack of blocks at one stride (EfficientNet's stages are `blocks` too)."""
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and not hasattr(model, "layers")


def pyramid_levels(model: nn.Module) -> list[int]:
    """The feature_info entries (forward_intermediates' indices) of the last map at each stride 4, 8, 16, 32."""
    info = list(getattr(model, "feature_info", None) or [])
    levels = {int(f["reduction"]): i for i, f in enumerate(info)}
    if not all(s in levels for s in PYRAMID_STRIDES):
        found = sorted(levels) or "none"
        raise FDLightError(f"{type(model).__name__} has no feature maps at strides 4, 8, 16 and 32 (it has {found}); "
                           f"dense stages need a ViT (blocks) or a hierarchical model such as a Swin, ConvNeXt or "
                           f"ResNet")
    return [levels[s] for s in PYRAMID_STRIDES]


class Backbone(nn.Module):
    """A timm ViT or hierarchical model as four NCHW maps. ViT: tokens after blocks `indices` (prefix tokens
    dropped); any other: its maps at strides 4-32, through forward_intermediates. Layers past the last map, the final
    norm and the classifier are pruned (they would get no gradient)."""

    def __init__(self, model: nn.Module, indices=None):
        super().__init__()
        self.model = model
        self.is_vit = is_vit(model)
        if self.is_vit:
            depth = len(model.blocks)
            indices = default_indices(depth) if indices is None else [int(i) for i in indices]
            check(len(indices) == 4 and all(-depth <= i < depth for i in indices),
                  f"backbone indices {indices} must name 4 of the model's {depth} blocks (0..{depth - 1})")
            indices = [i % depth for i in indices]
            self.take = sorted(set(indices))
            self.order = [self.take.index(i) for i in indices]
            model.prune_intermediate_layers(self.take, prune_norm=True, prune_head=True)
            self.patch_size = _side(model.patch_embed.patch_size)
            self.channels = [int(model.embed_dim)] * 4
            self.strides = [self.patch_size] * 4
        else:  # a hierarchical model (Swin, ConvNeXt, ResNet, EfficientNet...): its feature pyramid, as timm lists it
            self.take = pyramid_levels(model)
            self.order = list(range(4))
            info = [model.feature_info[i] for i in self.take]
            model.prune_intermediate_layers(self.take, prune_norm=True, prune_head=True)
            self.channels = [int(f["num_chs"]) for f in info]
            self.strides = [int(f["reduction"]) for f in info]
            self.patch_size = self.strides[0]
        pe = getattr(model, "patch_embed", None)
        # a fixed-window model takes one input size; any other (a CNN) the size it is used at (pretrained_cfg)
        self.fixed = getattr(pe, "img_size", None) is not None
        self.img_size = _side(pe.img_size) if self.fixed else _side(model.pretrained_cfg["input_size"][-1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fixed and (x.shape[-1] != self.img_size or x.shape[-2] != self.img_size):
            raise FDLightError(f"the backbone takes {self.img_size}x{self.img_size} inputs (fixed window), got "
                               f"{x.shape[-2]}x{x.shape[-1]}; set the crop/image size to {self.img_size}")
        kw = dict(stop_early=True) if self.is_vit else {}
        maps = self.model.forward_intermediates(x, indices=self.take, intermediates_only=True, **kw)
        return [maps[j] for j in self.order]

    # ----------------------------------------------------------------------------------------- layer decay
    @property
    def num_layers(self) -> int:
        """Layer-decay depth of the (pruned) model as in the official code: blocks + 2 (stem = 0, heads = last)."""
        return layer_ids(self.model)[1]

    def layer_id(self, name: str) -> int:
        """Layer of a parameter named relative to this backbone's model (docs/method.md §2.4)."""
        return layer_ids(self.model)[0](name)


def _scale_steps(in_stride: float, out_stride: float) -> int:
    """Signed number of 2x steps from in_stride to out_stride (+ up-sampling, - down-sampling)."""
    ratio = in_stride / out_stride
    steps = math.log2(ratio)
    if abs(steps - round(steps)) > 1e-6:
        raise FDLightError(f"cannot bring stride {in_stride} to stride {out_stride} by factors of 2; choose pyramid "
                           f"strides that are the patch size times a power of two")
    return int(round(steps))


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "ln":
        return LayerNorm2d(channels)
    raise FDLightError(f"unknown norm {kind!r}; use bn, gn or ln")


class BeitPyramid(nn.Module):
    """BEiT/FD fpn1-4: each of four ViT maps (same stride) brought to its own stride, channels unchanged:
    x4 = deconv, norm, GELU, deconv; x2 = deconv; x1 = identity; /2 = max-pool."""

    def __init__(self, dim: int, in_stride: int, out_strides=None, norm: str = "bn"):
        super().__init__()
        out_strides = out_strides or pyramid_strides(in_stride)
        levels = []
        for stride in out_strides:
            steps = _scale_steps(in_stride, stride)
            if steps > 0:
                layers = []
                for k in range(steps):
                    layers.append(nn.ConvTranspose2d(dim, dim, 2, 2))
                    if k < steps - 1:
                        layers += [_norm2d(norm, dim), nn.GELU()]
                levels.append(nn.Sequential(*layers))
            elif steps < 0:
                levels.append(nn.MaxPool2d(2 ** -steps, 2 ** -steps))
            else:
                levels.append(nn.Identity())
        self.levels = nn.ModuleList(levels)
        self.strides = list(out_strides)
        self.channels = [dim] * len(levels)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [level(x) for level, x in zip(self.levels, maps)]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on the last ViT map: deconvolutions (channels halved per step) or max-pooling
    to each stride, then 1x1 conv + LayerNorm + 3x3 conv + LayerNorm to `out_channels`; plus a stride-2 'pool' level
    for the RPN, keyed '0'..'3', 'pool' as torchvision expects."""

    def __init__(self, dim: int, in_stride: int, out_channels: int = 256, out_strides=None):
        super().__init__()
        out_strides = out_strides or pyramid_strides(in_stride)
        levels = []
        for stride in out_strides:
            steps = _scale_steps(in_stride, stride)
            layers, ch = [], dim
            for k in range(max(steps, 0)):
                check(ch % 2 == 0, f"width {dim} cannot be halved {steps} times for stride {stride}")
                layers.append(nn.ConvTranspose2d(ch, ch // 2, 2, 2))
                ch //= 2
                if k < steps - 1:
                    layers += [LayerNorm2d(ch), nn.GELU()]
            if steps < 0:
                layers.append(nn.MaxPool2d(2 ** -steps, 2 ** -steps))
            layers += [nn.Conv2d(ch, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            levels.append(nn.Sequential(*layers))
        self.levels = nn.ModuleList(levels)
        self.out_channels = out_channels
        self.strides = list(out_strides) + [out_strides[-1] * 2]

    def forward(self, x: torch.Tensor) -> OrderedDict:
        out = OrderedDict((str(i), level(x)) for i, level in enumerate(self.levels))
        out["pool"] = F.max_pool2d(out[str(len(self.levels) - 1)], 1, 2)
        return out


class DetectionBackbone(nn.Module):
    """Backbone + neck for torchvision detectors: ViT -> simple feature pyramid on the last block; Swin -> FPN on its
    four stages. Returns OrderedDict('0'..'3', 'pool') of `out_channels` maps."""

    def __init__(self, backbone: Backbone, out_channels: int = 256, out_strides=None):
        super().__init__()
        self.body = backbone
        if backbone.is_vit:
            self.neck = SimpleFeaturePyramid(backbone.channels[-1], backbone.patch_size, out_channels, out_strides)
            self.strides = self.neck.strides
        else:
            from torchvision.ops import FeaturePyramidNetwork
            from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

            self.neck = FeaturePyramidNetwork(backbone.channels, out_channels, extra_blocks=LastLevelMaxPool())
            self.strides = backbone.strides + [backbone.strides[-1] * 2]
        check(all(float(s).is_integer() and int(s) & (int(s) - 1) == 0 for s in self.strides),
              f"detection levels need power-of-two strides (torchvision's RoIAlign rounds its scales to them), got "
              f"{self.strides} from patch size {backbone.patch_size}; use a /16 or /8 ViT or a Swin")
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        maps = self.body(x)
        if self.body.is_vit:
            return self.neck(maps[-1])
        return self.neck(OrderedDict((str(i), m) for i, m in enumerate(maps)))
