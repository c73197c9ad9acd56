"""Layer-wise lr decay: layer ids of ViT and Swin parameters, and the learning rate each group really gets after real
optimizer steps under the warmup + cosine schedule (decay applied exactly once)."""
from __future__ import annotations

import math
import re

import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback

from conftest import TINY, compose
from fdlight.layer_decay import layer_ids
from fdlight.models.pretrained import Architecture, build_from_pretrained
from fdlight.models.students import build_student, student_kwargs
from fdlight.models.exports import export_timm
from fdlight.stages.finetune import run


def tiny_vit(num_classes=10):
    cfg = compose([])
    model, _ = build_from_pretrained(None, num_classes, 0.0, arch=Architecture(cfg.student.model,
                                                                                student_kwargs(cfg.student)))
    return model


def test_vit_layer_ids_follow_the_official_numbering():
    layer_of, num_layers = layer_ids(tiny_vit())
    assert num_layers == 4  # depth 2 + 2
    expected = {"cls_token": 0, "patch_embed.proj.weight": 0, "blocks.0.norm1.weight": 1,
                "blocks.0.attn.relative_position_bias_table": 1, "blocks.1.mlp.fc2.weight": 2,
                "blocks.1.gamma_2": 2, "fc_norm.weight": 3, "head.weight": 3, "head.bias": 3}
    assert {name: layer_of(name) for name in expected} == expected


def test_swin_layer_ids_put_each_patch_merging_with_the_last_block_before_it():
    model = timm.create_model("swinv2_base_window8_256", img_size=64, window_size=4, embed_dim=16,
                              depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), num_classes=10)
    layer_of, num_layers = layer_ids(model)
    assert num_layers == 1 + 1 + 2 + 1 + 2
    expected = {"patch_embed.proj.weight": 0, "layers.0.blocks.0.attn.qkv.weight": 1,
                "layers.1.downsample.reduction.weight": 1,  # official: end of stage 0
                "layers.1.blocks.0.mlp.fc1.weight": 2, "layers.2.downsample.norm.weight": 2,
                "layers.2.blocks.0.attn.logit_scale": 3, "layers.2.blocks.1.attn.cpb_mlp.0.weight": 4,
                "layers.3.downsample.reduction.weight": 4, "layers.3.blocks.0.norm2.weight": 5,
                "norm.weight": 6, "head.fc.weight": 6}
    assert {name: layer_of(name) for name in expected} == expected
    names = {n for n, _ in model.named_parameters()}
    assert set(expected) <= names  # the names are timm's real ones


def test_any_other_timm_model_is_numbered_by_its_group_matcher():
    layer_of, num_layers = layer_ids(timm.create_model("resnet10t", num_classes=10))
    assert num_layers == 6  # stem, 4 blocks, the head
    expected = {"conv1.0.weight": 0, "bn1.weight": 0, "layer1.0.conv1.weight": 1, "layer4.0.bn2.bias": 4,
                "fc.weight": 5}
    assert {name: layer_of(name) for name in expected} == expected
    # EfficientNet's stages are named `blocks` like a ViT's: its stem must still come first, not with the head
    layer_of, num_layers = layer_ids(timm.create_model("efficientnet_b0", num_classes=10))
    assert layer_of("conv_stem.weight") == 0 and layer_of("classifier.weight") == num_layers - 1
    assert 0 < layer_of("blocks.3.0.conv_pw.weight") < num_layers - 1


def test_a_model_without_a_group_matcher_takes_one_rate_with_a_notice(caplog):
    with caplog.at_level("WARNING", logger="fdlight"):
        layer_of, num_layers = layer_ids(torch.nn.Sequential(torch.nn.Linear(2, 2)), "finetune.layer_decay")
    assert num_layers == 1 and layer_of("0.weight") == 0
    assert [r.getMessage() for r in caplog.records] == [
        "Sequential has no group_matcher to number its layers by: finetune.layer_decay is not applied (one learning "
        "rate for every layer)"]


class RecordLrs(Callback):
    """After each optimizer step: the step count and every group's lr with the names of its parameters."""

    def __init__(self):
        self.records = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in module.model.named_parameters()}
        self.records.append((trainer.global_step, [(g["lr"], [names[id(p)] for p in g["params"]])
                                                   for g in opt.param_groups]))


def expected_layer(name: str) -> int:
    if name in ("cls_token",) or name.startswith("patch_embed."):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else 3


def schedule(step: int, warmup: int, total: int, peak: float, start: float, end: float) -> float:
    """Official semantics: warmup from the unscaled start to the group's (scaled) peak, cosine to the unscaled end."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_group_lrs_after_real_steps_are_base_times_decay_power_times_schedule(tmp_path):
    student = tmp_path / "student.safetensors"
    cfg = compose([])
    export_timm(build_student(cfg.student), student, cfg.student.model, student_kwargs(cfg.student))
    # 64 images / batch 16 = 4 steps per epoch; 3 epochs = 12 steps, 4 of warmup; stop after 9 (inside the cosine).
    recorder = RecordLrs()
    cfg = compose([*TINY, "stage=finetune", f"finetune.pretrained={student}", "data.num_train=64", "data.num_val=16",
                   "finetune.batch_size=16", "finetune.epochs=3", "finetune.warmup_epochs=1", "finetune.max_steps=9",
                   "finetune.base_lr=1.0e-3", "finetune.warmup_lr=1.0e-4", "finetune.min_lr=2.0e-4",
                   "finetune.layer_decay=0.5"])
    run(cfg, tmp_path / "run", callbacks=[recorder])
    assert [step for step, _ in recorder.records] == list(range(1, 10))
    peak, start, end = 1.0e-3 * 16 / 512, 1.0e-4 * 16 / 512, 2.0e-4 * 16 / 512  # every lr scales by batch / 512
    seen_layers = set()
    for step, groups in recorder.records:
        for lr, names in groups:
            layers = {expected_layer(n) for n in names}
            assert len(layers) == 1, names
            layer = layers.pop()
            seen_layers.add(layer)
            expected = schedule(step, 4, 12, peak * 0.5 ** (3 - layer), start, end)
            assert lr == pytest.approx(expected, rel=1e-6, abs=1e-15), \
                (step, names[0])
    assert seen_layers == {0, 1, 2, 3}
    # Once, not twice: after warmup the stem runs at 0.5^3 of the head's lr, not 0.5^6.
    step4 = dict((names[0], lr) for lr, names in recorder.records[3][1])
    assert step4["patch_embed.proj.weight"] / step4["head.weight"] == pytest.approx(0.125)
