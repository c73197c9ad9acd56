"""Checkpoints in the official FD release's layouts load everywhere fdlight takes weights: finetune (a real run),
build_from_pretrained (linear, segment, detect), diagnose (with the FD objective for a distilled one) and
`python -m fdlight.convert`. Each official file is made FROM fdlight's own models, its keys renamed into the official
layout (`encoder.`/`decoder.` prefixes, the 1x1 conv projector, SwinV2's merging at a stage's end and `rpe_mlp`, the
index/mask buffers, the `{'model': ..., 'optimizer': ..., 'epoch': ...}` wrapper), and must give exactly the features
of the same weights loaded from fdlight's own export."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import timm
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import TINY, compose, run_stage
from fdlight.convert import main as convert_main
from fdlight.diagnostics.loading import build_fd_module, check_projector_teacher, load_subject
from fdlight.errors import FDLightError
from fdlight.models import official
from fdlight.models.exports import export_timm
from fdlight.models.pretrained import build_from_pretrained, downstream_kwargs
from fdlight.models.students import build_student, student_kwargs
from fdlight.models.weights import read_export_metadata, read_state_dict
from fdlight.stages.finetune import build_classifier

SMALL = ["stage=finetune", "data.num_train=64", "data.num_val=32", "finetune.batch_size=16"]
DIAGNOSE = ["stage=diagnose", "diagnose.num_images=8", "diagnose.batch_size=4", "diagnose.landscape.steps=3",
            "diagnose.landscape.two_d=false"]
# A tiny SwinV2 student (three stages: shifted windows in the first two, the merging between them)
SWIN_TINY = {"name": "swinv2_tiny", "model": "swinv2_base_window8_256", "img_size": 32, "patch_size": 8,
             "prefix_tokens": 0, "init": "fd", "no_decay_keywords": ["cpb_mlp", "logit_scale",
                                                                     "relative_position_bias_table"],
             "block_class": "timm.models.swin_transformer_v2.SwinTransformerV2Block",
             "kwargs": {"img_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [2, 2, 2],
                        "num_heads": [1, 2, 4], "window_size": 4, "num_classes": 0}}
BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


# ------------------------------------------------------------------------------------ official layouts, renamed
def with_buffers(model: torch.nn.Module) -> dict:
    """A state dict with the index/coordinate/mask buffers the official code saves (timm keeps them unsaved)."""
    sd = dict(model.state_dict())
    sd.update({k: b for k, b in model.named_buffers() if k.endswith(BUFFERS)})
    return sd


def official_swin_names(sd: dict) -> dict:
    """timm SwinV2 keys -> the official code's: merging at the end of the previous stage, rpe_mlp, head."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        out[k.replace(".cpb_mlp.", ".rpe_mlp.").replace("head.fc.", "head.")] = v
    return out


def wrapped(sd: dict, **extra) -> dict:
    """The official training script's checkpoint dict."""
    return {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "epoch": 299, **extra}


def official_distill(student: torch.nn.Module, projector: torch.nn.Linear, swin: bool, conv2d: bool) -> dict:
    """FD.state_dict(): the student under encoder., the 1x1 conv under decoder., the frozen teacher beside them."""
    sd = with_buffers(student)
    sd = official_swin_names(sd) if swin else sd
    out = {f"encoder.{k}": v.clone() for k, v in sd.items()}
    weight = projector.weight.detach()
    out["decoder.0.weight"] = weight[:, :, None, None] if conv2d else weight[:, :, None]
    out["decoder.0.bias"] = projector.bias.detach().clone()
    out["teacher.visual.proj"] = torch.randn(8, 4)
    return wrapped(out)


