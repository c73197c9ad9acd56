"""The student-side head of each teacher (its adaptor) and the file a multi-teacher run exports them in.

An adaptor maps the student's tokens to one teacher's whitened tokens: `linear` is the paper's 1x1 projection
(docs/method.md §1.5), `mlp` a two-layer head as agglomerative models use: Linear, LayerNorm, GELU, Linear (hidden
width = the teacher's). A distillation run with several teachers writes `adaptors.safetensors` beside `student.safetensors`:

    from fdlight.models.adaptors import load_adaptors, teacher_features
    heads = load_adaptors("runs/distill/<run>/adaptors.safetensors")          # {teacher: TeacherHead}
    student = timm.create_model(...)  # student.safetensors, as for any fdlight export
    feats = teacher_features(student, heads, x)   # x: ImageNet-normalised, at the student's resolution
    # feats[teacher]: (B, tokens, teacher width) in the space the loss compared (the teacher's whitened tokens);
    # teacher_features(..., unwhiten=True) maps PHI-S teachers back to the teacher's own feature space.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fdlight.artifacts import save_safetensors
from fdlight.errors import FDLightError, check
from fdlight.models.layout import timm_tokens
from fdlight.models.weights import read_export_metadata, read_state_dict
from fdlight.models.whitening import PhiS

ADAPTORS = ("linear", "mlp")
FORMAT = "fdlight adaptors"
PHI_S_EXPORTED = ("mean", "transform", "scale")  # the frozen transform; the running moments stay in the checkpoint


def build_adaptor(kind: str, dim_in: int, dim_out: int) -> nn.Module:
    """`linear`: nn.Linear (== the official Conv1d(k=1) over tokens); `mlp`: Linear, LayerNorm, GELU, Linear, with
    hidden width dim_out."""
    if kind == "linear":
        return nn.Linear(dim_in, dim_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim_in, dim_out), nn.LayerNorm(dim_out), nn.GELU(), nn.Linear(dim_out, dim_out))
    raise FDLightError(f"unknown adaptor {kind!r}; use teacher.adaptor=linear (the paper's projection) or mlp")


@dataclass(frozen=True)
class HeadSpec:
    """What rebuilds one teacher's head and says which student tokens it reads."""
    adaptor: str
    dim_in: int
    dim_out: int
    whitening: str
    student_prefix_tokens: int
    prefix_in_loss: bool   # False: the head reads the student's patch tokens only
    grid: int              # the student's token grid (a resampled teacher's target is on it too)
    loss_weight: float
    teacher: str           # the teacher config's name


class TeacherHead(nn.Module):
    """Student tokens -> one teacher's predicted tokens, in the whitened space of its loss."""

    def __init__(self, spec: HeadSpec, adaptor: nn.Module, phi_s: PhiS | None = None):
        super().__init__()
        self.spec, self.adaptor, self.phi_s = spec, adaptor, phi_s

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.spec.prefix_in_loss:
            tokens = tokens[:, self.spec.student_prefix_tokens:]
        return self.adaptor(tokens)

    def unwhiten(self, pred: torch.Tensor) -> torch.Tensor:
        """Predicted tokens in the teacher's own feature space; only PHI-S is invertible (fd_ln drops each token's
        mean and scale)."""
        if self.spec.whitening == "none":
            return pred
        check(self.phi_s is not None, f"whitening={self.spec.whitening} is not invertible, so only the whitened "
                                      f"prediction exists; call teacher_features(..., unwhiten=False)")
        return self.phi_s.inverse(pred)


# ------------------------------------------------------------------------------------------------------ export
def save_adaptors(path: str | Path, heads: dict[str, tuple[HeadSpec, dict, dict]], **extra) -> Path:
    """Write {teacher: (spec, adaptor state, PHI-S state or {})} as `<teacher>.adaptor.*` / `<teacher>.phi_s.*`
    tensors, the specs in the metadata."""
    tensors = {}
    for name, (_, adaptor, phi_s) in heads.items():
        tensors.update({f"{name}.adaptor.{k}": v for k, v in adaptor.items()})
        tensors.update({f"{name}.phi_s.{k}": phi_s[k] for k in PHI_S_EXPORTED if k in phi_s})
    meta = {"format": FORMAT, "teachers": json.dumps(list(heads)),
            "heads": json.dumps({n: asdict(spec) for n, (spec, _, _) in heads.items()})}
    meta.update({k: str(v) for k, v in extra.items()})
    return save_safetensors(tensors, path, meta)


def load_adaptors(path: str | Path) -> dict[str, TeacherHead]:
    """{teacher: TeacherHead} (eval mode) from the `adaptors.safetensors` of a multi-teacher run."""
    try:
        meta = read_export_metadata(path)
    except Exception as e:  # noqa: BLE001 - missing, or not a safetensors file
        raise FDLightError(f"cannot read adaptors file {path} ({type(e).__name__}); pass the adaptors.safetensors of "
                           f"a distillation run with several teachers") from e
    check(meta.get("format") == FORMAT, f"{path} is not an adaptors file written by fdlight (format "
                                        f"{meta.get('format')!r}); pass a run's adaptors.safetensors")
    state, specs = read_state_dict(path), json.loads(meta["heads"])
    return {name: _load_head(name, HeadSpec(**specs[name]), state, path) for name in json.loads(meta["teachers"])}


def _load_head(name: str, spec: HeadSpec, state: dict, path) -> TeacherHead:
    adaptor = build_adaptor(spec.adaptor, spec.dim_in, spec.dim_out)
    adaptor.load_state_dict({k.removeprefix(f"{name}.adaptor."): v for k, v in state.items()
                             if k.startswith(f"{name}.adaptor.")})
    phi_s = None
    if spec.whitening == "phi_s":
        phi_s = PhiS(spec.dim_out, batches=0)
        for k in PHI_S_EXPORTED:
            check(f"{name}.phi_s.{k}" in state, f"{path} lacks {name}.phi_s.{k}; the file is incomplete")
            getattr(phi_s, k).copy_(state[f"{name}.phi_s.{k}"])
    return TeacherHead(spec, adaptor, phi_s).eval()


@torch.no_grad()
def teacher_features(student: nn.Module, heads: dict[str, TeacherHead], x: torch.Tensor,
                     unwhiten: bool = False) -> dict[str, torch.Tensor]:
    """Each teacher's tokens as the student predicts them, from one student forward. `x` is a batch as the
    distillation loader gives it (ImageNet-normalised, at the student's resolution). With `unwhiten`, PHI-S
    teachers come back in their own feature space."""
    tokens = timm_tokens(student, x)
    out = {}
    for name, head in heads.items():
        pred = head(tokens)
        out[name] = head.unwhiten(pred) if unwhiten else pred
    return out
