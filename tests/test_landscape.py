"""Filter-normalised directions, the landscape at its centre, the grid checks and the Hessian power iteration, on real
tiny timm classifiers and the embedded data."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from fdlight.data.synthetic import SyntheticClassification
from fdlight.data.transforms import eval_transform
from fdlight.diagnostics.landscape import (ClassificationLoss, ProbeLoss, evaluate, filter_normalized_direction,
                                           grid_coordinates, hessian_vector_product, loss_landscape,
                                           top_hessian_eigenvalue)
from fdlight.errors import FDLightError


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    yield


def classifier(seed=0, classes=10, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=classes, **kw).eval()


@pytest.fixture(scope="module")
def batches():
    ds = SyntheticClassification("val", 12, 64, 10, 0, eval_transform(32))
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    x, y = torch.stack(xs), torch.tensor(ys)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def test_each_filter_has_the_norm_of_its_weight_filter():
    model = classifier()
    params = {n: p.detach() for n, p in model.named_parameters()}
    d = filter_normalized_direction(params, torch.Generator().manual_seed(3))
    assert d.keys() == params.keys()
    checked = 0
    for name, w in params.items():
        if w.ndim <= 1:
            assert torch.count_nonzero(d[name]) == 0, f"{name}: biases and norms get a zero direction"
            continue
        assert d[name].shape == w.shape
        for k in range(w.shape[0]):
            assert float(d[name][k].norm()) == pytest.approx(float(w[k].norm()), rel=1e-5, abs=1e-8)
            checked += 1
        assert not torch.allclose(d[name], w), "a random direction, not the weights"
    assert checked > 100
    again = filter_normalized_direction(params, torch.Generator().manual_seed(3))
    assert all(torch.equal(d[n], again[n]) for n in d), "the same seed gives the same direction"


def test_landscape_origin_equals_the_model_loss(batches):
    model = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # independent: plain cross entropy of the whole set in one forward
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        logits = model(x)
        want = float(F.cross_entropy(logits, y))
        want_acc = float((logits.argmax(-1) == y).float().mean())
    ls = loss_landscape(ClassificationLoss(model, batches), steps=3, span=0.5, seed=0)
    assert ls.coords == [-0.5, 0.0, 0.5]
    assert ls.origin == pytest.approx(want, rel=1e-5)
    assert ls.surface[1][1] == pytest.approx(want, rel=1e-5)
    assert ls.curve[1] == pytest.approx(want, rel=1e-5)
    assert ls.accuracy_origin == pytest.approx(want_acc)
    assert len(ls.surface) == 3 and all(len(row) == 3 for row in ls.surface)
    assert ls.surface[0][0] != pytest.approx(want), "off-centre points move the weights"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights restored"
    out = ls.to_json()
    assert out["sharpness"] == pytest.approx(0.5 * (ls.curve[0] + ls.curve[2]) - ls.origin)


def test_even_grid_computes_the_curve_separately(batches):
    model = classifier()
    ls = loss_landscape(ClassificationLoss(model, batches), steps=2, span=1.0, seed=0)
    assert ls.coords == [-1.0, 1.0]
    assert len(ls.curve) == 2 and len(ls.surface) == 2
    base, _ = evaluate(ClassificationLoss(model, batches))
    assert ls.origin == pytest.approx(base)


def test_same_seed_same_surface(batches):
    a = loss_landscape(ClassificationLoss(classifier(), batches), steps=3, span=1.0, seed=5, two_d=False)
    b = loss_landscape(ClassificationLoss(classifier(), batches), steps=3, span=1.0, seed=5, two_d=False)
    c = loss_landscape(ClassificationLoss(classifier(), batches), steps=3, span=1.0, seed=6, two_d=False)
    assert a.curve == b.curve
    assert a.curve != c.curve
    assert a.surface == []


@pytest.mark.parametrize("steps,span", [(0, 1.0), (-3, 1.0), (11, 0.0), (11, -1.0), (2.5, 1.0)])
def test_non_positive_grid_is_a_one_line_error(steps, span):
    with pytest.raises(FDLightError) as e:
        grid_coordinates(steps, span)
    assert "diagnose.landscape" in str(e.value) and "\n" not in str(e.value)


def test_probe_loss_fits_and_perturbs_backbone_and_probe(batches):
    model = classifier(classes=0)
    objective = ProbeLoss(model, batches, num_classes=10)
    names = [n for n, _ in objective.module.named_parameters()]
    assert "probe.weight" in names and any(n.startswith("backbone.blocks.0") for n in names)
    loss, acc = evaluate(objective)
    assert loss < torch.log(torch.tensor(10.0)).item(), "the fitted probe beats chance on its own images"
    assert acc is not None and acc > 0.1


def test_top_hessian_eigenvalue_is_an_eigenpair(batches):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16,
                              depth=1, num_heads=2, num_classes=10).eval()
    small = [(F.interpolate(x, size=16, mode="bilinear"), y) for x, y in batches]
    objective = ClassificationLoss(model, small)
    flags = [p.requires_grad for p in model.parameters()]
    eig = top_hessian_eigenvalue(objective, iters=60, tol=1e-6, seed=0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert eig.residual < 0.05
    params = [p for p in model.parameters() if p.ndim > 1]
    for p in params:
        p.requires_grad_(True)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # no random direction curves more than the top eigenvector
        v = [torch.randn(p.shape, generator=gen) for p in params]
        norm = torch.sqrt(sum(u.square().sum() for u in v))
        v = [u / norm for u in v]
        hv = hessian_vector_product(objective, params, v)
        rayleigh = float(sum((h * u).sum() for h, u in zip(hv, v)))
        assert abs(rayleigh) <= abs(eig.value) * 1.01
