"""stage=linear: the backbone stays frozen (weights, eval mode, no drop path) while the BatchNorm + Linear head
trains; LARS takes trust-ratio steps; bad input is explained."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from timm.layers import DropPath

from conftest import TINY, compose, run_stage
from fdlight.errors import FDLightError
from fdlight.models.pretrained import build_from_pretrained
from fdlight.models.students import build_student, student_kwargs
from fdlight.models.exports import export_timm
from fdlight.modules.classify import LARS, LinearProbe
from fdlight.stages.linear import run


class WatchBackbone(Callback):
    """What the backbone looks like at every training step, and the head's weights at the start."""

    def __init__(self):
        self.training_flags, self.head_start, self.drop_paths = [], None, None

    def on_train_start(self, trainer, module):
        self.head_start = module.head[1].weight.detach().clone()
        self.drop_paths = [m.drop_prob for m in module.backbone.modules() if isinstance(m, DropPath)]

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.training_flags.append(any(m.training for m in module.backbone.modules()))


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    cfg = compose([])
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    export_timm(build_student(cfg.student, drop_path=0.2), path, cfg.student.model, student_kwargs(cfg.student))
    return path


def test_probe_trains_the_head_only_with_a_frozen_eval_mode_backbone(student_file, tmp_path):
    watch = WatchBackbone()
    cfg = compose([*TINY, "stage=linear", f"linear.pretrained={student_file}", "data.num_train=128",
                   "data.num_val=64", "linear.batch_size=32", "linear.epochs=2"])
    metrics = run(cfg, tmp_path / "run", callbacks=[watch])
    assert len(watch.training_flags) == 8 and not any(watch.training_flags)
    assert not any(watch.drop_paths)  # drop path 0 (the official probe left it on, docs/method.md §7.12)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    reference, _ = build_from_pretrained(student_file, num_classes=0, drop_path=0.0)
    for name, value in reference.state_dict().items():
        assert torch.equal(state[f"backbone.{name}"], value), name
    assert not torch.equal(state["head.1.weight"], watch.head_start)  # the head did train
    assert "head.0.weight" not in state and "head.0.running_mean" in state  # BatchNorm without affine
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["val/top1"] == metrics["val/top1"] and "val/top5" in saved and saved["img_per_s"] > 0
    assert (tmp_path / "run" / "head.safetensors").is_file()


def test_probe_module_keeps_its_backbone_frozen_in_eval_mode_when_set_to_train(student_file):
    backbone, _ = build_from_pretrained(student_file, num_classes=0, drop_path=0.1)
    probe = LinearProbe(backbone, 10, dict(batch_size=8)).train()
    assert not probe.backbone.training and probe.head.training
    assert not any(p.requires_grad for p in probe.backbone.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(probe.features(x), probe.features(x))  # drop path 0.1 is built in, yet inactive
    assert isinstance(probe.head[0], nn.BatchNorm1d) and probe.head[0].affine is False and probe.head[0].eps == 1e-6
    assert probe.head[1].weight.std().item() == pytest.approx(0.01, rel=0.3)


def test_lars_step_is_lr_times_trust_ratio_for_matrices_and_plain_for_biases():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4))
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01).step()
    d = gw + 0.1 * w0
    expected_w = w0 - 0.5 * (0.01 * w0.norm() / d.norm()) * d
    assert torch.allclose(w.detach(), expected_w, atol=1e-6)
    assert torch.allclose(b.detach(), b0 - 0.5 * gb, atol=1e-6)  # no decay, no trust ratio on 1-D tensors


def test_linear_without_pretrained_or_with_unknown_optimizer_is_explained(student_file, tmp_path):
    with pytest.raises(FDLightError, match="linear.pretrained is not set"):
        run_stage(["stage=linear"], tmp_path / "a")
    with pytest.raises(FDLightError, match="pretrained file not found"):
        run_stage(["stage=linear", f"linear.pretrained={tmp_path / 'x.safetensors'}"], tmp_path / "b")
    with pytest.raises(FDLightError, match="linear.optimizer='adam' is not known; use lars or sgd"):
        run_stage(["stage=linear", f"linear.pretrained={student_file}", "linear.optimizer=adam",
                   "data.num_train=64", "linear.batch_size=32"], tmp_path / "c")
