"""Any timm model as the student (student=timm), a module of one's own (fdlight.distill), and the export folder that
plain timm loads: real timm models at tiny sizes, each distilled a few steps from the tiny teacher (4x4 tokens)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file

import fdlight
from conftest import compose, run_main, run_stage
from fdlight.constants import IMAGENET_MEAN, IMAGENET_STD
from fdlight.errors import FDLightError
from fdlight.models.exports import load_student, pooled_features
from fdlight.models.factory import create_model
from fdlight.models.layout import resample_grid
from fdlight.models.students import block_classes, build_student
from fdlight.models.weights import read_export_metadata
from fdlight.stages.distill import build_distillation

FAST = ["distill.max_steps=2", "distill.batch_size=4", "data.num_workers=0"]
# name -> (overrides, student grid); the tiny teacher's grid is 4x4 (+ CLS)
STUDENTS = {
    "convnext": (["student.name=convnext_atto", "student.img_size=128"], 4),                       # equal grids
    "resnet": (["student.name=resnet18", "student.img_size=64"], 2),  # student=timm: teacher_to_student by default
    "mobilenet": (["student.name=mobilenetv3_small_050", "student.img_size=64",
                   "distill.align=student_to_teacher"], 2),
    "vit_reg": (["student.name=vit_small_patch14_reg4_dinov2", "student.img_size=56", "+student.kwargs.depth=2",
                 "+student.kwargs.embed_dim=64", "+student.kwargs.num_heads=2"], 4),                # CLS + 4 registers
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each student distilled 2 steps; {name: run directory}."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("any_student")
    out = {}
    for name, (overrides, _) in STUDENTS.items():
        run_stage(["student=timm", *overrides, *FAST], base / name)
        out[name] = base / name
    return out


def fdlight_features(run, x: torch.Tensor) -> torch.Tensor:
    """The distilled student as fdlight builds it from student.safetensors."""
    meta = read_export_metadata(run / "student.safetensors")
    model = create_model(meta["timm_model"], **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(run / "student.safetensors")))
    return model.eval().forward_features(x)


PLAIN_TIMM = textwrap.dedent("""
    import json, sys
    import timm, torch
    out = {}
    for folder in sys.argv[2:]:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        side = model.pretrained_cfg["input_size"][-1]
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out[folder] = model.forward_features(x)
    assert not any(m.startswith("fdlight") for m in sys.modules)
    torch.save(out, sys.argv[1])
