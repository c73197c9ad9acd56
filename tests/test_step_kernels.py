"""Speed-only changes compute what the paper's step computes: the GEMM patch embedding and subset drop path."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.beit import Block as BeitBlock

from conftest import compose, run_stage
from fdlight.errors import FDLightError
from fdlight.models.drop_path import SubsetDropPathBeitBlock, set_drop_path_mode, subset_residual
from fdlight.models.patch_embed import PatchConv2d, gemm_patch_embed
from fdlight.models.students import build_student, student_kwargs
from fdlight.models.teachers import build_teacher
from fdlight.stages.distill import build_distillation


def test_gemm_patch_embedding_equals_the_convolution_and_keeps_the_state_dict():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, 8, stride=8)
    x = torch.randn(2, 3, 32, 48)
    expected = conv(x)
    keys = set(conv.state_dict())
    holder = nn.Module()
    holder.patch_embed = nn.Module()
    holder.patch_embed.proj = conv
    assert gemm_patch_embed(holder) and type(conv) is PatchConv2d
    out = conv(x)
    assert out.shape == expected.shape == (2, 24, 4, 6)
    assert torch.allclose(out, expected, atol=1e-5)
    assert set(conv.state_dict()) == keys
    assert torch.allclose(conv(x[..., :36, :44]), nn.functional.conv2d(x[..., :36, :44], conv.weight, conv.bias,
                                                                       stride=8), atol=1e-5)  # ragged: conv path


def test_overlapping_or_padded_convolutions_are_left_alone():
    holder = nn.Module()
    holder.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3)
    assert not gemm_patch_embed(holder) and type(holder.conv1) is nn.Conv2d


def test_built_students_and_teachers_embed_patches_with_a_gemm():
    cfg = compose(["student=swinv2_b"]).student
    student = build_student(cfg)
    assert type(student.patch_embed.proj) is PatchConv2d
    teacher = build_teacher(compose(["teacher=tiny"]).teacher)
    assert type(teacher.model.patch_embed.proj) is PatchConv2d
    plain = timm.create_model(cfg.model, pretrained=False, **student_kwargs(cfg))
    plain.load_state_dict(student.state_dict())
    plain.eval(), student.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(plain.forward_features(x), student.forward_features(x), atol=1e-4)


def _block(rate: float) -> BeitBlock:
    torch.manual_seed(0)
    return BeitBlock(dim=16, num_heads=2, drop_path=rate, init_values=0.1)


def test_subset_block_in_eval_mode_equals_the_timm_block():
    block = _block(0.5).eval()
    x = torch.randn(6, 5, 16)
    expected = block(x)
    block.__class__ = SubsetDropPathBeitBlock
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_subset_residual_runs_the_branch_on_the_kept_samples_only_and_rescales():
    seen = []

    def branch(z):
        seen.append(z.shape[0])
        return torch.ones_like(z)

    x = torch.zeros(10, 3)
    out = subset_residual(x, branch, None, rate=0.3, training=True)
    assert seen == [7]  # round(10 * 0.7) samples computed
    changed = (out != 0).all(dim=1)
    assert int(changed.sum()) == 7
    assert torch.allclose(out[changed], torch.full((7, 3), 10 / 7))  # E[update] = branch, as timm's 1/(1-p)
    assert torch.equal(out[~changed], torch.zeros(3, 3))
    assert torch.equal(subset_residual(x, branch, None, rate=0.3, training=False), torch.ones(10, 3))


def test_subset_drop_path_keeps_each_sample_with_probability_one_minus_p():
    torch.manual_seed(0)
    kept = torch.zeros(8)
    for _ in range(2000):
        out = subset_residual(torch.zeros(8, 1), torch.ones_like, None, rate=0.25, training=True)
        kept += (out[:, 0] != 0).float()
    assert torch.allclose(kept / 2000, torch.full((8,), 0.75), atol=0.04)


def test_drop_path_mode_switches_the_student_blocks_and_rejects_bad_input():
    cfg = compose(["drop_path.mode=subset"])
    module = build_distillation(cfg)
    assert all(type(b) is SubsetDropPathBeitBlock for b in module.student.blocks)
    assert set_drop_path_mode(module.student, "subset") == 2  # idempotent
    assert set_drop_path_mode(module.student, "bernoulli") == 2
    assert all(type(b) is BeitBlock for b in module.student.blocks)
    with pytest.raises(FDLightError, match="drop_path.mode='sometimes'"):
        set_drop_path_mode(module.student, "sometimes")
    with pytest.raises(FDLightError, match="needs a timm Beit student"):
        set_drop_path_mode(build_student(compose(["student=swinv2_b"]).student), "subset")


def test_a_distill_run_with_subset_drop_path_trains(tmp_path, one_thread):
    m = run_stage(["drop_path.mode=subset", "drop_path.student=0.3", "distill.max_steps=6",
                   "data.num_train=64"], tmp_path / "run")
    assert m["steps"] == 6 and m["last_loss"] < m["first_loss"]
