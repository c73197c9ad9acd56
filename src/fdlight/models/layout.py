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
    """Every token of a timm model after its final norm, (B, N, D)."""
    out = model.forward_features(x)
    return out.flatten(1, 2) if out.ndim == 4 else out  # Swin returns NHWC


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
    """The loss pairs tokens one to one, so both grids must match (no feature-map interpolation, as in FD) unless the
    teacher's tokens are resampled (`<who>.resample_tokens=true`). `matching` names student configs whose declared
    grid fits the teacher's, for the message; `who` is the teacher's config key."""
    if student.grid == teacher.grid:
        return
    fix_px = teacher.grid * student.patch_size
    pick = f"student={' or student='.join(matching)}" if matching else "a matching student"
    raise FDLightError(
        f"token grids differ: student {student.describe()} vs {who} {teacher.describe()}; "
        f"train the student at student.img_size={fix_px} so it makes a {teacher.grid}x{teacher.grid} grid "
        f"(the teacher's input is resized to its own {teacher.img_size} px), resample the teacher's tokens to the "
        f"student's grid with {who}.resample_tokens=true, or pick {pick}")


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
