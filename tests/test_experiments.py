"""Every experiment composes; the paper's twelve recipes carry the hyper-parameters of docs/method.md §1.9 and §2.3
(values typed from those tables, lr scaling checked against the 2048-image numbers); a recipe with a data root that
does not exist fails with a clear error."""
from __future__ import annotations

from importlib import resources

import pytest

from conftest import compose, run_main
from fdlight.errors import FDLightError
from fdlight.settings import check_sections
from fdlight.stages import run

EXPERIMENTS = sorted(p.name[:-5] for p in resources.files("fdlight.conf").joinpath("experiment").iterdir()
                     if p.name.endswith(".yaml"))

# docs/method.md §1.9: teacher, student, epochs, base lr /512, peak at the total batch, warmup lr and min lr at the
# total batch, student drop path, RandomResizedCrop min scale.
PRETRAIN = {
    "fd_pretrain__clip_vit_base__img224__300ep": ("clip_vitb", "vit_b16", 300, 3e-4, 1.2e-3, 2e-6, 2e-5, 0.2, 0.08),
    "fd_pretrain__clip_vit_base__img224__100ep": ("clip_vitb", "vit_b16", 100, 3e-4, 1.2e-3, 2e-6, 2e-5, 0.1, 0.67),
    "fd_pretrain__clip_vit_large__img224__300ep": ("clip_vitl", "vit_l14", 300, 3e-4, 1.2e-3, 2e-6, 2e-5, 0.3, 0.08),
    "fd_pretrain__dino_vit_base__img224__300ep": ("dino_vitb", "vit_b16", 300, 3e-4, 1.2e-3, 2e-6, 2e-5, 0.3, 0.08),
    "fd_pretrain__deit_vit_base__img224__300ep": ("deit_vitb", "vit_b16", 300, 3e-4, 1.2e-3, 2e-6, 2e-5, 0.3, 0.08),
    "fd_pretrain__esvit_swin_base__img224__300ep": ("esvit_swinb", "swinv2_b", 300, 2e-4, 8e-4, 4e-6, 4e-5, 0.3, 0.08),
}

