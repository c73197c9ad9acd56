"""The official FD release's checkpoint layouts (docs/method.md §1.2, §1.5, §2.1): recognised by their keys, converted
to the timm layouts fdlight builds (Beit for the ViT students, SwinTransformerV2 for the Swin student), and matched to
a student config by their shapes.

Layouts (after the `{'model': ...}` wrapper and `module.` prefixes are removed):
  official FD distillation  `encoder.*` (the student) + `decoder.*` (the 1x1 projection, kept as fdlight's projector);
                            any other prefix (the frozen teacher) is dropped
  official ViT              BEiT key names, no prefix: `blocks.N.attn.q_bias`, a `relative_position_bias_table`
                            (per block once fine-tuned), `fc_norm`, `head`
  official SwinV2           no prefix, `logit_scale` attention, the patch merging at the END of stages 0..S-2
                            (`layers.0.downsample.*`) and/or the position-bias MLP named `rpe_mlp`
The ViT names are timm Beit's; only the index buffers go. The SwinV2 conversion moves `layers.i.downsample` to
`layers.{i+1}.downsample` (timm merges at the start of the next stage), renames `rpe_mlp` to `cpb_mlp` and `head` to
`head.fc`, and drops the coordinate, index and mask buffers that timm recomputes; their shapes (window and grid sizes)
still take part in matching the architecture.
"""
from __future__ import annotations

import pickle
import re
import types
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fdlight.config import group_choices, group_config
from fdlight.errors import FDLightError, check
from fdlight.models.students import student_kwargs

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
GEOMETRY_BUFFERS = ("relative_position_index", "attn_mask")  # their shapes pin window and grid sizes
DROPPED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")
UNUSED = ("mask_token",)  # the official encoders may carry a masking token FD never uses
# DEV.PRED_FEAT of the official configs -> fdlight's teacher config (docs/method.md §1.3)
OFFICIAL_TEACHERS = {"CLIP_400M": "clip_vitb", "CLIP_400M_Large": "clip_vitl", "DINO": "dino_vitb",
                     "DEIT": "deit_vitb", "ESVIT": "esvit_swinb"}
FAMILY_MODELS = {"vit": ("beit",), "swinv2": ("swinv2",)}


@dataclass(frozen=True)
class Layout:
    name: str
    family: str       # vit | swinv2
    distilled: bool   # a distillation checkpoint (student + projector) rather than a plain model
    keys: str         # what identifies it, for messages

    def __str__(self) -> str:
        return self.name


VIT_DISTILL = Layout("official FD distillation ViT", "vit", True, "encoder.blocks.N.attn.q_bias + decoder.*")
SWIN_DISTILL = Layout("official FD distillation SwinV2", "swinv2", True, "encoder.layers.N.* + decoder.*")
VIT = Layout("official ViT", "vit", False, "blocks.N.attn.q_bias + relative_position_bias_table, e.g. the "
                                           "fine-tuned classifiers")
SWIN = Layout("official SwinV2", "swinv2", False, "layers.N.blocks.N.attn.logit_scale + rpe_mlp or merging at a "
                                                  "stage's end")
LAYOUTS = (VIT_DISTILL, SWIN_DISTILL, VIT, SWIN)


@dataclass
class Converted:
    """An official checkpoint in timm's key layout."""
    layout: Layout
    student: dict[str, torch.Tensor]                      # timm keys (Beit / SwinTransformerV2), buffers dropped
    projector: dict[str, torch.Tensor] | None = None      # fdlight's nn.Linear projector: weight (C_t, C_s), bias
    geometry: dict[str, torch.Size] = field(default_factory=dict)  # timm names of the dropped geometry buffers
    teacher: str | None = None                            # fdlight teacher config named by the file's own config

    @property
    def num_classes(self) -> int:
        head = self.student.get("head.weight", self.student.get("head.fc.weight"))
        return 0 if head is None else int(head.shape[0])


@dataclass
class Match:
    """The student config whose architecture has exactly the checkpoint's shapes, and the kwargs of that form."""
    student: str
    config: DictConfig
    timm_model: str
    kwargs: dict


