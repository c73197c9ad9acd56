"""The FD loss against values computed by hand, the module's full step against a manual recomputation, and the
module built from a config."""
from __future__ import annotations

import math

import torch
from timm.layers import DropPath

from conftest import compose
from fdlight.models.students import build_student
from fdlight.modules.distill import FeatureDistillation, fd_loss, whiten
from fdlight.stages.distill import build_distillation


def smooth_l1_by_hand(pred, target, beta):
    total, n = 0.0, 0
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        e = abs(p - t)
        total += 0.5 * e * e / beta if e < beta else e - 0.5 * beta
        n += 1
    return total / n


def whiten_by_hand(t, eps=1e-5):
    out = torch.empty_like(t)
    for b in range(t.shape[0]):
        for n in range(t.shape[1]):
            row = t[b, n].tolist()
            mu = sum(row) / len(row)
            var = sum((v - mu) ** 2 for v in row) / len(row)
            out[b, n] = torch.tensor([(v - mu) / math.sqrt(var + eps) for v in row])
    return out


def test_loss_on_fixed_tensors_matches_hand_computation():
    pred = torch.tensor([[[0.5, -1.0, 3.0, 0.0]], [[2.5, 0.1, -0.2, 1.0]]])          # (2, 1, 4)
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[-1.0, 0.0, 0.0, 10.0]]])
    w = whiten_by_hand(target)
    assert torch.allclose(whiten(target, "fd_ln"), w, atol=1e-5)
    expected = smooth_l1_by_hand(pred, w, beta=2.0)
    assert abs(fd_loss(pred, whiten(target, "fd_ln"), beta=2.0).item() - expected) < 1e-6
    # a value with both branches: |e| < 2 and |e| >= 2 appear in this example
    e = (pred - w).abs()
    assert bool((e < 2).any()) and bool((e >= 2).any())


def test_whitening_none_keeps_the_target():
    t = torch.randn(2, 3, 5)
    assert torch.equal(whiten(t, "none"), t)


def test_module_step_equals_manual_recomputation():
    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    cfg = compose(["teacher=tiny", f"teacher.mean={clip_mean}", f"teacher.std={clip_std}"])
    module = build_distillation(cfg)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)  # ImageNet-normalised, as the loader gives it
    pixels = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1)
    x_teacher = (pixels - torch.tensor(clip_mean).view(1, 3, 1, 1)) / torch.tensor(clip_std).view(1, 3, 1, 1)
    target = whiten_by_hand(module.teacher.model.forward_features(x_teacher).detach())
    pred = module.projector(module.student.forward_features(x))
    expected = smooth_l1_by_hand(pred.detach(), target, beta=2.0)
    assert abs(module.distill_loss(x).item() - expected) < 1e-4 * expected  # fp32 sums in another order


def test_teacher_input_is_renormalised_to_the_teachers_statistics():
    cfg = compose(["teacher=tiny", "teacher.mean=[0.5,0.5,0.5]", "teacher.std=[0.25,0.25,0.25]"])
    module = build_distillation(cfg)
    raw = torch.rand(1, 3, 32, 32)
    imagenet = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(module.teacher_input(imagenet), (raw - 0.5) / 0.25, atol=1e-5)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_from_config_builds_the_module_the_stage_builds():
    cfg = compose(["drop_path=symmetric"])  # the teacher drops paths too
    torch.manual_seed(0)
    staged = build_distillation(cfg)
    torch.manual_seed(0)
    built = FeatureDistillation.from_config(cfg)
    assert same_state(built, staged) and same_state(built.teacher, staged.teacher)
    assert built.optim_cfg == staged.optim_cfg and built.optim_cfg["clip_grad"] == cfg.distill.clip_grad
    assert built.no_decay_keywords == staged.no_decay_keywords and built.teacher_drop_path is True
    assert built.distill_loss == built._distill_loss  # eager unless asked


def test_from_config_wraps_a_loaded_student_for_evaluation():
    cfg = compose(["drop_path=symmetric"])
    student = build_student(cfg.student)
    module = FeatureDistillation.from_config(cfg, student=student, train=False)
    assert module.student is student and module.optim_cfg == {} and module.teacher_drop_path is False
    assert not any(isinstance(m, DropPath) for m in module.teacher.modules())  # built without drop path


def test_from_config_compiles_the_loss_on_request():
    cfg = compose([])
    torch.manual_seed(0)
    eager = FeatureDistillation.from_config(cfg).eval()
    torch.manual_seed(0)
    compiled = FeatureDistillation.from_config(cfg, compile=True).eval()
    assert compiled.distill_loss != compiled._distill_loss
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(compiled.distill_loss(x), eager.distill_loss(x), rtol=1e-4, atol=1e-6)
