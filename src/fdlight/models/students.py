"""Students: fresh timm models (the FD shapes, or any timm model through its own feature interface), their init,
the input statistics they are distilled with, and the classes FSDP wraps."""
from __future__ import annotations

import difflib
import importlib
import math
import re

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from fdlight.constants import IMAGENET_MEAN, IMAGENET_STD
from fdlight.errors import FDLightError, check
from fdlight.models.factory import SkipRandomInit, create_model, known_model, takes_img_size
from fdlight.models.layout import TokenLayout, checked_layout, measured_layout, timm_layout


INITS = ("fd", "timm")  # the official FD init of the student's family, or timm's own


def student_kwargs(cfg: DictConfig) -> dict:
    """The timm keyword arguments that rebuild this student's architecture (drop path excluded): the config's, and
    its img_size when the model takes one and the config does not pass it itself (`student=timm`)."""
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") else {}
    if cfg.get("img_size") and "img_size" not in kwargs and takes_img_size(cfg.model.split(".")[0]):
        kwargs["img_size"] = int(cfg.img_size)
    return kwargs


def check_timm_name(cfg: DictConfig) -> None:
    """The student's timm name is set and known to timm (a near miss is named)."""
    import timm

    check(not OmegaConf.is_missing(cfg, "name"), "student=timm needs a model: pass student.name=<timm model>, e.g. "
                                                 "student.name=resnet50 (see timm.list_models())")
    if known_model(str(cfg.model)):
        return
    close = difflib.get_close_matches(str(cfg.model), timm.list_models(), n=3, cutoff=0.75)
    hint = f"did you mean {' or '.join(close)}?" if close else "see timm.list_models() for the names"
    key = "student.name" if cfg.name == cfg.model else "student.model"
    raise FDLightError(f"unknown timm model {cfg.model!r} for {key}; {hint}")


def distilled_cfg(model: nn.Module, img_size: int) -> nn.Module:
    """Record on the model what it is distilled with (timm's pretrained_cfg: the input size and ImageNet's
    statistics, which every student's input is normalised with) instead of the source checkpoint's (BEiT's 0.5),
    and forget the source's weights (hub id, url, tag): the student's weights are its own."""
    cfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", None) or {}).items()
           if k not in ("hf_hub_id", "url", "tag", "test_input_size", "test_crop_pct", "license", "paper_ids",
                        "origin_url", "notes", "pool_size")}
    side = int(img_size[0] if isinstance(img_size, (tuple, list)) else img_size)
    cfg.update(input_size=(3, side, side), mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD))
    model.pretrained_cfg = cfg
    return model


def check_drop_path(rate: float, key: str) -> float:
    number = isinstance(rate, (int, float)) and not isinstance(rate, bool)
    check(number and 0.0 <= float(rate) < 1.0,
          f"{key}={rate!r} is {'outside [0, 1)' if number else 'not a number'}; pass a rate such as {key}=0.1")
    return float(rate)


def build_student(cfg: DictConfig, drop_path: float = 0.0, num_classes: int | None = None, **overrides) -> nn.Module:
    """A randomly initialised student. `num_classes`/`overrides` adapt it for fine-tuning stages."""
    check_timm_name(cfg)
    init = cfg.get("init", "timm")
    check(init in INITS, f"unknown student.init {init!r}; choose one of: {', '.join(INITS)}")
    kwargs = student_kwargs(cfg)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    kwargs.update(overrides)
    rate = check_drop_path(drop_path, "drop_path.student")
    if rate:  # timm's default is 0; a model without drop path (VGG) then builds too
        kwargs["drop_path_rate"] = rate
    if init != "fd" or torch.get_default_device().type == "meta":
        model = create_student(cfg, kwargs)
        if init == "fd" and not _on_meta(model):
            fd_init(model)
        return distilled_cfg(model, kwargs.get("img_size") or cfg.img_size)
    with SkipRandomInit() as skipped:  # the FD init redraws what timm's own init would draw: skip timm's draws
        model = create_student(cfg, kwargs)
    if skipped.unreplaced(model, fd_init(model)):  # an architecture whose own init draws more than the FD init
        model = create_model(cfg.model, pretrained=False, **kwargs)
        fd_init(model)
    return distilled_cfg(model, kwargs.get("img_size") or cfg.img_size)


