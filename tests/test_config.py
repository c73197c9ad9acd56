"""Every config group composes into a fully resolved config."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import compose, run_main
from fdlight.config import group_choices
from fdlight.settings import check_sections

GROUPS = ("stage", "teacher", "student", "data", "whitening", "drop_path", "trainer", "logger", "monitor")
NEEDS = {  # choices that need a value from the user to be complete
    ("teacher", "timm"): ["teacher.name=vit_small_patch16_224"],
    ("student", "timm"): ["student.name=resnet50"],
    ("teacher", "open_clip"): ["teacher.name=ViT-B-16"],
    ("data", "imagenet"): ["data.root=/data/imagenet"],
    ("data", "shards"): ["data.root=/data/imagenet-shards"],
    ("data", "ade20k"): ["data.root=/data/ade"],
    ("data", "coco"): ["data.root=/data/coco"],
}


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in group_choices(g)])
def test_every_group_choice_composes_and_resolves(group, choice):
    cfg = compose([f"{group}={choice}", *NEEDS.get((group, choice), [])])
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved[group] if group != "stage" else resolved["stage"] == choice
    check_sections(cfg)


def test_default_is_the_embedded_distillation():
    cfg = compose([])
    assert (cfg.stage, cfg.teacher.name, cfg.student.name, cfg.data.name) == ("distill", "tiny", "tiny", "synthetic")
    assert cfg.whitening.name == "fd_ln" and cfg.drop_path.teacher == 0.0 and cfg.distill.loss_beta == 2.0


def test_teacher_declares_its_geometry_and_statistics():
    for name in ("clip_vitb", "clip_vitl", "dino_vitb", "deit_vitb", "mae_vitb", "esvit_swinb", "tiny"):
        t = compose([f"teacher={name}"]).teacher
        assert t.img_size and t.patch_size and t.dim and len(t.mean) == 3 and len(t.std) == 3, name
    assert compose(["teacher=clip_vitl"]).teacher.patch_size == 14
    assert compose(["teacher=clip_vitb"]).teacher.mean[0] == pytest.approx(0.48145466)


def test_command_line_value_beats_group_file():
    cfg = compose(["drop_path=symmetric", "drop_path.student=0.3"])
    assert cfg.drop_path.teacher == 0.3  # the symmetric ablation follows the student's rate


def test_the_key_check_leaves_hydra_flags_and_deliberate_new_keys_alone():
    from fdlight.__main__ import check_group_overrides
    from fdlight.errors import FDLightError

    for fine in (["-sc", "install=bash"], ["-cd", "/x/a=b", "mykey=1"], ["+notes=x"], ["data.root=/a=b"],
                 ["hydra/launcher=basic"], ["~resume"], ["--cfg", "job", "teacher=tiny"]):
        check_group_overrides(fine)
    for bad, hint in ((["+teachr=tiny"], "did you mean teacher"), (["foo=1"], "the top-level keys are: data, "),
                      (["-m", "distil.epochs=1,2"], "did you mean distill")):
        with pytest.raises(FDLightError, match=hint):
            check_group_overrides(bad)


def test_help_lists_each_groups_choices_without_its_bases(tmp_path):
    res = run_main(["--help"], cwd=tmp_path)
    groups = res.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = {g: c.split(", ") for g, c in (line.split(": ", 1) for line in groups.splitlines() if ": " in line)}
    assert res.returncode == 0 and not [c for choices in listed.values() for c in choices if c.startswith("_")]
    assert listed == {g: list(group_choices(g)) for g in (*GROUPS, "experiment")}