@torch.no_grad()
def off_init(model: torch.nn.Module) -> None:
    """Every parameter moved off its init (zero tables, unit norms, equal layer scales): a misplaced one shows."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(x)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> dict:
    """The tiny ViT student: fdlight's distill export, and the same weights in the official distillation layout."""
    root = tmp_path_factory.mktemp("vit")
    cfg = compose([])
    torch.manual_seed(0)
    student = build_student(cfg.student)
    off_init(student)
    projector = torch.nn.Linear(64, 64)
    export_timm(student, root / "student.safetensors", cfg.student.model, student_kwargs(cfg.student),
                teacher="tiny", stage="distill")
    torch.save(official_distill(student, projector, swin=False, conv2d=False), root / "fd_vit.pth")
    return {"root": root, "export": root / "student.safetensors", "official": root / "fd_vit.pth",
            "projector": projector}


@pytest.fixture(scope="module")
def swin(tmp_path_factory) -> dict:
    """The tiny SwinV2 student, exported by fdlight and renamed into the official distillation layout."""
    root = tmp_path_factory.mktemp("swin")
    cfg = OmegaConf.create(SWIN_TINY)
    (root / "swinv2_tiny.yaml").write_text(yaml.safe_dump(SWIN_TINY))
    torch.manual_seed(0)
    student = build_student(cfg)
    off_init(student)
    export_timm(student, root / "student.safetensors", cfg.model, student_kwargs(cfg), teacher="tiny",
                stage="distill")
    torch.save(official_distill(student, torch.nn.Linear(64, 64), swin=True, conv2d=True), root / "fd_swin.pth")
    return {"root": root, "cfg": cfg, "yaml": root / "swinv2_tiny.yaml", "export": root / "student.safetensors",
            "official": root / "fd_swin.pth"}


@pytest.fixture(scope="module")
def vit_classifier(tmp_path_factory, vit) -> dict:
    """An official fine-tuned ViT (per-block bias, fc_norm, 10-way head, no final norm) and the same model."""
    root = tmp_path_factory.mktemp("vit_ft")
    model, arch = build_from_pretrained(vit["export"], num_classes=10, drop_path=0.0)
    off_init(model)
    torch.save(wrapped(with_buffers(model), max_accuracy=71.5), root / "fd_vit_ft.pth")
    plain = timm.create_model(arch.timm_model, **downstream_kwargs(arch, 10, 0.0))  # timm's own patch conv
    plain.load_state_dict(model.state_dict())
    return {"official": root / "fd_vit_ft.pth", "model": model.eval(), "plain": plain.eval()}


# ---------------------------------------------------------------------------------------------------- tests
def test_layouts_are_recognised_by_their_keys(vit, swin, vit_classifier, tmp_path):
    cases = {vit["official"]: official.VIT_DISTILL, swin["official"]: official.SWIN_DISTILL,
             vit_classifier["official"]: official.VIT}
    for path, layout in cases.items():
        renamed = tmp_path / f"weights_{len(list(tmp_path.iterdir()))}.bin"  # the name says nothing
        renamed.write_bytes(path.read_bytes())
        assert official.detect_layout(official.tensors_of(read_state_dict(renamed))) == layout
    swin_classifier = official_swin_names(dict(timm.create_model(SWIN_TINY["model"], **{
        **SWIN_TINY["kwargs"], "num_classes": 5}).state_dict()))
    assert official.detect_layout(swin_classifier) == official.SWIN
    assert official.detect_layout(load_file(str(vit["export"]))) == official.VIT  # BEiT's names are timm Beit's
    assert official.detect_layout(load_file(str(swin["export"]))) is None  # timm's SwinV2 layout is not official
    plain_vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8).state_dict()
    assert official.detect_layout(plain_vit) is None  # a teacher's ViT: no relative position bias


@pytest.mark.parametrize("name", ["vit_b16", "vit_l14", "swinv2_b"])
def test_the_releases_full_size_shapes_match_the_shipped_student_configs(name):
    from fdlight.config import group_config

    cfg = group_config("student", name)
    for distilled in (True, False):
        kwargs = student_kwargs(cfg)
        if not distilled:  # the fine-tuned classifier: per-block bias, mean pooling, 1000 classes
            kwargs["num_classes"] = 1000
            if cfg.model.startswith("beit"):
                kwargs.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=True, global_pool="avg")
        with torch.device("meta"):  # shapes only, no memory
            model = timm.create_model(cfg.model, **kwargs)
        sd = with_buffers(model)
        sd = official_swin_names(sd) if name.startswith("swin") else sd
        if distilled:
            sd = {f"encoder.{k}": v for k, v in sd.items()}
            sd["decoder.0.weight"] = torch.empty(1024, model.num_features, 1, device="meta")
        converted = official.convert(wrapped(sd), name)
        match = official.match_student(converted, official.shipped_students())
        assert converted.layout.distilled == distilled and match.student == name and match.kwargs == kwargs


