"""stage=finetune: the shared-bias remap, the artifacts (metrics, checkpoint, a model plain timm loads and that
predicts what the run measured), ImageFolder data from real JPEG files, and every bad input of the issue."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY, compose, run_main, run_stage
from fdlight.data.synthetic import SyntheticClassification, make_scene
from fdlight.data.transforms import eval_transform
from fdlight.errors import FDLightError
from fdlight.models.students import build_student, student_kwargs
from fdlight.models.exports import export_timm
from fdlight.models.weights import read_export_metadata
from fdlight.modules.classify import FineTune
from fdlight.stages.finetune import build_classifier

SHARED = "rel_pos_bias.relative_position_bias_table"
SMALL = ["stage=finetune", "data.num_train=128", "data.num_val=64", "finetune.batch_size=32"]


@pytest.fixture(scope="module")
def student_file(tmp_path_factory) -> Path:
    """A tiny FD student exported as the distillation stage does, with a non-zero shared bias table."""
    cfg = compose([])
    student = build_student(cfg.student)
    with torch.no_grad():
        student.rel_pos_bias.relative_position_bias_table.normal_()
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    export_timm(student, path, cfg.student.model, student_kwargs(cfg.student), stage="distill")
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, student_file) -> Path:
    run_dir = tmp_path_factory.mktemp("ft") / "run"
    run_stage([*SMALL, f"finetune.pretrained={student_file}", "finetune.epochs=2", "finetune.ema=0.9"], run_dir)
    return run_dir


def test_each_block_gets_a_copy_of_the_shared_bias_then_trains_its_own(student_file, finetuned):
    shared = load_file(str(student_file))[SHARED]
    model, *_ = build_classifier(compose([*TINY, *SMALL, f"finetune.pretrained={student_file}"]), 10)
    tables = [b.attn.relative_position_bias_table for b in model.blocks]
    assert len(tables) == 2 and model.rel_pos_bias is None
    for t in tables:
        assert torch.equal(t.detach(), shared)
    assert tables[0].data_ptr() != tables[1].data_ptr()  # copies, not one shared tensor
    trained = load_file(str(finetuned / "model.safetensors"))
    after = [trained[f"blocks.{i}.attn.relative_position_bias_table"] for i in range(2)]
    assert not torch.allclose(after[0], shared) and not torch.allclose(after[1], shared)
    assert not torch.allclose(after[0], after[1])  # each block trained its own
    assert SHARED not in trained and "norm.weight" not in trained and "fc_norm.weight" in trained


def val_top1(model: torch.nn.Module, n: int = 64) -> float:
    cfg = compose([])
    ds = SyntheticClassification("val", n, cfg.data.raw_size, cfg.data.num_classes, cfg.data.seed, eval_transform(32))
    x = torch.stack([ds[i][0] for i in range(n)])
    y = torch.tensor([ds[i][1] for i in range(n)])
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def test_artifacts_and_a_plain_timm_reload_that_predicts_what_the_run_measured(finetuned):
    metrics = json.loads((finetuned / "metrics.json").read_text())
    for key in ("val/top1", "val/top5", "val_ema/top1", "img_per_s"):
        assert key in metrics
    assert 0.0 <= metrics["val/top1"] <= metrics["val/top5"] <= 1.0 and metrics["img_per_s"] > 0
    assert metrics["steps"] == 2 * (128 // 32)
    assert (finetuned / "checkpoints" / "last.ckpt").is_file() and (finetuned / "model_ema.safetensors").is_file()
    meta = read_export_metadata(finetuned / "model.safetensors")
    assert meta["timm_kwargs"]["num_classes"] == 10 and "drop_path_rate" not in meta["timm_kwargs"]
    # num_classes in the overlay too: else timm drops a head whose size differs from the hub config's
    model = timm.create_model(meta["timm_model"], pretrained=True, **meta["timm_kwargs"],
                              pretrained_cfg_overlay=dict(file=str(finetuned / "model.safetensors"), num_classes=10))
    assert val_top1(model) == pytest.approx(metrics["val/top1"])
    ckpt = torch.load(finetuned / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    from_ckpt = timm.create_model(meta["timm_model"], **meta["timm_kwargs"])
    from_ckpt.load_state_dict({k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), from_ckpt.eval()(x), atol=1e-6)


def test_a_fine_tuned_model_reloads_with_its_head_and_the_class_count_is_checked(finetuned):
    path = finetuned / "model.safetensors"
    cfg = compose([*TINY, *SMALL, f"finetune.pretrained={path}", "finetune.keep_head=true"])
    model, arch, kwargs, _ = build_classifier(cfg, 10)
    meta = read_export_metadata(path)
    plain = timm.create_model(meta["timm_model"], pretrained=True, **meta["timm_kwargs"],
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), plain.eval()(x), atol=1e-6)
    with pytest.raises(FDLightError, match=r"head in .*model.safetensors has 10 classes but the data has 5"):
        run_stage([*SMALL, f"finetune.pretrained={path}", "finetune.keep_head=true", "data.num_classes=5"],
                  finetuned.parent / "five")


def test_a_teachers_raw_weights_file_fine_tunes_with_the_teacher_configs_architecture(tmp_path):
    raw = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    torch.save({"model": raw.state_dict()}, tmp_path / "teacher.pth")  # 1000-class head, wrapped, no metadata
    overrides = [*SMALL, "teacher=tiny", f"finetune.pretrained={tmp_path / 'teacher.pth'}"]
    model, arch, kwargs, _ = build_classifier(compose([*TINY, *overrides]), 10)
    assert arch.timm_model == "vit_tiny_patch16_224" and model.head.out_features == 10
    assert torch.equal(model.blocks[1].mlp.fc1.weight, raw.blocks[1].mlp.fc1.weight)
    assert kwargs["global_pool"] == "avg" and model.fc_norm is not None  # mean pooling + fresh fc_norm, as for FD
    metrics = run_stage([*overrides, "finetune.max_steps=2"], tmp_path / "run")
    assert metrics["steps"] == 2 and metrics["model"] == "vit_tiny_patch16_224"


def test_keep_head_on_a_headless_student_says_so(student_file, tmp_path):
    with pytest.raises(FDLightError, match="has no classifier head"):
        run_stage([*SMALL, f"finetune.pretrained={student_file}", "finetune.keep_head=true"], tmp_path / "r")


def test_missing_and_foreign_pretrained_files_are_named(tmp_path):
    with pytest.raises(FDLightError, match="pretrained file not found: .*nope.safetensors"):
        run_stage([*SMALL, f"finetune.pretrained={tmp_path / 'nope.safetensors'}"], tmp_path / "a")
    deeper = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2)
    torch.save(deeper.state_dict(), tmp_path / "deeper.pth")  # a raw file: architecture from teacher=tiny (depth 2)
    with pytest.raises(FDLightError, match=r"does not fit vit_tiny_patch16_224: unexpected keys .*blocks\.2\."):
        run_stage([*SMALL, "teacher=tiny", f"finetune.pretrained={tmp_path / 'deeper.pth'}"], tmp_path / "b")
    with pytest.raises(FDLightError, match="finetune.pretrained is not set"):
        run_stage(SMALL, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written for a bad run


def test_odd_batch_with_mixup_is_refused_and_fine_without(student_file, tmp_path):
    with pytest.raises(FDLightError, match="batch_size=31 is odd.*finetune.mixup=0 finetune.cutmix=0"):
        run_stage([*SMALL, f"finetune.pretrained={student_file}", "finetune.batch_size=31"], tmp_path / "r")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2,
                              num_classes=10)
    module = FineTune(model, 10, dict(batch_size=31), dict(mixup=0.0, cutmix=0.0, label_smoothing=0.1))
    assert module.mixup is None


# ------------------------------------------------------------------------------------------------ ImageFolder data
def write_jpegs(root: Path, split: str, classes: int, per_class: int, flat: bool = False) -> None:
    for c in range(classes):
        folder = root / split if flat else root / split / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            scene = make_scene(c * 100 + i, "train" if split == "train" else "val", 40)
            Image.fromarray(scene.image).save(folder / f"c{c}_{i}.JPEG", quality=90)


@pytest.fixture
def folders(tmp_path) -> Path:
    root = tmp_path / "imagenet"
    write_jpegs(root, "train", 3, 8)
    write_jpegs(root, "val", 3, 4)
    return root


def test_imagefolder_jpegs_give_the_class_count_and_top1_only_under_five_classes(folders, student_file, tmp_path):
    assert np.asarray(Image.open(next((folders / "val" / "class_0").iterdir()))).shape == (40, 40, 3)
    metrics = run_stage(["stage=finetune", "data=imagenet", f"data.root={folders}", "data.num_workers=0",
                         f"finetune.pretrained={student_file}", "finetune.batch_size=4", "finetune.epochs=1"],
                        tmp_path / "run")
    assert metrics["num_classes"] == 3 and "val/top1" in metrics and "val/top5" not in metrics
    assert (metrics["data"], metrics["data_root"], metrics["train_images"], metrics["val_images"]) == \
        ("imagenet", str(folders), 24, 12)
    assert read_export_metadata(tmp_path / "run" / "model.safetensors")["timm_kwargs"]["num_classes"] == 3


@pytest.mark.parametrize("layout, message", [
    ("no_val", r"has no val/ folder; arrange it as .*/val/<class>/<image>"),
    ("flat_val", r"val has no class folders \(its images lie loose: move each into a folder named after its class\)"),
    ("no_root", r"data.root=.*missing does not exist"),
])
def test_bad_imagefolder_layouts_are_explained(layout, message, tmp_path, student_file):
    root = tmp_path / "data"
    if layout != "no_root":
        write_jpegs(root, "train", 2, 2)
        if layout == "flat_val":
            write_jpegs(root, "val", 2, 2, flat=True)
    else:
        root = tmp_path / "missing"
    with pytest.raises(FDLightError, match=message):
        run_stage(["stage=finetune", "data=imagenet", f"data.root={root}", "data.num_workers=0",
                   f"finetune.pretrained={student_file}"], tmp_path / "run")


def test_imagenet_without_a_root_and_a_wrong_class_count_are_explained(folders, student_file, tmp_path):
    with pytest.raises(FDLightError, match=r"data=imagenet needs data.root="):
        run_stage(["stage=finetune", "data=imagenet", f"finetune.pretrained={student_file}"], tmp_path / "a")
    with pytest.raises(FDLightError, match=r"data.num_classes=1000 but .*train has 3 class folders"):
        run_stage(["stage=finetune", "data=imagenet", f"data.root={folders}", "data.num_classes=1000",
                   "data.num_workers=0", "finetune.batch_size=4", f"finetune.pretrained={student_file}"],
                  tmp_path / "b")


def test_cli_prints_one_line_for_a_bad_pretrained_file(tmp_path):
    result = run_main(["stage=finetune", "trainer=cpu", f"finetune.pretrained={tmp_path / 'nope.safetensors'}",
                       f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fdlight: error: pretrained file not found")
