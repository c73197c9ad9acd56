"""Frozen teachers: any timm or open_clip model behind one interface, image -> tokens after its own final norm."""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from fdlight.constants import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from fdlight.errors import FDLightError, check
from fdlight.models.factory import SkipRandomInit, create_model
from fdlight.models.layout import TokenLayout, checked_layout, timm_layout, timm_tokens
from fdlight.models.patch_embed import gemm_patch_embed
from fdlight.models.weights import (ADAPTERS, WEIGHT_SUFFIXES, classifier_prefixes, go_offline, is_torchscript,
                                    load_timm_state_dict, network_available, read_state_dict, summarize_load_error)


class Teacher(nn.Module):
    """A frozen feature-map adapter. forward(x) takes images already in the teacher's own normalisation and size and
    returns every token (prefix + grid) after the teacher's final norm, (B, N, D): the FD target before whitening."""

    def __init__(self, model: nn.Module, tokens: Callable, layout: TokenLayout, mean, std, name: str):
        super().__init__()
        self.model = model
        self._tokens = tokens
        self.layout = layout
        self.name = name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def freeze(self) -> "Teacher":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never leaves eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(self.model, x)


def open_clip_tokens(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = visual.forward_intermediates(x, indices=1, normalize_intermediates=True, intermediates_only=False,
                                       output_fmt="NLC", output_extra_tokens=True)
    grid = out["image_intermediates"][-1]
    prefix = out.get("image_intermediates_prefix")
    return torch.cat([prefix[-1], grid], dim=1) if prefix else grid


# --------------------------------------------------------------------------------------------------------- timm
def load_timm_file(model: nn.Module, path: str, adapter: str | None, what: str):
    """Load a local file the way timm loads pretrained weights (unwrap, convert with the family's filter, load);
    only classifier keys may be left over, so a file of another architecture fails with its keys named. Returns
    load_state_dict's missing and unexpected keys."""
    sd = ADAPTERS[adapter](read_state_dict(path))
    heads = classifier_prefixes(model)
    return load_timm_state_dict(model, sd, path, what, allow_missing=heads, allow_unexpected=heads)


def hub_error(name: str, hub_id: str | None, reason: str) -> FDLightError:
    where = f"download the hub repo {hub_id} (model.safetensors or open_clip_pytorch_model.bin) elsewhere" if hub_id \
        else "get the original checkpoint file"
    return FDLightError(f"cannot fetch weights for {name} from the hub ({reason}); {where} and pass "
                        f"teacher.weights=/path/to/file")


def build_timm_teacher(cfg: DictConfig, drop_path: float = 0.0) -> nn.Module:
    import timm

    base = cfg.model.split(".")[0]
    check(base in timm.list_models() or cfg.model in timm.list_models(pretrained=True),
          f"unknown timm model {cfg.model!r} for teacher {cfg.name!r}; see timm.list_models()")
    kwargs = dict(num_classes=0, **(OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.kwargs else {}))
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    weights = cfg.weights
    if weights == "hub":
        pcfg = timm.models.get_pretrained_cfg(cfg.model)
        hub_id = getattr(pcfg, "hf_hub_id", None) if pcfg else None
        if cfg.adapter == "esvit" or pcfg is None or not (hub_id or getattr(pcfg, "url", None)):
            raise hub_error(cfg.name, None, "these weights are not on the hub")
        if not network_available():
            go_offline()
        try:
            return create_model(cfg.model, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - offline, not cached, or a hub error
            raise hub_error(cfg.name, hub_id, f"{type(e).__name__}") from e
    if not weights:
        return create_model(cfg.model, pretrained=False, **kwargs)
    what = f"teacher {cfg.name!r} ({cfg.model})"
    with SkipRandomInit() as skipped:  # the file replaces every drawn weight: skip the model's own draws
        model = create_model(cfg.model, pretrained=False, **kwargs)
    missing = set(load_timm_file(model, str(weights), cfg.adapter, what).missing_keys)
    if skipped.unreplaced(model, [n for n, _ in model.named_parameters() if n not in missing]):
        model = create_model(cfg.model, pretrained=False, **kwargs)  # a part the file lacks keeps its own init
        load_timm_file(model, str(weights), cfg.adapter, what)
    return model


# ---------------------------------------------------------------------------------------------------- open_clip
def looks_like_file(weights) -> bool:
    return weights not in (None, "hub") and (str(weights).endswith(WEIGHT_SUFFIXES) or os.path.exists(str(weights)))


def build_open_clip_visual(cfg: DictConfig) -> nn.Module:
    import open_clip

    name, weights = cfg.model, cfg.weights
    check(name in open_clip.list_models(), f"unknown open_clip model {name!r} for teacher {cfg.name!r}; "
          f"see open_clip.list_models()")
    kwargs = (OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.kwargs else {})
    if looks_like_file(weights):
        if not is_torchscript(weights):
            read_state_dict(weights)  # missing or unreadable: a clear error before open_clip's own
        try:
            if is_torchscript(weights):
                model = open_clip.load_openai_model(str(weights), precision="fp32", device="cpu")
            else:
                model = open_clip.create_model(name, pretrained=str(weights), **kwargs)
        except RuntimeError as e:
            raise summarize_load_error(e, weights, f"teacher {cfg.name!r} ({name})") from e
        return model.visual
    tag = None
    if weights == "hub":
        tags = open_clip.list_pretrained_tags_by_model(name)
        check(bool(tags), f"open_clip has no pretrained tag for {name!r}; pass teacher.weights=/path/to/file")
        tag = tags[0]
    elif weights:
        tag = str(weights)
    if tag and not network_available():
        go_offline()
    try:
        return open_clip.create_model(name, pretrained=tag, **kwargs).visual
    except Exception as e:  # noqa: BLE001
        if tag:
            raise hub_error(cfg.name, f"open_clip {name}:{tag}", type(e).__name__) from e
        raise


def open_clip_layout(visual: nn.Module) -> TokenLayout:
    img = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    return TokenLayout(int(img), int(patch), 1, int(visual.transformer.width))


# -------------------------------------------------------------------------------------------------------- build
def build_teacher(cfg: DictConfig, drop_path: float = 0.0, seed: int = 0) -> Teacher:
    """Build a frozen teacher from its config (conf/teacher/*.yaml)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # randomly initialised teachers (tiny, tests) are reproducible
        if cfg.builder == "timm":
            model = build_timm_teacher(cfg, drop_path)
            actual = timm_layout(model)
            mean = cfg.mean or model.pretrained_cfg.get("mean", IMAGENET_MEAN)
            std = cfg.std or model.pretrained_cfg.get("std", IMAGENET_STD)
            tokens = timm_tokens
        elif cfg.builder == "open_clip":
            check(not drop_path, "teacher drop path is only supported for timm teachers; set drop_path.teacher=0")
            model = build_open_clip_visual(cfg)
            actual = open_clip_layout(model)
            mean = cfg.mean or getattr(model, "image_mean", None) or OPENAI_CLIP_MEAN
            std = cfg.std or getattr(model, "image_std", None) or OPENAI_CLIP_STD
            tokens = open_clip_tokens
        else:
            raise FDLightError(f"unknown teacher.builder {cfg.builder!r}; use timm or open_clip")
    layout = checked_layout(OmegaConf.to_container(cfg, resolve=True), actual, "teacher")
    gemm_patch_embed(model)
    return Teacher(model, tokens, layout, list(mean), list(std), cfg.name)
