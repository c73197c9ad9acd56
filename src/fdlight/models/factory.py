"""The one place fdlight builds a timm model: timm's own builder, then the patch embedding computed as one GEMM."""
from __future__ import annotations

import inspect
from functools import lru_cache

import timm
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from fdlight.models.patch_embed import gemm_patch_embed


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """`timm.create_model(name, pretrained, **kwargs)` with the patchify convolution swapped for its GEMM form (same
    parameters, same state dict, same result)."""
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    gemm_patch_embed(model)
    return model


@lru_cache(maxsize=None)
def takes_img_size(name: str) -> bool:
    """Whether timm's class for `name` takes an `img_size` argument (ViTs, Swins do; CNNs do not), read from the
    class of the model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return "img_size" in inspect.signature(type(model).__init__).parameters


def known_model(name: str) -> bool:
    """Whether timm builds `name` (a `.tag` suffix allowed)."""
    return name.split(".")[0] in timm.list_models() or name in timm.list_models(pretrained=True)


_T, _I = torch.Tensor, nn.init
# What a model's own init applies to a parameter to draw it: torch.nn.init's random initialisers (a module's
# reset_parameters), the in-place draws and arithmetic of timm's truncated normal (uniform_, erfinv_, mul_, add_,
# clamp_), and the rescales after them.
RANDOM_INIT_OPS = frozenset({
    _I.uniform_, _I.normal_, _I.trunc_normal_, _I.kaiming_uniform_, _I.kaiming_normal_, _I.xavier_uniform_,
    _I.xavier_normal_, _I.orthogonal_, _I.sparse_,
    _T.uniform_, _T.normal_, _T.erfinv_, _T.mul_, _T.add_, _T.clamp_, _T.div_, _T.sub_, _T.exponential_,
    _T.bernoulli_, _T.random_})


class SkipRandomInit(TorchFunctionMode):
    """While a model is built inside it, the random draws of its own init on its parameters are skipped (their
    memory stays unwritten) and the parameters are recorded; constants (LayerNorm ones and zeros, layer scale, zero
    tables) are still written. For a model whose every drawn parameter is about to be replaced (redrawn by another
    init, or loaded): those draws cost several passes over every weight and are thrown away.

    The caller must replace every parameter in `drawn` (`unreplaced` names those it missed) or rebuild the model."""

    def __init__(self):
        super().__init__()
        self.drawn: dict[int, nn.Parameter] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RANDOM_INIT_OPS:
            target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
            if isinstance(target, nn.Parameter):
                self.drawn[id(target)] = target
                return target
        return func(*args, **kwargs)

    def unreplaced(self, model: nn.Module, replaced) -> list[str]:
        """Names of parameters whose draw was skipped and that are not in `replaced` (parameters, or names)."""
        done = {id(p) if isinstance(p, torch.Tensor) else p for p in replaced}
        return [n for n, p in model.named_parameters() if id(p) in self.drawn and id(p) not in done and n not in done]
