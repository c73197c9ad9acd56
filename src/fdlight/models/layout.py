"""Token layouts (resolution, stride, prefix tokens, width), the token map of a timm model, the student/teacher
grid check, and the opt-in resampling of a teacher's token map to the student's grid."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fdlight.errors import FDLightError


@dataclass(frozen=True)
class TokenLayout:
    img_size: int       # input side in pixels
    patch_size: int     # stride of the output token grid in pixels
    prefix_tokens: int  # tokens before the grid (CLS, registers)
    dim: int            # channels per token

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.prefix_tokens + self.grid**2

    def describe(self) -> str:
        extra = f" + {self.prefix_tokens} prefix" if self.prefix_tokens else ""
        return f"{self.grid}x{self.grid}{extra} tokens ({self.img_size} px / {self.patch_size})"


def timm_layout(model: nn.Module) -> TokenLayout:
    """Read the output token layout of a timm model from its own attributes."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None) or model.pretrained_cfg["input_size"][-2:]
    img = img[0] if isinstance(img, (tuple, list)) else img
    stride = model.feature_info[-1]["reduction"] if getattr(model, "feature_info", None) else pe.patch_size[0]
    return TokenLayout(int(img), int(stride), int(getattr(model, "num_prefix_tokens", 0)), int(model.num_features))


def timm_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every token of a timm model (or any module with `forward_features`) after its final norm, (B, N, D)."""
    return as_tokens(model, model.forward_features(x))


def as_tokens(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """forward_features' output as (B, N, D) tokens: tokens as they are, an NHWC map (timm's `output_fmt`, Swin)
    flattened, an NCHW map (CNNs, any other module) flattened and transposed (a view, no copy)."""
    if out.ndim != 4:
        return out
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return out.flatten(1, 2)
    return out.flatten(2).transpose(1, 2)


def measured_layout(model: nn.Module, img_size: int, who: str = "student") -> TokenLayout:
    """The token layout of a model that declares none, from one forward of a blank image (on the meta device when
    the model is there): its final map's grid, stride and width, and its prefix tokens (`num_prefix_tokens`)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()  # one image through train-mode BatchNorm would fail on a 1x1 map and move its statistics
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        model.train(was_training)
    name = type(model).__name__
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if not isinstance(out, torch.Tensor) or out.ndim not in (3, 4):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FDLightError(f"{who} {name} has no spatial feature map: forward_features returns {shape}, not a "
                           f"(B, C, H, W) map or (B, N, C) tokens; pick a model whose last stage is a feature map")
    tokens = as_tokens(model, out)
    side = int(round((tokens.shape[1] - prefix) ** 0.5))
    if side < 1 or side * side != tokens.shape[1] - prefix:
        raise FDLightError(f"{who} {name} has no square spatial feature map at {img_size} px: forward_features "
                           f"returns {tokens.shape[1]} tokens with {prefix} prefix tokens; pick a model whose last "
                           f"stage is a feature map, or another {who}.img_size")
    info = getattr(model, "feature_info", None)
    stride = int(info[-1]["reduction"]) if info else max(img_size // side, 1)  # timm's word, else the measured one
    if side * stride != img_size:
        raise FDLightError(f"{who}.img_size={img_size} is not a multiple of the {name}'s stride {stride} (its final "
                           f"map is {side}x{side}); use {who}.img_size={max(img_size // stride, 1) * stride} or "
                           f"{(img_size // stride + 1) * stride}")
    return TokenLayout(img_size, stride, prefix, int(tokens.shape[-1]))


def checked_layout(declared: dict, actual: TokenLayout, who: str) -> TokenLayout:
    """Declared geometry (config) must agree with the built model; None means 'take the model's'."""
    for field in ("img_size", "patch_size", "prefix_tokens", "dim"):
        want = declared.get(field)
        have = getattr(actual, field)
        if want is not None and int(want) != have:
            raise FDLightError(f"{who} declares {field}={want} but the built model has {field}={have}; "
                               f"fix {who}.{field} or the model kwargs")
    return actual


def check_grids(student: TokenLayout, teacher: TokenLayout, matching: list[str] = (), who: str = "teacher") -> None:
    """The loss pairs tokens one to one, so both grids must match (no feature-map interpolation, as in FD) unless one
    side is resampled (`distill.align`, or `<who>.resample_tokens=true`). `matching` names student configs whose
    declared grid fits the teacher's, for the message; `who` is the teacher's config key."""
    if student.grid == teacher.grid:
        return
    fix_px = teacher.grid * student.patch_size
    pick = f"student={' or student='.join(matching)}" if matching else "a matching student"
    raise FDLightError(
        f"token grids differ: student {student.describe()} vs {who} {teacher.describe()}; "
        f"train the student at student.img_size={fix_px} so it makes a {teacher.grid}x{teacher.grid} grid "
        f"(the teacher's input is resized to its own {teacher.img_size} px), resample the teacher's tokens to the "
        f"student's grid with distill.align=teacher_to_student ({who}.resample_tokens=true for this teacher alone) "
        f"or the student's to the teacher's with distill.align=student_to_teacher, or pick {pick}")


def resample_grid(tokens: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """(B, prefix + g*g, D) tokens -> (B, prefix + grid*grid, D): the g x g patch map resized bilinearly
    (align_corners=False, no antialiasing); the prefix tokens pass through unchanged."""
    head, patches = tokens[:, :prefix], tokens[:, prefix:]
    b, n, d = patches.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise FDLightError(f"cannot resample {n} patch tokens: they do not form a square grid")
    if side == grid:
        return tokens
    maps = patches.transpose(1, 2).reshape(b, d, side, side)
    maps = F.interpolate(maps.float(), size=(grid, grid), mode="bilinear", align_corners=False).to(patches.dtype)
    return torch.cat([head, maps.flatten(2).transpose(1, 2)], dim=1)
