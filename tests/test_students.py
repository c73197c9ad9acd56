"""The students have the FD shape (shared relative position bias, no absolute position embedding, layer scale 0.1)
and the official FD init; timm builds the same students by their registered names."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import fdlight.models.registry  # noqa: F401 - registers the fd_vit_* names with timm
from conftest import compose
from fdlight.constants import IMAGENET_MEAN, IMAGENET_STD
from fdlight.errors import FDLightError
from fdlight.models.exports import export_timm
from fdlight.models.patch_embed import PatchConv2d
from fdlight.models.students import block_classes, build_student, fd_init, student_layout


def test_vit_b16_student_has_the_fd_shape():
    cfg = compose(["student=vit_b16"]).student
    s = build_student(cfg, drop_path=0.2)
    table = s.rel_pos_bias.relative_position_bias_table
    assert tuple(table.shape) == ((2 * 14 - 1) ** 2 + 3, 12)
    assert torch.count_nonzero(table) == 0
    assert s.pos_embed is None
    assert all(b.attn.relative_position_bias_table is None for b in s.blocks)  # one table, shared
    assert all(torch.all(b.gamma_1 == 0.1) and torch.all(b.gamma_2 == 0.1) for b in s.blocks)
    assert s.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2) and s.num_classes == 0
    assert student_layout(cfg, s).num_tokens == 197
    out = s.forward_features(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 197, 768)


def test_fd_init_truncates_at_one_sigma_and_rescales_by_depth():
    s = build_student(compose(["student=vit_b16"]).student)
    w = s.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.02 + 1e-7
    assert abs(w.std().item() / 0.010792 - 1) < 0.005  # std of N(0, 0.02) cut at +-1 sigma is 0.5396 * 0.02
    fc2 = [b.mlp.fc2.weight.abs().max().item() for b in s.blocks]
    assert fc2[0] <= 0.02 / math.sqrt(2) + 1e-7 and fc2[11] <= 0.02 / math.sqrt(24) + 1e-7


def test_vit_l14_student_makes_a_16x16_grid():
    cfg = compose(["student=vit_l14"]).student
    with torch.device("meta"):
        s = build_student(cfg)
    assert student_layout(cfg, s).grid == 16
    assert tuple(s.rel_pos_bias.relative_position_bias_table.shape) == (31 ** 2 + 3, 16)


def test_swinv2_b_student_ends_on_7x7_tokens():
    cfg = compose(["student=swinv2_b"]).student
    s = build_student(cfg)
    layout = student_layout(cfg, s)
    assert (layout.grid, layout.prefix_tokens, layout.dim) == (7, 0, 1024)
    assert s.layers[0].blocks[0].window_size == (14, 14)
    assert 86e6 < sum(p.numel() for p in s.parameters()) < 89e6


def test_swinv2_g_student_has_the_3b_shape_on_meta():
    cfg = compose(["student=swinv2_g"]).student
    assert cfg.init == "fd"
    with torch.device("meta"):
        s = build_student(cfg)
    n = sum(p.numel() for p in s.parameters())
    assert 2.5e9 < n < 3.5e9
    assert student_layout(cfg, s).dim == 4096
    assert any(isinstance(m, tuple(block_classes(cfg))) for m in s.modules())


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_drop_path_outside_unit_interval_is_refused(rate):
    with pytest.raises(FDLightError, match=rf"drop_path.student={rate} is outside \[0, 1\)"):
        build_student(compose(["student=tiny"]).student, drop_path=rate)


# A small SwinV2 through the real config: 2 stages of 2 blocks, widths 32 and 64, window 4 at 32 px.
TINY_SWIN = ["student=swinv2_b", "student.img_size=32", "student.kwargs.window_size=4", "+student.kwargs.embed_dim=32",
             "+student.kwargs.depths=[2,2]", "+student.kwargs.num_heads=[2,4]"]


def tiny_swin(*overrides):
    torch.manual_seed(0)
    return build_student(compose([*TINY_SWIN, *overrides]).student)


def rel_std(w: torch.Tensor, std: float) -> float:
    return w.double().pow(2).mean().sqrt().item() / std - 1.0  # zero-mean draws: the RMS estimates the std


def test_swinv2_fd_init_follows_the_official_formula():
    s = tiny_swin()
    assert compose(TINY_SWIN).student.init == "fd"  # the default of the SwinV2 configs
    blocks = [b for stage in s.layers for b in stage.blocks]
    assert len(blocks) == 4
    rescaled = {id(b.attn.proj.weight) for b in blocks} | {id(b.mlp.fc2.weight) for b in blocks}
    layers = [m for m in s.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    plain = torch.cat([m.weight.flatten() for m in layers if id(m.weight) not in rescaled])
    assert plain.numel() > 80_000
    assert abs(rel_std(plain, 0.02)) < 0.02  # std 0.02: the +-2 cut-off is 100 std away
    assert 3 * 0.02 < plain.abs().max() <= 2.0  # not cut at 1 std like the ViT's
    assert abs((plain.abs() > 0.02).double().mean().item() - 0.3173) < 0.01  # the normal's mass beyond 1 std
    assert abs(rel_std(s.patch_embed.proj.weight, 0.02)) < 0.1  # PyTorch's default would be ~4.2x
    assert all(torch.count_nonzero(m.bias) == 0 for m in layers if m.bias is not None)
    for k, b in enumerate(blocks, start=1):  # k counts over both stages
        both = torch.cat([b.attn.proj.weight.flatten(), b.mlp.fc2.weight.flatten()])
        assert abs(rel_std(both, 0.02 / math.sqrt(2 * k))) < 0.06, k
        for norm in (b.norm1, b.norm2):  # res-post-norm
            assert torch.all(norm.weight == 1e-5) and torch.count_nonzero(norm.bias) == 0
    assert torch.all(s.norm.weight == 1) and torch.allclose(blocks[0].attn.logit_scale, torch.tensor(math.log(10)))


def test_swinv2_timm_init_stays_available_and_differs():
    s = tiny_swin("student.init=timm")
    blocks = [b for stage in s.layers for b in stage.blocks]
    assert all(torch.all(b.norm1.weight == 0) and torch.all(b.norm2.weight == 0) for b in blocks)
    assert rel_std(s.patch_embed.proj.weight, 0.02) > 2 and torch.count_nonzero(s.patch_embed.proj.bias) > 0
    assert abs(rel_std(blocks[-1].mlp.fc2.weight, 0.02)) < 0.06  # not rescaled by depth


def test_unknown_init_is_refused_in_one_line():
    with pytest.raises(FDLightError, match=r"^unknown student.init 'xavier'; choose one of: fd, timm$"):
        build_student(compose(["student=tiny", "student.init=xavier"]).student)
    with pytest.raises(FDLightError, match="student.init=fd knows ViT .Beit. and SwinV2 students, not Linear"):
        fd_init(torch.nn.Linear(2, 2))


def shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,student", [("fd_vit_base_patch16_224", "vit_b16"),
                                          ("fd_vit_large_patch14_224", "vit_l14")])
def test_timm_builds_the_registered_fd_students_as_the_configs_do(name, student):
    with torch.device("meta"):
        registered = timm.create_model(name, pretrained=False)
        configured = build_student(compose([f"student={student}"]).student)
    assert shapes(registered) == shapes(configured)
    assert type(registered).__name__ == "Beit" and registered.pos_embed is None
    assert type(registered.patch_embed.proj) is PatchConv2d


def test_a_registered_tiny_student_equals_the_config_built_one_bitwise(tmp_path):
    cfg = compose(["student=tiny"]).student
    torch.manual_seed(3)
    configured = build_student(cfg, drop_path=0.1)
    torch.manual_seed(3)
    registered = timm.create_model("fd_vit_tiny_patch8_32", drop_path_rate=0.1)
    a, b = configured.state_dict(), registered.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert registered.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert timm.create_model("fd_vit_tiny_patch8_32", img_size=64).patch_embed.grid_size == (8, 8)
    # what FD trains it with (ImageNet's statistics, its own size), not the BEiT source's 0.5 or its hub weights
    assert timm.create_model("fd_vit_tiny_patch8_32", img_size=64).pretrained_cfg["input_size"] == (3, 64, 64)
    pcfg = registered.pretrained_cfg
    assert (pcfg["mean"], pcfg["std"], pcfg["input_size"]) == (IMAGENET_MEAN, IMAGENET_STD, (3, 32, 32))
    assert not {"hf_hub_id", "url", "tag"} & set(pcfg)
    export_timm(configured, tmp_path / "student.safetensors", cfg.model, {})
    loaded = timm.create_model("fd_vit_tiny_patch8_32", checkpoint_path=str(tmp_path / "student.safetensors"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in a.items())
    with pytest.raises(FDLightError, match="fd_vit_tiny_patch8_32 has no published weights"):
        timm.create_model("fd_vit_tiny_patch8_32", pretrained=True)


def test_the_fd_init_skips_timms_own_draws_and_writes_every_parameter_as_before():
    """build_student skips the draws of timm's init that the FD init redraws: every other parameter (LayerNorms,
    layer scale, the zero bias table, SwinV2's logit scale and q/v biases) is bitwise what timm's init leaves, and
    every redrawn one is finite."""
    from fdlight.models.factory import create_model
    from fdlight.models.students import student_kwargs

    for overrides in (["student=tiny"], TINY_SWIN):
        cfg = compose(overrides).student
        torch.manual_seed(0)
        fast = build_student(cfg)
        classic = create_model(cfg.model, **student_kwargs(cfg), drop_path_rate=0.0)  # timm's init, then the FD init
        redrawn = {id(p) for p in fd_init(classic)}
        kept = [n for n, p in classic.named_parameters() if id(p) not in redrawn]
        assert len(kept) >= 8, kept
        mine, theirs = dict(fast.named_parameters()), dict(classic.named_parameters())
        assert all(torch.equal(mine[n], theirs[n]) for n in kept), [n for n in kept if not torch.equal(mine[n],
                                                                                                     theirs[n])]
        assert all(torch.isfinite(p).all() for p in mine.values())
        assert all(torch.count_nonzero(m.bias) == 0 for m in fast.modules()
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None)


def test_an_architecture_whose_own_init_draws_more_is_built_with_it():
    """A timm ViT draws its position embedding, which the FD init leaves: that student is built with timm's init
    (then the FD init), never with a skipped draw left unwritten."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "vit", "model": "vit_tiny_patch16_224", "init": "fd", "kwargs": dict(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)})
    s = build_student(cfg)
    assert torch.isfinite(s.pos_embed).all() and abs(rel_std(s.pos_embed, 0.02)) < 0.15
    assert s.blocks[0].mlp.fc1.weight.abs().max() <= 0.02 + 1e-7  # and the FD init after it


def test_skip_random_init_records_the_draws_it_skips_and_keeps_constants():
    from fdlight.models.factory import SkipRandomInit

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with SkipRandomInit() as skipped:
        lin, norm = torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)
    assert torch.equal(torch.get_rng_state(), before)  # nothing was drawn
    assert set(skipped.drawn) == {id(lin.weight), id(lin.bias)}
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    model = torch.nn.Sequential(lin, norm)
    assert skipped.unreplaced(model, [lin.weight]) == ["0.bias"]