def test_official_vit_distillation_checkpoint_fine_tunes_like_the_export(vit, batch, tmp_path):
    for pool in ("avg", "token"):
        from_official, arch = build_from_pretrained(vit["official"], num_classes=10, pool=pool)
        from_export, _ = build_from_pretrained(vit["export"], num_classes=10, pool=pool)
        assert arch.layout == official.VIT_DISTILL.name and arch.timm_model == "beit_base_patch16_224"
        assert (features(from_official, batch) - features(from_export, batch)).abs().max().item() == 0.0
    metrics = run_stage([*SMALL, f"finetune.pretrained={vit['official']}", "finetune.max_steps=2"], tmp_path / "ft")
    assert metrics["steps"] == 2 and metrics["pretrained"] == str(vit["official"])
    assert read_export_metadata(tmp_path / "ft" / "model.safetensors")["timm_model"] == "beit_base_patch16_224"


def stage_backbone(cfg, stage: str, path, size: int) -> torch.nn.Module:
    """The backbone `<stage>.pretrained=path` builds (the dense stages at their input size)."""
    from fdlight.stages.dense import backbone_model

    if stage == "linear":
        return build_from_pretrained(path, num_classes=0, teacher_cfg=cfg.teacher)[0]
    OmegaConf.update(cfg, f"{stage}.pretrained", str(path))
    return backbone_model(cfg, cfg[stage], size, stage)[0]


@pytest.mark.parametrize("stage", ["segment", "detect", "linear"])
def test_dense_and_linear_backbones_take_it_at_their_own_size(vit, stage):
    cfg = compose([*TINY, f"stage={stage}"])
    size = 32 if stage == "linear" else 64  # the dense stages resize the bias tables to their input
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    got = features(stage_backbone(cfg, stage, vit["official"], size), x)
    want = features(stage_backbone(cfg, stage, vit["export"], size), x)
    assert (got - want).abs().max().item() == 0.0


def test_official_vit_distillation_checkpoint_in_diagnose_with_its_fd_objective(vit, batch, tmp_path):
    cfg = compose([*TINY, *DIAGNOSE])  # teacher=tiny: the teacher this student is said to be distilled from
    subject = load_subject(str(vit["official"]), cfg)
    own = load_subject(str(vit["export"]), cfg)
    assert subject.kind == "distilled student" and subject.info["layout"] == official.VIT_DISTILL.name
    assert torch.equal(features(subject.model, batch), features(own.model, batch))
    assert torch.equal(subject.run.heads["projector.weight"], vit["projector"].weight.detach())
    module = build_fd_module(subject)
    with torch.no_grad():
        pred = module.prediction(batch)
        want = vit["projector"](features(own.model, batch))
    assert torch.equal(pred, want)
    out = tmp_path / "diag"
    run_stage([*DIAGNOSE, f"diagnose.checkpoints=['{vit['official']}']"], out)
    summary = json.loads((out / "diagnostics.json").read_text())
    assert next(iter(summary["checkpoints"].values()))["summary"]["landscape_loss"] == "fd"


def test_the_fd_objective_needs_the_teacher_the_projector_was_trained_against(vit):
    subject = load_subject(str(vit["official"]), compose([*TINY, *DIAGNOSE]))
    wider = OmegaConf.merge(subject.run.config, {"teacher": {"name": "clip_vitb", "dim": 768}})
    with pytest.raises(FDLightError, match="maps to 64 channels but teacher=clip_vitb has 768; pass teacher="):
        check_projector_teacher(type(subject.run)(wider, subject.run.heads), subject.source)
    with pytest.raises(FDLightError, match="was distilled from teacher deit_vitb, not teacher=tiny"):
        check_projector_teacher(type(subject.run)(subject.run.config, subject.run.heads, None, "deit_vitb"),
                                subject.source)