# docs/method.md §2.3: teacher (baseline architecture), epochs, warmup epochs, base lr /512, total batch, peak lr,
# warmup lr = min lr /512, layer decay, drop path.
FINETUNE = {
    "fd_finetune__clip_vit_base__img224__300ep": ("clip_vitb", 100, 20, 1.25e-3, 2048, 5e-3, 2.5e-7, 0.6, 0.3),
    "fd_finetune__clip_vit_base__img224__100ep": ("clip_vitb", 100, 20, 1.25e-3, 2048, 5e-3, 2.5e-7, 0.65, 0.1),
    "fd_finetune__dino_vit_base__img224__300ep": ("dino_vitb", 100, 20, 1.5e-3, 2048, 6e-3, 2.5e-7, 0.6, 0.2),
    "fd_finetune__deit_vit_base__img224__300ep": ("deit_vitb", 100, 20, 1.25e-3, 2048, 5e-3, 2.5e-7, 0.65, 0.3),
    "fd_finetune__clip_vit_large__img224__300ep": ("clip_vitl", 50, 5, 2.5e-4, 2048, 1e-3, 5e-7, 0.75, 0.4),
    "fd_finetune__esvit_swin_base__img224__300ep": ("esvit_swinb", 100, 20, 1.25e-3, 1024, 2.5e-3, 2.5e-7, 0.8, 0.4),
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_to_a_known_stage(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.stage in ("distill", "finetune", "linear", "diagnose", "segment", "detect", "pipeline")
    assert cfg.get(cfg.stage) is not None  # the stage's own block is there
    check_sections(cfg)  # its batch sizes, epochs and step counts are in range


def test_the_twelve_official_recipes_are_all_there():
    assert set(PRETRAIN) | set(FINETUNE) <= set(EXPERIMENTS)


def total_batch(cfg, block) -> int:
    """The optimizer's batch on the paper's 2 nodes of 8 GPUs (the recipes keep it on any other world)."""
    assert block.total_batch_size % (block.batch_size * 16) == 0
    return block.total_batch_size


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_distillation_recipes_match_the_paper(name):
    teacher, student, epochs, base, peak, warmup_lr, min_lr, drop_path, min_scale = PRETRAIN[name]
    cfg = compose([f"experiment={name}"])
    d = cfg.distill
    assert (cfg.stage, cfg.teacher.name, cfg.student.name, cfg.data.name) == ("distill", teacher, student, "imagenet")
    assert (d.epochs, d.warmup_epochs, d.batch_size, total_batch(cfg, d)) == (epochs, 10, 128, 2048)
    assert d.base_lr == pytest.approx(base)
    assert d.base_lr * total_batch(cfg, d) / 512 == pytest.approx(peak)
    assert d.warmup_lr * total_batch(cfg, d) / 512 == pytest.approx(warmup_lr)
    assert d.min_lr * total_batch(cfg, d) / 512 == pytest.approx(min_lr)
    assert (cfg.drop_path.student, cfg.drop_path.teacher, cfg.data.min_scale) == (drop_path, 0.0, min_scale)
    assert (d.weight_decay, d.clip_grad, list(d.betas), d.loss_beta) == (0.05, 3.0, [0.9, 0.999], 2.0)
    assert (cfg.whitening.name, cfg.whitening.eps, d.include_prefix_tokens) == ("fd_ln", 1e-5, True)
    assert cfg.trainer.strategy == "ddp"


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_fine_tuning_recipes_match_the_paper(name):
    teacher, epochs, warmup, base, total, peak, floor, layer_decay, drop_path = FINETUNE[name]
    cfg = compose([f"experiment={name}"])
    f = cfg.finetune
    assert (cfg.stage, cfg.teacher.name, cfg.data.name) == ("finetune", teacher, "imagenet")
    assert (f.epochs, f.warmup_epochs, total_batch(cfg, f)) == (epochs, warmup, total)
    assert f.base_lr == pytest.approx(base) and f.base_lr * total / 512 == pytest.approx(peak)
    assert (f.warmup_lr, f.min_lr) == (pytest.approx(floor), pytest.approx(floor))
    assert (f.layer_decay, f.drop_path) == (layer_decay, drop_path)
    assert (f.weight_decay, f.clip_grad, list(f.betas)) == (0.05, 5.0, [0.9, 0.999])
    assert (f.auto_augment, f.re_prob, f.min_scale, f.crop_pct) == ("rand-m9-mstd0.5-inc1", 0.25, 0.08, 0.875)
    assert (f.mixup, f.cutmix, f.mixup_prob, f.mixup_switch_prob, f.label_smoothing) == (0.8, 1.0, 1.0, 0.5, 0.1)
    assert (f.global_pool, f.keep_head, f.ema) == ("avg", False, None)


def test_a_recipe_with_a_missing_data_root_says_so(tmp_path):
    """(trainer=cpu: the recipes' GPU trainer would be refused first on a machine without one.)"""
    missing = tmp_path / "no_such_imagenet"
    cfg = compose(["experiment=fd_finetune__deit_vit_base__img224__300ep", f"data.root={missing}",
                   f"finetune.pretrained={tmp_path / 'student.safetensors'}", "trainer=cpu"])
    with pytest.raises(FDLightError, match=f"data.root={missing} does not exist"):
        run(cfg, tmp_path / "run")
    cfg = compose(["experiment=fd_finetune__clip_vit_large__img224__300ep", "trainer=cpu"])
    with pytest.raises(FDLightError, match="data=imagenet needs data.root="):
        run(cfg, tmp_path / "run2")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_recipes_with_a_missing_data_root_fail_in_one_line(tmp_path):
    missing = tmp_path / "no_such_imagenet"
    expected = f"data.root={missing} does not exist; point data.root at a folder holding train/<class>/<image>"
    # the distillation recipe with small models, so the check on the data is what this test waits for
    cfg = compose(["experiment=fd_pretrain__dino_vit_base__img224__300ep", f"data.root={missing}", "teacher=tiny",
                   "student=tiny", "trainer=cpu"])
    with pytest.raises(FDLightError, match=expected):
        run(cfg, tmp_path / "distill")
    result = run_main(["experiment=fd_finetune__dino_vit_base__img224__300ep", f"data.root={missing}",
                       f"finetune.pretrained={tmp_path / 'student.safetensors'}", "trainer=cpu",
                       f"hydra.run.dir={tmp_path / 'ft'}"],
                      cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"fdlight: error: {expected}"
