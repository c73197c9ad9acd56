"""The per-step warmup schedule against values worked out by hand from its formulas, for both decays, and the lr
each AdamW group really gets from adamw_with_schedule."""
from __future__ import annotations

import pytest
import torch

from fdlight.errors import FDLightError
from fdlight.optim import WarmupSchedule, adamw_with_schedule


def test_cosine_warms_up_linearly_then_follows_half_a_cosine_to_the_end():
    # peak 2, start 0.5, end 0.1, 4 warmup steps of 12: t = (step - 4) / 8 after warmup
    curve = WarmupSchedule(2.0, 0.5, 0.1, 4, 12)
    expected = {0: 0.5, 1: 0.875, 2: 1.25, 4: 2.0,
                6: 0.1 + 0.95 * (1 + 0.7071067811865476),   # t = 1/4: cos(pi/4)
                8: 1.05,                                     # t = 1/2: halfway between peak and end
                10: 0.1 + 0.95 * (1 - 0.7071067811865476),  # t = 3/4
                12: 0.1, 30: 0.1}                            # held at the end after the last step
    assert {s: curve.lr(s) for s in expected} == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert curve(8) == pytest.approx(1.05 / 2.0, rel=1e-12)


def test_poly_warms_up_linearly_then_follows_one_minus_t_to_the_power():
    # peak 1, start 0, end 0.2, 2 warmup steps of 10, power 2: (1 - 0.2) * (1 - t)^2 + 0.2 with t = (step - 2) / 8
    curve = WarmupSchedule(1.0, 0.0, 0.2, 2, 10, decay="poly", power=2.0)
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.8 * 0.5625 + 0.2, 6: 0.8 * 0.25 + 0.2, 8: 0.8 * 0.0625 + 0.2,
                10: 0.2, 15: 0.2}
    assert {s: curve.lr(s) for s in expected} == pytest.approx(expected, rel=1e-12, abs=1e-15)
    linear = WarmupSchedule(1.0, 0.0, 0.0, 2, 10, decay="poly")  # power 1: a straight line down
    assert [linear.lr(s) for s in (3, 6, 9)] == pytest.approx([0.875, 0.5, 0.125], rel=1e-12)


def test_a_zero_peak_gives_a_zero_factor_and_an_unknown_decay_names_the_choices():
    assert WarmupSchedule(0.0, 0.0, 0.0, 0, 5)(3) == 0.0
    with pytest.raises(FDLightError, match="unknown schedule 'step'; use cosine or poly"):
        WarmupSchedule(1.0, 0.0, 0.0, 0, 5, decay="step")


@pytest.mark.parametrize("decay", ["cosine", "poly"])
def test_adamw_groups_follow_the_schedule_from_their_scaled_peak(decay):
    """Each group peaks at lr x lr_scale; warmup start and end are not scaled."""
    w, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [w], "names": ["w"], "weight_decay": 0.05, "lr_scale": 0.5},
              {"params": [b], "names": ["b"], "weight_decay": 0.0, "lr_scale": 1.0}]
    opt, sched = adamw_with_schedule(groups, 1.0e-3, 1.0e-5, 1.0e-6, 2, 6, decay=decay)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    # after warmup: t = (step - 2) / 4; cosine: end + (peak - end) (1 + cos(pi t)) / 2; poly: end + (peak - end) (1 - t)
    shape = {"cosine": [1.0, 0.8535533905932737, 0.5, 0.14644660940672624], "poly": [1.0, 0.75, 0.5, 0.25]}[decay]
    for peak, column in ((0.5e-3, 0), (1.0e-3, 1)):
        want = [1.0e-5, 1.0e-5 + (peak - 1.0e-5) / 2] + [1.0e-6 + (peak - 1.0e-6) * f for f in shape]
        assert [row[column] for row in seen] == pytest.approx(want, rel=1e-6)


def test_on_a_cpu_the_update_is_the_fused_kernel_and_matches_torchs_loop():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    start = w.detach().clone()
    twin = torch.nn.Parameter(start.clone())
    opt, _ = adamw_with_schedule([{"params": [w], "weight_decay": 0.05}], 1e-2, 1e-2, 1e-2, 0, 10)
    loop = torch.optim.AdamW([{"params": [twin], "weight_decay": 0.05}], lr=1e-2, eps=1e-8, foreach=False)
    assert opt.param_groups[0]["fused"] is True
    for step in range(5):
        grad = torch.randn(64, 32)
        w.grad, twin.grad = grad.clone(), grad.clone()
        opt.step()
        loop.step()
    assert (w - start).abs().max() > 1e-2 and torch.allclose(w, twin, atol=1e-6, rtol=1e-5)