def test_convert_writes_the_export_a_distill_run_writes(vit, batch, tmp_path):
    out, again = tmp_path / "converted.safetensors", tmp_path / "again.safetensors"
    for path in (out, again):  # two processes: safetensors orders the metadata by a per-process hash
        done = subprocess.run([sys.executable, "-m", "fdlight.convert", str(vit["official"]), str(path), "--teacher",
                               "tiny"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert out.read_bytes() == again.read_bytes()
    assert "official FD distillation ViT -> beit_base_patch16_224 (student config tiny)" in done.stdout
    assert_same_tensors(load_file(str(out)), load_file(str(vit["export"])))
    got, want = read_export_metadata(out), read_export_metadata(vit["export"])
    assert {k: got[k] for k in want} == want  # timm_model, timm_kwargs, format, stage, teacher
    assert got["layout"] == official.VIT_DISTILL.name and got["source"] == str(vit["official"])
    meta = read_export_metadata(out)
    model = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              **meta["timm_kwargs"])
    own = timm.create_model(want["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(vit["export"])),
                            **want["timm_kwargs"])  # plain timm on both sides: the same patch convolution
    assert (features(model, batch) - features(own, batch)).abs().max().item() == 0.0


def test_official_swin_student_loads_everywhere_like_the_export(swin, batch, tmp_path):
    from_official, arch = build_from_pretrained(swin["official"], num_classes=0, student_cfg=swin["cfg"])
    from_export, _ = build_from_pretrained(swin["export"], num_classes=0)
    assert arch.layout == official.SWIN_DISTILL.name
    assert (features(from_official, batch) - features(from_export, batch)).abs().max().item() == 0.0
    cfg = compose([*TINY, *DIAGNOSE])
    OmegaConf.set_struct(cfg, False)
    cfg.student = swin["cfg"]
    subject = load_subject(str(swin["official"]), cfg)
    assert subject.kind == "distilled student" and subject.run.heads["projector.weight"].shape == (64, 64)
    own = load_subject(str(swin["export"]), cfg)
    assert torch.equal(features(subject.model, batch), features(own.model, batch))
    out = tmp_path / "swin.safetensors"
    convert_main([str(swin["official"]), str(out), "--student", str(swin["yaml"]), "--teacher", "tiny"])
    assert_same_tensors(load_file(str(out)), load_file(str(swin["export"])))
    got, want = read_export_metadata(out), read_export_metadata(swin["export"])
    assert {k: got[k] for k in want} == want


def test_a_swin_student_no_config_fits_names_its_shapes_and_the_way_out(swin):
    with pytest.raises(FDLightError, match=r"official FD distillation SwinV2: depths \[2, 2, 2\], width 16, heads "
                                           r"\[1, 2, 4\], patch 2, windows \[4, 4, 4\]\) matches no student config "
                                           r"\(tried swinv2_b, swinv2_g, tiny, vit_b16, vit_l14\); convert it with "
                                           r"`python -m fdlight.convert"):
        build_from_pretrained(swin["official"], num_classes=0)


def test_official_fine_tuned_classifier_keeps_its_head_and_diagnoses(vit_classifier, batch, tmp_path):
    want = vit_classifier["model"]
    cfg = compose([*TINY, *SMALL, f"finetune.pretrained={vit_classifier['official']}", "finetune.keep_head=true",
                   "finetune.drop_path=0"])
    model, arch, kwargs, _ = build_classifier(cfg, 10)
    assert arch.layout == official.VIT.name and kwargs["use_rel_pos_bias"] and not kwargs["use_shared_rel_pos_bias"]
    with torch.no_grad():
        assert torch.equal(model.eval()(batch), want(batch))
    subject = load_subject(str(vit_classifier["official"]), compose([*TINY, *DIAGNOSE]))
    assert subject.kind == "fine-tuned" and subject.num_classes == 10
    with torch.no_grad():
        assert torch.equal(subject.model(batch), want(batch))  # both through fdlight's model factory
    out = tmp_path / "classifier.safetensors"
    convert_main([str(vit_classifier["official"]), str(out)])
    meta = read_export_metadata(out)
    assert meta["stage"] == "finetune" and meta["num_classes"] == "10"
    rebuilt = timm.create_model(meta["timm_model"], pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(out), num_classes=10), **meta["timm_kwargs"])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(batch), vit_classifier["plain"](batch))