# ------------------------------------------------------------------------------------------------------ reading
class Opaque(dict):
    """Stands in for any object a checkpoint pickles beside its tensors (the official yacs config, numpy scalars):
    items and state are kept as plain data; nothing is imported or run."""

    def __init__(self, *args, **kwargs):
        super().__init__()  # what the original was built from is not needed, and is never called

    def __setstate__(self, state) -> None:
        self.__dict__["state"] = state

    def append(self, item) -> None:
        self.__dict__.setdefault("items_list", []).append(item)

    def extend(self, items) -> None:
        self.__dict__.setdefault("items_list", []).extend(items)


@lru_cache(maxsize=None)
def _opaque(full_name: str) -> type:
    return type(full_name.rpartition(".")[2] or "Opaque", (Opaque,), {"source": full_name})


def _safe_globals() -> dict:
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


class InertUnpickler(pickle.Unpickler):
    """torch.load's own allow-list (tensor rebuilding, OrderedDict, ...) and an inert stand-in for everything else."""

    def find_class(self, module: str, name: str):
        allowed = _safe_globals()
        full = f"{module}.{name}"
        return allowed[full] if full in allowed else _opaque(full)


INERT_PICKLE = types.ModuleType("fdlight_inert_pickle")
INERT_PICKLE.Unpickler = InertUnpickler
INERT_PICKLE.load = lambda f, **kw: InertUnpickler(f, **kw).load()


def load_torch_file(path: str | Path, mmap: bool = False):
    """torch.load with weights only; a checkpoint that also pickles objects (the official release saves its yacs
    config beside the weights) is read again with those objects replaced by inert dicts. Any other file fails in
    fdlight's words: torch's advice to load it with weights_only=False does not apply (fdlight never runs a pickle)."""
    try:
        with warnings.catch_warnings():  # the protocol notice of an old pickle says nothing the user can act on
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():
            reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
            why = reason.group(1) if reason else "its pickle holds other objects"
            raise pickle.UnpicklingError(f"not a checkpoint of tensors ({why})") from None
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=INERT_PICKLE)