def create_student(cfg: DictConfig, kwargs: dict) -> nn.Module:
    """timm's model; a shipped FD config's kwargs on another family (student.model=convnext_atto) are refused in
    one line that points at student=timm."""
    try:
        return create_model(cfg.model, pretrained=False, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        if cfg.get("patch_size") is None:  # student=timm: a kwarg the user passed, or a drop path it has no place for
            raise FDLightError(f"timm's {cfg.model} does not take this argument ({e}); drop it from student.kwargs "
                               f"(drop_path_rate: set drop_path.student=0)") from None
        raise FDLightError(f"student={cfg.name} describes an FD ViT/SwinV2 and its kwargs do not fit "
                           f"student.model={cfg.model} ({e}); to distil into any timm model use student=timm "
                           f"student.name={cfg.model}") from None


def student_layout(cfg: DictConfig, model: nn.Module) -> TokenLayout:
    """A shipped FD student's declared layout, checked against the model; a student that declares no stride
    (`student=timm`, a module of one's own) has its layout measured from one forward at student.img_size."""
    declared = OmegaConf.to_container(cfg, resolve=True)
    if declared.get("patch_size") is None:
        return checked_layout(declared, measured_layout(model, int(cfg.img_size)), "student")
    return checked_layout(declared, timm_layout(model), "student")


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def fd_init(model: nn.Module) -> list[nn.Parameter]:
    """The official FD init of a ViT (Beit) or SwinV2 student; returns the parameters it wrote whole."""
    from timm.models.beit import Beit
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, SwinTransformerV2):
        return fd_swinv2_init(model)
    if isinstance(model, (Beit, VisionTransformer)):
        return fd_vit_init(model)
    raise FDLightError(f"student.init=fd knows ViT (Beit) and SwinV2 students, not {type(model).__name__}; "
                       f"use student.init=timm")


@torch.no_grad()
def fd_vit_init(model: nn.Module, std: float = 0.02) -> list[nn.Parameter]:
    """The official FD ViT init (docs/method.md §1.2): Linear/Conv2d weights and the CLS token from a normal of std 0.02
    truncated at +-1 std, zero biases, then each block's attn.proj and mlp.fc2 divided by sqrt(2 * block number).
    LayerNorms, layer scale and the (zero) relative position bias keep their values."""
    from timm.layers import trunc_normal_

    written = []
    # timm's inverse-CDF sampler draws the same truncated normal as torch's, whose rejection loop is ~18x slower
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=std, a=-std, b=std)
            written.append(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
                written.append(m.bias)
    if getattr(model, "cls_token", None) is not None:
        trunc_normal_(model.cls_token, std=std, a=-std, b=std)
        written.append(model.cls_token)
    for i, block in enumerate(getattr(model, "blocks", [])):
        block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
    return written


@torch.no_grad()
def fd_swinv2_init(model: nn.Module, std: float = 0.02, post_norm: float = 1e-5) -> list[nn.Parameter]:
    """The official FD SwinV2 init (docs/method.md §1.2): Linear/Conv2d weights from a normal of std 0.02 cut at +-2
    (absolute, so in effect uncut), zero biases; attn.proj and mlp.fc2 of the k-th block counted over all stages
    divided by sqrt(2k); the res-post-norms (norm1, norm2 of every block) at weight 1e-5, bias 0. The patch
    embedding is included (timm leaves it at PyTorch's default), other LayerNorms and the attention's own
    parameters (logit scale, q/v biases) keep their values."""
    written = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            # torch's sampler, not timm's: at these bounds it is a plain normal draw, while timm's inverse CDF
            # returns exactly -2 (100 std) for about one weight in 2^24
            nn.init.trunc_normal_(m.weight, std=std, a=-2.0, b=2.0)
            written.append(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
                written.append(m.bias)
    blocks = [block for stage in model.layers for block in stage.blocks]
    for k, block in enumerate(blocks, start=1):
        block.attn.proj.weight.div_(math.sqrt(2.0 * k))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * k))
        for norm in (block.norm1, block.norm2):
            nn.init.constant_(norm.weight, post_norm)
            nn.init.zeros_(norm.bias)
            written += [norm.weight, norm.bias]
    return written


def resolve_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def block_classes(cfg: DictConfig, model: nn.Module | None = None) -> set[type]:
    """The student's block class(es): the FSDP wrap and activation-checkpointing unit; the config's `block_class`,
    or (null) the blocks timm's group_matcher names in `model`."""
    if cfg.get("block_class") is None:
        return matcher_blocks(model) if model is not None else set()
    names = cfg.block_class if OmegaConf.is_list(cfg.block_class) else [cfg.block_class]
    return {resolve_class(n) for n in names}


def matcher_blocks(model: nn.Module) -> set[type]:
    """The classes of the modules that timm's fine group_matcher names as blocks (`layer1.0`, `stages.2.blocks.1`,
    `blocks.3`): the repeated unit of any timm model, with no table per family. Empty without a group_matcher."""
    if not hasattr(model, "group_matcher"):
        return set()
    spec = model.group_matcher(coarse=False).get("blocks", [])
    patterns = [spec] if isinstance(spec, str) else [p for p, ordinal in spec if ordinal is None]
    return {type(m) for name, m in model.named_modules()
            if name and any(re.fullmatch(p.lstrip("^"), name) for p in patterns)}
