"""Attention distance, head diversity and diagonality against attention matrices with known answers, and the hooks on
real timm models (fused attention restored, Swin window geometry, models without attention)."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from fdlight.diagnostics.attention import (Geometry, attention_distance, attention_layers, attention_statistics,
                                           diagonality, head_kl, layer_diversity, summarize_layers)
from fdlight.errors import FDLightError

GRID, STRIDE = (3, 4), 16.0  # non-square, so a transposed raster order would show


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    yield


def brute_mean_pairwise(grid, stride, weight_fn):
    """(1/P) sum_i sum_j w(i, j) |p_i - p_j| with explicit loops over grid positions."""
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    total = 0.0
    for (ri, ci) in cells:
        for (rj, cj) in cells:
            total += weight_fn() * math.hypot((ri - rj) * stride, (ci - cj) * stride)
    return total / len(cells)


def tiny_vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=0, **kw).eval()


def fused_flags(model):
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


def test_identity_attention_has_zero_distance():
    g = Geometry(1, GRID, STRIDE)
    n = 1 + 12
    attn = torch.eye(n).expand(2, 3, n, n)
    assert torch.allclose(attention_distance(attn, g), torch.zeros(2, 3), atol=1e-6)


@pytest.mark.parametrize("prefix", [0, 1])
def test_uniform_attention_distance_is_the_mean_pairwise_distance(prefix):
    g = Geometry(prefix, GRID, STRIDE)
    n = prefix + 12
    attn = torch.full((1, 2, n, n), 1.0 / n, dtype=torch.float64)  # uniform over every key, CLS included
    want = brute_mean_pairwise(GRID, STRIDE, lambda: 1.0 / n)  # no renormalisation over patch keys
    got = attention_distance(attn, g)
    assert got.shape == (1, 2)
    assert torch.allclose(got, torch.full_like(got, want), rtol=1e-9)
    assert want > 0


def test_single_offset_attention_distance():
    # every query attends only to the token one column to its right (or itself on the right edge)
    g = Geometry(0, GRID, STRIDE)
    attn = torch.zeros(1, 1, 12, 12)
    for r in range(GRID[0]):
        for c in range(GRID[1]):
            i = r * GRID[1] + c
            attn[0, 0, i, i + 1 if c + 1 < GRID[1] else i] = 1.0
    want = STRIDE * (GRID[0] * (GRID[1] - 1)) / 12
    assert float(attention_distance(attn, g)) == pytest.approx(want)


def test_head_kl_zero_for_identical_heads_positive_for_different():
    torch.manual_seed(0)
    one = torch.softmax(torch.randn(2, 1, 5, 5), -1)
    same = one.expand(2, 3, 5, 5)
    kl = head_kl(same)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)
    assert layer_diversity(kl[0]) == pytest.approx(0.0, abs=1e-6)
    other = torch.softmax(torch.randn(2, 1, 5, 5) * 3, -1)
    kl2 = head_kl(torch.cat([one, other], 1))
    assert layer_diversity(kl2.mean(0)) > 0.01
    assert (kl2[:, 0, 1] > 0).all() and (kl2[:, 1, 0] > 0).all()


def test_head_kl_matches_hand_computed_value():
    a = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    b = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    attn = torch.stack([a, b]).unsqueeze(0)  # (1, 2 heads, 2 queries, 2 keys)
    want_ab = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    want_ba = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    kl = head_kl(attn)[0]
    assert float(kl[0, 1]) == pytest.approx(want_ab, rel=1e-5)
    assert float(kl[1, 0]) == pytest.approx(want_ba, rel=1e-5)
    assert layer_diversity(kl) == pytest.approx((want_ab + want_ba) / 2, rel=1e-5)


def test_head_kl_drops_prefix_queries():
    attn = torch.full((1, 2, 3, 3), 1 / 3)
    attn[0, 1, 0] = torch.tensor([0.98, 0.01, 0.01])  # heads differ only in the CLS query row
    assert torch.allclose(head_kl(attn, prefix=1), torch.zeros(1, 2, 2), atol=1e-6)
    assert float(head_kl(attn, prefix=0)[0, 0, 1]) > 0


def test_diagonality_orders_diagonal_uniform_and_column_maps():
    p = 16
    grid = (4, 4)
    identity = torch.eye(p)
    shifted = torch.zeros(p, p)  # attend to the right neighbour: relative, but off the main diagonal
    for i in range(p):
        shifted[i, i + 1 if (i % 4) < 3 else i] = 1.0
    uniform = torch.full((p, p), 1.0 / p)
    column = torch.zeros(p, p)
    column[:, 5] = 1.0
    d = diagonality(torch.stack([identity, shifted, uniform, column]), grid, k=3)
    assert float(d[0]) == pytest.approx(1 / (1 + 3 / p), rel=1e-5)
    assert float(d[1]) == pytest.approx(1 / (1 + 6 / p), rel=1e-5)  # edge keys also take their own query
    assert 0.3 < float(d[2]) <= 0.5
    assert float(d[3]) == pytest.approx((3 / p) / (1 + 3 / p), rel=1e-5)


def test_hooked_statistics_match_timm_attention_extract():
    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    assert all(fused_flags(model))
    layers = attention_statistics(model, [x[:2], x[2:]])
    assert all(fused_flags(model)), "fused attention must be back on"
    assert [layer.name for layer in layers] == ["blocks.0.attn", "blocks.1.attn"]
    # independent extraction: timm's own AttentionExtract, then the brute-force distance
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    maps = timm.utils.AttentionExtract(model, method="hook")(x)
    for layer, (name, attn) in zip(layers, maps.items()):
        assert name == layer.name + ".attn_drop"
        patch = attn[:, :, 1:, 1:].double()
        cells = [(r, c) for r in range(4) for c in range(4)]
        want = torch.zeros(attn.shape[1], dtype=torch.float64)
        for i, (ri, ci) in enumerate(cells):
            for j, (rj, cj) in enumerate(cells):
                want += patch[:, :, i, j].mean(0) * math.hypot(8 * (ri - rj), 8 * (ci - cj))
        assert torch.allclose(layer.distance.double(), want / 16, rtol=1e-4)
        assert torch.allclose(layer.map, attn[:, :, 1:, 1:].mean(0), atol=1e-6)
        assert layer.samples == 3


def test_fused_attention_restored_when_the_forward_fails():
    model = tiny_vit()
    drops = [d for _, d, _ in attention_layers(model)]
    with pytest.raises(Exception):
        attention_statistics(model, [torch.randn(2, 3, 48, 48)])  # wrong input size: timm raises in patch_embed
    assert fused_flags(model) and all(fused_flags(model))
    assert all(not d._forward_hooks for d in drops), "hooks must be removed"


def test_swin_uses_window_geometry():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
                              embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=0).eval()
    geoms = [g for _, _, g in attention_layers(model)]
    assert [g.stride for g in geoms] == [4.0, 4.0, 8.0, 8.0]
    assert all(g.grid == (4, 4) and g.prefix == 0 and g.windowed for g in geoms)
    layers = attention_statistics(model, [torch.randn(2, 3, 64, 64)])
    out = summarize_layers(layers)
    assert out["heads"] == [1, 1, 2, 2]
    assert out["windowed"]
    for g, dists in zip(geoms, out["distance_px"]):
        assert all(0 < d < g.stride * 3 * math.sqrt(2) for d in dists)  # within one 4x4 window
    assert out["samples"][0] == 2 * 16 and out["samples"][2] == 2 * 4  # images x windows


def test_model_without_attention_is_a_one_line_error():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    with pytest.raises(FDLightError) as e:
        attention_statistics(model, [torch.randn(1, 3, 32, 32)], what="checkpoint r.safetensors")
    assert "no attention layers" in str(e.value) and "\n" not in str(e.value)