""")


def test_every_export_folder_loads_in_plain_timm_with_the_features_fdlight_trained(runs, tmp_path):
    folders = [str(runs[name] / "student") for name in STUDENTS]
    subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(tmp_path / "f.pt"), *folders], check=True,
                   env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    plain = torch.load(tmp_path / "f.pt")
    for name, (overrides, _) in STUDENTS.items():
        run = runs[name]
        side = int(next(o for o in overrides if o.startswith("student.img_size=")).split("=")[1])
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(plain[str(run / "student")], fdlight_features(run, x), atol=1e-5), name
        config = json.loads((run / "student" / "config.json").read_text())
        assert config["pretrained_cfg"]["input_size"] == [3, side, side]
        assert config["pretrained_cfg"]["mean"] == list(IMAGENET_MEAN)  # what the student was distilled with
        assert config["pretrained_cfg"]["std"] == list(IMAGENET_STD)
        card = (run / "student" / "README.md").read_text()
        metrics = json.loads((run / "metrics.json").read_text())
        assert "library_name: timm" in card and "| teacher | tiny |" in card
        assert f"| images seen | 8 (2 steps of 4 x 1 devices) |" in card
        assert f"{metrics['first_loss']:.4f} -> {metrics['last_loss']:.4f}" in card
    # the one loader for later stages: the run, its folder and its safetensors give the same pooled features
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = [pooled_features(load_student(p), x) for p in
                  (runs["resnet"], runs["resnet"] / "student", runs["resnet"] / "student.safetensors")]
    assert pooled[0].shape == (2, 512) and all(torch.allclose(pooled[0], p, atol=1e-5) for p in pooled)
    # the export holds the trained weights (the final checkpoint's student), not a fresh init
    ckpt = torch.load(runs["convnext"] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    exported = load_file(str(runs["convnext"] / "student" / "model.safetensors"))
    assert exported.keys() == {k.removeprefix("student.") for k in ckpt if k.startswith("student.")}
    assert all(torch.equal(v, ckpt["student." + k]) for k, v in exported.items())


def test_grids_are_aligned_in_the_chosen_direction_and_left_alone_when_equal(one_thread):
    x = torch.randn(2, 3, 64, 64)
    resnet = ["student=timm", "student.name=resnet18", "student.img_size=64"]
    with torch.no_grad():
        t2s = build_distillation(compose([*resnet, "distill.align=teacher_to_student"])).eval()
        assert t2s.target(x).shape == t2s.prediction(x).shape == (2, 4, 64)  # the teacher's 4x4 map brought to 2x2
        s2t = build_distillation(compose([*resnet, "distill.align=student_to_teacher"])).eval()
        tokens = s2t.student.forward_features(x).flatten(2).transpose(1, 2)
        assert s2t.target(x).shape == (2, 16, 64)  # the student's 2x2 map, projected, brought to 4x4
        assert torch.equal(s2t.prediction(x), resample_grid(s2t.projector(tokens), 0, 4))
        same = build_distillation(compose(["student=timm", "student.name=convnext_atto", "student.img_size=128",
                                           "distill.align=teacher_to_student"])).eval()
        x = torch.randn(2, 3, 128, 128)
        raw = same.teacher(same.teacher_input(x))[:, 1:]  # the student has no CLS: the spatial map only
        assert torch.equal(same.target(x), same.whitener(raw))  # equal grids: the paper's path, no resampling
    assert s2t.prefix_in_loss == {"tiny": False}


def test_teacher_tokens_computed_once_serve_students_of_other_grids(one_thread):
    """A shared-teacher sweep runs the teacher once for students that differ (grid, CLS): each pairs the tokens."""
    x = torch.randn(2, 3, 64, 64)
    resnet = build_distillation(compose(["student=timm", "student.name=resnet18", "student.img_size=64"])).eval()
    deit = build_distillation(compose(["student=timm", "student.name=deit_tiny_patch16_224", "student.img_size=64",
                                       "+student.kwargs.patch_size=8", "+student.kwargs.depth=1"])).eval()
    with torch.no_grad():
        shared = deit.teacher_tokens("tiny", x)
        assert torch.equal(resnet.target_of("tiny", x, shared), resnet.target(x))  # 2x2, no CLS
        assert torch.equal(deit.target_of("tiny", x, shared), deit.target(x))  # 8x8 + CLS
        assert deit.target(x).shape == (2, 65, 64) and resnet.target(x).shape == (2, 4, 64)


def test_prefix_tokens_are_distilled_only_when_the_student_has_a_matching_cls(one_thread):
    deit = ["student=timm", "student.name=deit_tiny_patch16_224", "student.img_size=32", "+student.kwargs.patch_size=8",
            "+student.kwargs.depth=1"]
    assert build_distillation(compose(deit)).prefix_in_loss == {"tiny": True}
    reg = ["student=timm", *STUDENTS["vit_reg"][0]]
    module = build_distillation(compose(reg))
    assert module.prefix_in_loss == {"tiny": False} and module.student_layout.prefix_tokens == 5
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert module.prediction(x).shape == module.target(x).shape == (2, 16, 64)


def test_fsdp_blocks_come_from_timms_group_matcher():
    for name, want in (("resnet18", "BasicBlock"), ("convnext_atto", "ConvNeXtBlock"),
                       ("efficientnet_b0", {"DepthwiseSeparableConv", "InvertedResidual"}),
                       ("vit_small_patch14_reg4_dinov2", "Block")):
        cfg = compose(["student=timm", f"student.name={name}"]).student
        with torch.device("meta"):
            got = {c.__name__ for c in block_classes(cfg, build_student(cfg))}
        assert got == (want if isinstance(want, set) else {want}), name


def test_a_timm_student_keeps_timms_init():
    cfg = compose(["student=timm", "student.name=resnet18", "student.img_size=64"]).student
    torch.manual_seed(3)
    ours = build_student(cfg).state_dict()
    torch.manual_seed(3)
    plain = timm.create_model("resnet18", num_classes=0).state_dict()
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


# ------------------------------------------------------------------------------------------------------- bad input
def test_an_unknown_timm_name_is_one_line_exit_2_and_no_run_directory(tmp_path):
    res = run_main(["student=timm", "student.name=resnet5O", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == ("fdlight: error: unknown timm model 'resnet5O' for student.name; "
                                                   "did you mean resnet50 or resnet51q or resnet50t?")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("overrides, message", [
    (["student.name=resnet18", "student.img_size=64", "distill.align=null"],
     r"token grids differ: student 2x2 tokens \(64 px / 32\) vs teacher 4x4 \+ 1 prefix .*distill.align="
     r"teacher_to_student"),
    (["student.name=resnet18", "student.img_size=64", "distill.align=nearest"],
     r"distill.align='nearest' is unknown; use teacher_to_student or student_to_teacher"),
    (["student.name=resnet18", "student.img_size=50", "distill.align=teacher_to_student"],
     r"student.img_size=50 is not a multiple of the ResNet's stride 32 .*use student.img_size=32 or 64"),
])
def test_grids_that_cannot_be_aligned_are_refused_before_a_run_directory(tmp_path, overrides, message):
    with pytest.raises(FDLightError, match=message):
        run_stage(["student=timm", *overrides, *FAST], tmp_path / "r")
    assert not (tmp_path / "r").exists()


class Flat(nn.Module):
    """A module whose features are pooled: no spatial map to distil."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, 8)

    def forward_features(self, x):
        return self.conv(x).mean((2, 3))