def tensors_of(raw) -> dict[str, torch.Tensor]:
    """The state dict inside the usual wrappers ({'model': ...}, {'state_dict': ...}), 'module.' prefixes stripped."""
    for key in ("state_dict", "model", "module"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict):
        return {}
    return {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def embedded_teacher(raw) -> str | None:
    """The teacher config the file's own official config names (`config.DEV.PRED_FEAT`), when it carries one."""
    node = raw
    for key in ("config", "DEV", "PRED_FEAT"):
        node = node.get(key) if isinstance(node, dict) else None
    return OFFICIAL_TEACHERS.get(node) if isinstance(node, str) else None


# -------------------------------------------------------------------------------------------------- recognition
def _is_vit(keys) -> bool:
    return ("patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys
            and "blocks.0.attn.q_bias" in keys and any(k.endswith("relative_position_bias_table") for k in keys))


def _is_swin_v2(keys, prefixed: bool) -> bool:
    if "layers.0.blocks.0.attn.logit_scale" not in keys:
        return False
    official_names = any(".attn.rpe_mlp." in k for k in keys) or "layers.0.downsample.reduction.weight" in keys
    return prefixed or official_names  # timm's own layout (no prefix, cpb_mlp, merging first) is not official


def detect_layout(sd: dict) -> Layout | None:
    """The official layout of an unwrapped state dict, by its keys; None for any other file."""
    inner = {k.removeprefix("encoder.") for k in sd if k.startswith("encoder.")}
    if inner:
        return VIT_DISTILL if _is_vit(inner) else SWIN_DISTILL if _is_swin_v2(inner, True) else None
    keys = set(sd)
    return VIT if _is_vit(keys) else SWIN if _is_swin_v2(keys, False) else None


def tried_layouts() -> str:
    return "; ".join(["an fdlight export (.safetensors with timm_model metadata)",
                      *(f"{lay.name} ({lay.keys})" for lay in LAYOUTS)])


def unknown_layout(path, sd: dict, also: str = "") -> FDLightError:
    """One line: the layouts tried and the first keys the file holds."""
    first = ", ".join(list(sd)[:5]) or "no tensors"
    return FDLightError(f"{path} is none of the checkpoint layouts fdlight reads (tried: {tried_layouts()}{also}); "
                        f"its first keys: {first}")


# --------------------------------------------------------------------------------------------------- conversion
def split_buffers(sd: dict) -> tuple[dict, dict[str, torch.Size]]:
    """(parameters, shapes of the geometry buffers): timm recomputes the index, coordinate and mask buffers."""
    params = {k: v for k, v in sd.items() if not k.endswith(DROPPED_BUFFERS) and k.split(".")[-1] not in UNUSED}
    geometry = {k: v.shape for k, v in sd.items() if k.endswith(GEOMETRY_BUFFERS)}
    return params, geometry


def drop_zero_k_bias(sd: dict, path) -> dict:
    """A key bias is fixed at zero in timm's Beit and SwinV2 (the official DEV.VIT_WITHKBIAS=False)."""
    for k in [k for k in sd if k.endswith(".attn.k_bias")]:
        check(not sd[k].any(), f"{path}: {k} is a learned, non-zero key bias; timm's attention fixes it at zero, so "
                               f"these weights cannot load exactly")
        del sd[k]
    return sd


def swin_to_timm(sd: dict, path) -> dict:
    """Official SwinV2 names -> timm's: merging moved to the next stage, rpe_mlp -> cpb_mlp, head -> head.fc."""
    at_end = any(k.startswith("layers.0.downsample.") for k in sd)  # stage 0 merges only when merging ends a stage
    out = {}
    for k, v in sd.items():
        if at_end:
            k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        k = k.replace(".attn.rpe_mlp.", ".attn.cpb_mlp.")
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[k] = v.reshape(-1, 1, 1) if k.endswith("attn.logit_scale") else v  # timm: (heads, 1, 1)
    check_merging_order(out, path)
    return out


def check_merging_order(sd: dict, path) -> None:
    """timm's SwinV2 merging normalises AFTER the reduction (2C channels); a norm over the 4C inputs cannot load."""
    for k, w in sd.items():
        if k.endswith("downsample.reduction.weight"):
            norm = sd.get(k.replace("reduction.weight", "norm.weight"))
            if norm is not None and norm.numel() != w.shape[0]:
                raise FDLightError(f"{path}: {k.replace('reduction.weight', 'norm')} has {norm.numel()} channels "
                                   f"(the reduction's input, {w.shape[1]}): this merging normalises before the "
                                   f"reduction, timm's SwinV2 after it, so these weights cannot load exactly")


def projector_of(sd: dict, path) -> dict[str, torch.Tensor] | None:
    """The decoder's 1x1 convolution (Conv1d or Conv2d: (C_t, C_s, 1[, 1])) as fdlight's Linear projector."""
    weights = [v for k, v in sd.items() if k.endswith("weight") and v.dim() >= 2]
    biases = [v for k, v in sd.items() if k.endswith("bias")]
    if not weights:
        return None
    check(len(weights) == 1 and len(biases) <= 1 and all(s == 1 for s in weights[0].shape[2:]),
          f"{path}: decoder.* holds {sorted(sd)}, not one 1x1 projection; FD's decoder is a single 1x1 convolution")
    w = weights[0].reshape(weights[0].shape[0], weights[0].shape[1])
    return {"weight": w, "bias": biases[0] if biases else torch.zeros(w.shape[0], dtype=w.dtype)}


def convert(raw, path="checkpoint") -> Converted | None:
    """An official checkpoint (raw torch.load result or state dict) in timm's layout; None for any other file."""
    sd = tensors_of(raw)
    layout = detect_layout(sd)
    if layout is None:
        return None
    projector = None
    if layout.distilled:
        projector = projector_of({k: v for k, v in sd.items() if k.startswith("decoder.")}, path)
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    student, geometry = split_buffers(sd)
    student = drop_zero_k_bias(student, path)
    if layout.family == "swinv2":
        student = swin_to_timm(student, path)
    return Converted(layout, student, projector, geometry, embedded_teacher(raw))


def adapt_official(raw) -> dict[str, torch.Tensor]:
    """The timm state dict of an official checkpoint (weights.ADAPTERS['official']); the projector is left out."""
    converted = convert(raw)
    if converted is None:
        raise unknown_layout("checkpoint", tensors_of(raw))
    return converted.student


# ----------------------------------------------------------------------------------------------------- matching
def file_kwargs(cfg: DictConfig, conv: Converted) -> dict:
    """The student config's timm kwargs in the file's form: shared or per-block bias, token or mean pooling, head."""
    kw = student_kwargs(cfg)
    sd = conv.student
    if conv.layout.family == "vit":
        kw["use_shared_rel_pos_bias"] = SHARED_TABLE in sd
        kw["use_rel_pos_bias"] = "blocks.0.attn.relative_position_bias_table" in sd
        kw["global_pool"] = "avg" if "fc_norm.weight" in sd else "token"
    kw["num_classes"] = conv.num_classes
    return kw


def fits(model: torch.nn.Module, conv: Converted) -> bool:
    """Same keys and shapes, and the same window and grid sizes where the file kept its geometry buffers."""
    own = model.state_dict()
    if set(own) != set(conv.student) or any(own[k].shape != v.shape for k, v in conv.student.items()):
        return False
    buffers = dict(model.named_buffers())
    return all(buffers[k].shape == s for k, s in conv.geometry.items() if k in buffers)


def _meta_model(name: str, kwargs: dict) -> torch.nn.Module | None:
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - a config that cannot take the file's form is simply no match
        return None


@lru_cache(maxsize=1)
def shipped_students() -> tuple[tuple[str, DictConfig], ...]:
    """conf/student/*.yaml as they ship, those of a fixed shape (student=timm names no model until it is given)."""
    configs = ((name, group_config("student", name)) for name in group_choices("student"))
    return tuple((name, c) for name, c in configs if not OmegaConf.is_missing(c, "name"))


def student_config(spec: str) -> tuple[str, DictConfig]:
    """A shipped student config by name, or a student config file (YAML with model, kwargs, ...)."""
    if spec in group_choices("student"):
        return spec, group_config("student", spec)
    path = Path(spec).expanduser()
    check(path.suffix in (".yaml", ".yml") and path.is_file(),
          f"student {spec!r} is neither a shipped student config ({', '.join(group_choices('student'))}) nor a "
          f"student .yaml file")
    cfg = OmegaConf.load(path)
    check("model" in cfg and "kwargs" in cfg, f"{path} is not a student config (it needs model: and kwargs:, like "
                                              f"conf/student/*.yaml)")
    return str(cfg.get("name", path.stem)), cfg


def match_student(conv: Converted, candidates) -> Match | None:
    """The first (name, config) whose timm model has exactly the checkpoint's shapes."""
    for name, cfg in candidates:
        if not str(cfg.model).startswith(FAMILY_MODELS[conv.layout.family]):
            continue
        kwargs = file_kwargs(cfg, conv)
        model = _meta_model(str(cfg.model), kwargs)
        if model is not None and fits(model, conv):
            return Match(name, cfg, str(cfg.model), kwargs)
    return None


def describe_shapes(conv: Converted) -> str:
    """Depth, width, heads, patch and window sizes read from the checkpoint's tensors."""
    sd = conv.student
    stem = sd.get("patch_embed.proj.weight", torch.empty(0, 0, 0, 0))
    width, patch = stem.shape[0], stem.shape[-1]
    if conv.layout.family == "vit":
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        table = next(v for k, v in sd.items() if k.endswith("relative_position_bias_table"))
        grid = (round((table.shape[0] - 3) ** 0.5) + 1) // 2
        return f"depth {depth}, width {width}, {table.shape[1]} heads, patch {patch}, {grid}x{grid} tokens"
    stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
    depths = [len({k.split(".")[3] for k in sd if k.startswith(f"layers.{s}.blocks.")}) for s in stages]
    heads = [int(sd[f"layers.{s}.blocks.0.attn.logit_scale"].shape[0]) for s in stages]
    windows = [round(shape[0] ** 0.5) for k, shape in conv.geometry.items()
               if k.endswith("blocks.0.attn.relative_position_index")]
    return f"depths {depths}, width {width}, heads {heads}, patch {patch}" + (f", windows {windows}" if windows else "")


def match_or_fail(conv: Converted, path, candidates, hint: str) -> Match:
    """The matching student config, or one line naming the file's shapes, the configs tried and what to pass."""
    candidates = list(candidates)
    found = match_student(conv, candidates)
    if found is None:
        names = ", ".join(dict.fromkeys(name for name, _ in candidates)) or "none"
        raise FDLightError(f"{path} ({conv.layout}: {describe_shapes(conv)}) matches no student config (tried "
                           f"{names}); {hint}")
    return found
