"""fdlight's Triton attention with a bias gradient equals PyTorch's SDPA, alone, inside a student, and compiled.
On a machine without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a test dependency on Linux (pyproject's test extra)

from conftest import compose, run_stage
from fdlight.errors import FDLightError
from fdlight.models.attention import TritonBiasAttention, set_attention
from fdlight.models.students import build_student
from fdlight.stages.distill import build_distillation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch=2, heads=3, tokens=70, dim=16, bias_dims=4, dtype=torch.float32):
    """q, k, v as the non-contiguous views timm's Beit makes from one qkv tensor; a bias shared by the batch."""
    torch.manual_seed(0)
    qkv = torch.randn(batch, tokens, 3, heads, dim, device=DEVICE, dtype=dtype).permute(2, 0, 3, 1, 4)
    shape = (1, heads, tokens, tokens) if bias_dims == 4 else (heads, tokens, tokens)
    bias = torch.randn(shape, device=DEVICE, requires_grad=True)
    return qkv.requires_grad_(), bias


def _grads(attention, qkv, bias, grad):
    qkv.grad = bias.grad = None
    q, k, v = qkv.unbind(0)
    out = attention(q, k, v, bias)
    out.backward(grad)
    return out.detach(), qkv.grad.clone(), bias.grad.clone()


@pytest.mark.parametrize("tokens,bias_dims", [(70, 4), (64, 3), (17, 4)])
def test_kernel_matches_sdpa_forward_and_every_gradient(tokens, bias_dims):
    from fdlight.models.biased_attention import biased_attention

    qkv, bias = _inputs(tokens=tokens, bias_dims=bias_dims)
    grad = torch.randn(2, 3, tokens, 16, device=DEVICE)
    ref = _grads(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b), qkv, bias, grad)
    got = _grads(biased_attention, qkv, bias, grad)
    for name, r, g in zip(("output", "d(q,k,v)", "d(bias)"), ref, got):
        assert g.shape == r.shape
        assert torch.allclose(g, r, atol=1e-4, rtol=1e-4), f"{name}: max diff {(g - r).abs().max():.2e}"
    assert got[2].abs().max() > 0.1  # the bias gradient is really there


@pytest.mark.parametrize("i", range(6))
def test_every_tile_shape_the_gpu_autotuner_tries_computes_the_same_attention(monkeypatch, i):
    """Each kernel is run with the i-th tile shape of its GPU list (the interpreter alone would only try 64 x 64); the
    lists hold shapes with the launch grid's block smaller than the other, so a grid over the wrong block fails."""
    import triton

    from fdlight.models import biased_attention as ba

    for kernel, tiles in ((ba._fwd_kernel, ba.FWD_TILES), (ba._bwd_dkdv_kernel, ba.DKDV_TILES),
                          (ba._bwd_dq_kernel, ba.DQ_TILES)):
        block_m, block_n = tiles[i % len(tiles)][:2]
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n})])
    qkv, bias = _inputs(tokens=70)
    grad = torch.randn(2, 3, 70, 16, device=DEVICE)
    ref = _grads(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b), qkv, bias, grad)
    got = _grads(ba.biased_attention, qkv, bias, grad)
    for name, r, g in zip(("output", "d(q,k,v)", "d(bias)"), ref, got):
        assert torch.allclose(g, r, atol=1e-4, rtol=1e-4), f"{name}: max diff {(g - r).abs().max():.2e}"


def _low_precision_matches_fp32_sdpa(dtype, tol, batch=2, heads=3, tokens=65, dim=16):
    from fdlight.models.biased_attention import biased_attention

    qkv, bias = _inputs(batch, heads, tokens, dim, dtype=dtype)
    grad = torch.randn(batch, heads, tokens, dim, device=DEVICE, dtype=dtype)
    ref = _grads(lambda q, k, v, b: F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=b),
                 qkv, bias, grad.float())
    got = _grads(biased_attention, qkv, bias, grad)
    for name, r, g in zip(("output", "d(q,k,v)", "d(bias)"), ref, got):
        assert torch.allclose(g.float(), r.float(), atol=tol, rtol=tol), f"{name}: {(g.float() - r).abs().max()}"


def test_kernel_in_half_precision_stays_within_half_precision_error():
    """fp16 here (Triton's interpreter has no bf16 matrix product); the bf16 case runs on a GPU, below."""
    _low_precision_matches_fp32_sdpa(torch.float16, 2e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 matrix products need a GPU (Triton's interpreter has none)")
def test_kernel_in_bf16_on_a_gpu_matches_fp32_sdpa():
    _low_precision_matches_fp32_sdpa(torch.bfloat16, 5e-2, batch=8, heads=12, tokens=197, dim=64)


def test_shapes_the_kernels_do_not_take_are_refused_in_one_line():
    from fdlight.models.biased_attention import biased_attention

    qkv, bias = _inputs(tokens=20)
    q, k, v = qkv.detach().unbind(0)
    with pytest.raises(FDLightError, match="bias must be .* got \\(2, 3, 20, 20\\)"):
        biased_attention(q, k, v, bias.detach().expand(2, -1, -1, -1))
    with pytest.raises(FDLightError, match="power of two in \\[16, 256\\], not 24"):
        biased_attention(*(torch.zeros(1, 3, 20, 24),) * 3, bias.detach())


def test_kernel_under_torch_compile_gives_the_eager_gradients():
    from fdlight.models.biased_attention import biased_attention

    qkv, bias = _inputs(tokens=40)
    grad = torch.randn(2, 3, 40, 16, device=DEVICE)
    eager = _grads(biased_attention, qkv, bias, grad)
    compiled = _grads(torch.compile(lambda q, k, v, b: biased_attention(q * 1.0, k, v, b)), qkv, bias, grad)
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, atol=1e-5)


def test_a_student_with_triton_attention_computes_what_sdpa_computes():
    cfg = compose(["student=tiny"]).student
    student = build_student(cfg).to(DEVICE)
    with torch.no_grad():  # a non-zero shared bias, so the bias path is exercised
        student.rel_pos_bias.relative_position_bias_table.normal_()
    x = torch.randn(3, 3, 32, 32, device=DEVICE)

    def run(mode):
        set_attention(student, mode)
        student.zero_grad()
        out = student.forward_features(x)
        out.square().mean().backward()
        return out.detach(), student.rel_pos_bias.relative_position_bias_table.grad.clone()

    ref, ref_grad = run("sdpa")
    assert set_attention(student, "triton") == 2
    assert all(type(b.attn) is TritonBiasAttention for b in student.blocks)
    out, grad = run("triton")
    assert torch.allclose(out, ref, atol=1e-4) and torch.allclose(grad, ref_grad, atol=1e-5)
    assert set(student.state_dict()) == set(build_student(cfg).state_dict())


def test_a_distill_run_with_triton_attention_trains(tmp_path, one_thread):
    trainer = "trainer=gpu" if DEVICE == "cuda" else "trainer=cpu"
    m = run_stage([trainer, "trainer.attention=triton", "distill.max_steps=3", "data.num_train=32",
                   "distill.batch_size=4", "monitor=none"], tmp_path / "run")  # Triton's interpreter: the least work
    assert m["steps"] == 3 and m["last_loss"] < m["first_loss"]


def test_bad_attention_choices_are_refused_in_one_line():
    with pytest.raises(FDLightError, match="trainer.attention='flash' is not one of sdpa, triton"):
        build_distillation(compose(["trainer.attention=flash"]))
    with pytest.raises(FDLightError, match="applies to timm Beit models"):
        set_attention(build_student(compose(["student=swinv2_b"]).student), "triton")