def test_official_config_pickled_beside_the_weights_is_read_inertly(vit, tmp_path, monkeypatch):
    # a stand-in for the yacs config object the official script saves: importable while saving only
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__, config.CfgNode = "yacs.config", "CfgNode", CfgNode
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    raw = torch.load(vit["official"], weights_only=True)
    raw["config"] = CfgNode(DEV=CfgNode(PRED_FEAT="DEIT"))
    torch.save(raw, tmp_path / "with_config.pth")
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    converted = official.convert(read_state_dict(tmp_path / "with_config.pth"))
    assert converted.teacher == "deit_vitb" and "yacs" not in sys.modules
    out = tmp_path / "out.safetensors"
    convert_main([str(tmp_path / "with_config.pth"), str(out)])
    assert read_export_metadata(out)["teacher"] == "deit_vitb"


def test_a_pre_norm_patch_merging_is_refused(swin):
    raw = torch.load(swin["official"], weights_only=True)
    sd = raw["model"]
    sd["encoder.layers.0.downsample.norm.weight"] = torch.ones(64)  # 4C: a norm before the reduction
    sd["encoder.layers.0.downsample.norm.bias"] = torch.zeros(64)
    with pytest.raises(FDLightError, match="normalises before the reduction, timm's SwinV2 after it"):
        official.convert(raw, "pre_norm.pth")


def test_an_unknown_layout_fails_in_one_line_naming_the_layouts_and_its_keys(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}}, path)
    with pytest.raises(FDLightError) as err:
        build_from_pretrained(path, num_classes=10)
    text = str(err.value)
    assert "\n" not in text and "is none of the checkpoint layouts fdlight reads (tried: an fdlight export" in text
    assert "official FD distillation ViT (encoder.blocks.N.attn.q_bias + decoder.*)" in text
    assert text.endswith("its first keys: backbone.conv1.weight, fc.weight")
    with pytest.raises(FDLightError, match=r"teacher=tiny's own weights: weights file .* does not fit "
                                           r"vit_tiny_patch16_224: missing keys .*its first keys: backbone.conv1"):
        run_stage([*SMALL, f"finetune.pretrained={path}"], tmp_path / "run")
    assert not (tmp_path / "run").exists()
    out = tmp_path / "out.safetensors"
    (tmp_path / "random.pth").write_bytes(b"\x80" + np.random.default_rng(0).bytes(3000))  # starts as a pickle does
    for argv, message in (([str(path), str(out)], "is none of the checkpoint layouts fdlight reads"),
                          ([str(tmp_path / "random.pth"), str(out)], "random.pth: UnpicklingError: not a checkpoint "
                                                                     "of tensors (Unsupported operand"),
                          ([str(tmp_path / "nope.pth"), str(out)], "nope.pth not found"),
                          ([str(path)], "the following arguments are required: OUT.safetensors")):
        with pytest.raises(SystemExit) as ended:
            convert_main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert ended.value.code == 2 and len(lines) == 1 and lines[0].startswith("fdlight.convert: error: ")
        assert message in lines[0] and not out.exists() and "weights_only" not in lines[0]


def test_convert_never_overwrites_without_force(vit, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as ended:
        convert_main([str(vit["official"]), str(out)])
    assert ended.value.code == 2 and "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    convert_main([str(vit["official"]), str(out), "--force"])
    assert_same_tensors(load_file(str(out)), load_file(str(vit["export"])))
    assert read_export_metadata(out)["teacher"] == "unknown"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temporary file left beside it