def test_a_module_without_forward_features_or_a_spatial_map_is_refused(tmp_path):
    with pytest.raises(FDLightError, match=r"^student module Linear has no forward_features\(x\); give it one"):
        fdlight.distill(student=nn.Linear(2, 2), overrides=["trainer=cpu"], run_dir=tmp_path / "a")
    with pytest.raises(FDLightError, match=r"^student Flat has no spatial feature map: forward_features returns "
                                           r"\(1, 8\), not a \(B, C, H, W\) map"):
        fdlight.distill(student=Flat(), overrides=["trainer=cpu"], run_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------------ Python API
class Convs(nn.Module):
    """A backbone of one's own: stride 8, 24 channels (a 4x4 map at 32 px, the tiny teacher's grid)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), nn.GELU(), nn.Conv2d(16, 24, 2, 2))

    def forward_features(self, x):
        return self.stem(x)


class Tokens(nn.Module):
    """A teacher of one's own that returns tokens: a CLS and a 4x4 patch grid of width 48 at 32 px."""

    def __init__(self):
        super().__init__()
        self.num_prefix_tokens = 1
        self.patch = nn.Conv2d(3, 48, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 48))

    def forward_features(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)


def test_the_python_api_distils_a_module_of_ones_own_through_the_run_template(tmp_path, one_thread):
    student = Convs()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    run_dir = fdlight.distill(student=student, overrides=["trainer=cpu", *FAST], run_dir=tmp_path / "run")
    assert run_dir == tmp_path / "run"
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.json", "student.safetensors",
                                                    "checkpoints"}
    saved = load_file(str(run_dir / "student.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in student.state_dict().items())  # the module itself trained
    assert any(not torch.equal(saved[k], before[k]) for k in before)
    assert read_export_metadata(run_dir / "student.safetensors")["module"].endswith("Convs")
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 2
    with pytest.raises(FDLightError, match="already holds a run"):  # the same run directory rules as the CLI
        fdlight.distill(student=Convs(), overrides=["trainer=cpu", *FAST], run_dir=run_dir)

    teacher = Tokens()
    run_dir = fdlight.distill(student=Convs(), teacher=teacher, overrides=["trainer=cpu", *FAST],
                              run_dir=tmp_path / "both")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["teacher"] == "Tokens" and metrics["steps"] == 2
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------------------------------- what comes afterwards
def test_a_distilled_convnext_fine_tunes_and_segments(runs, tmp_path, one_thread):
    weights = runs["convnext"] / "student.safetensors"
    ft = run_stage(["stage=finetune", f"finetune.pretrained={weights}", "finetune.max_steps=2",
                    "finetune.batch_size=4", "finetune.layer_decay=0.75", "data.num_workers=0", "data.num_val=8"],
                   tmp_path / "ft")
    assert ft["model"] == "convnext_atto" and ft["img_size"] == 128  # the size it was distilled at
    assert 0.0 <= ft["val/top1"] <= 1.0 and (tmp_path / "ft" / "model.safetensors").is_file()
    seg = run_stage(["stage=segment", f"segment.pretrained={weights}", "segment.max_steps=2",
                     "segment.batch_size=2", "data.num_workers=0"], tmp_path / "seg")
    assert seg["backbone"] == "convnext_atto" and 0.0 <= seg["val/mIoU"] <= 1.0
    assert read_export_metadata(tmp_path / "seg" / "model.safetensors")["task"] == "segment"
