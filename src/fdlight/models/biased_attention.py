"""Fused attention with an additive bias that gets a gradient, in Triton (`trainer.attention=triton`, experimental).

softmax(q k^T * scale + bias) v for q, k, v of shape (B, H, N, D) and a bias of shape (H, N, N) shared by the batch
(the FD student's shared relative position bias, BEiT's per-block bias). PyTorch's SDPA has no fast kernel for a bias
that needs a gradient: it falls back to the memory-efficient kernel, whose backward dominates the FD student's
attention (fdlight's README, Benchmarks). These kernels are flash-attention style (online softmax; the forward stores
nothing of size N x N). The backward writes each sample's dS (the bias gradient of that sample, in the input dtype)
and sums them over the batch: one memory-bound pass instead of atomics that every sample of the batch would contend
for. Results are deterministic for a given tile shape; the autotuner picks the shapes by timing, so two processes may
differ in the last bits of the gradients.

The kernels are registered as `torch.library.custom_op`s with fake implementations and an autograd formula, so
torch.compile treats the forward and the backward as opaque ops.
On a CPU they run under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check them.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from fdlight.errors import check

LOG2E = 1.4426950408889634


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# What each kernel tries on a GPU the first time it sees a token count, head dim and dtype: (BLOCK_M query rows,
# BLOCK_N key rows, warps, pipeline stages). Triton's autotuner times them and skips those that do not fit the card.
FWD_TILES = ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 4), (32, 64, 4, 3))
DKDV_TILES = ((64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (16, 64, 4, 4), (64, 32, 4, 3))
DQ_TILES = ((64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 16, 4, 4), (32, 64, 4, 3))


def _autotune(tiles: tuple[tuple[int, int, int, int], ...]):
    """The interpreter gets one 64 x 64 tile: it has nothing to time."""
    if interpreted():
        tiles = ((64, 64, 4, 3),)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
    return triton.autotune(configs=configs, key=["n_ctx", "HEAD_DIM", "IEEE"])


@triton.jit
def _program(n_heads):
    """This program's block along the sequence, its (batch x head) index, and that index as 64-bit (b, h) offsets."""
    pid_bh = tl.program_id(1)
    return tl.program_id(0), pid_bh, (pid_bh // n_heads).to(tl.int64), (pid_bh % n_heads).to(tl.int64)


@triton.jit
def _tile(ptr, base, stride_n, offs, offs_d, n_ctx):
    """Rows `offs` (zero past n_ctx) of one (b, h)'s (N, D) slice starting at ptr + base."""
    return tl.load(ptr + base + offs[:, None] * stride_n + offs_d[None, :], mask=offs[:, None] < n_ctx, other=0.0)


@triton.jit
def _stats(ptr, pid_bh, offs, n_ctx):
    """One value per query row of one (b, h) (the log-sum-exp or delta), zero past n_ctx."""
    return tl.load(ptr + pid_bh * n_ctx + offs, mask=offs < n_ctx, other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in fp32; fp32 inputs in full fp32 (as SDPA does), not TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _scores(q, k, BIAS, bias_base, sbm, offs_m, offs_n, n_ctx, qk_scale, IEEE: tl.constexpr):
    """Log2-domain scores of one (BLOCK_M, BLOCK_N) tile: (q k^T * scale + bias) * log2(e), -inf outside."""
    valid = (offs_m[:, None] < n_ctx) & (offs_n[None, :] < n_ctx)
    bias = tl.load(BIAS + bias_base + offs_m[:, None] * sbm + offs_n[None, :], mask=valid, other=0.0)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale + bias.to(tl.float32) * 1.4426950408889634
    return tl.where(offs_n[None, :] < n_ctx, s, float("-inf"))


@_autotune(FWD_TILES)
@triton.jit
def _fwd_kernel(Q, K, V, BIAS, O, LSE, n_ctx, n_heads, qk_scale,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbh, sbm, sob, soh, son,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One query block of one (b, h): the output rows and their log-sum-exp, keys streamed with an online softmax."""
    pid_m, pid_bh, b, h = _program(n_heads)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _tile(Q, b * sqb + h * sqh, sqn, offs_m, offs_d, n_ctx)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, n_ctx, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K, b * skb + h * skh, skn, offs_n, offs_d, n_ctx)
        s = _scores(q, k, BIAS, h * sbh, sbm, offs_m, offs_n, n_ctx, qk_scale, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, b * svb + h * svh, svn, offs_n, offs_d, n_ctx)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    rows = offs_m < n_ctx
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], out, mask=rows[:, None])
    tl.store(LSE + pid_bh * n_ctx + offs_m, m_i + tl.math.log2(l_i), mask=rows)  # log2 domain


@_autotune(DKDV_TILES)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, BIAS, DO, LSE, DELTA, DK, DV, DS, n_ctx, n_heads, qk_scale, sm_scale,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbh, sbm, sdb, sdh, sdn, sgb, sgh, sgn,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One key block of one (b, h): dK, dV over every query block, and this sample's dS (its share of dBias)."""
    pid_n, pid_bh, b, h = _program(n_heads)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n < n_ctx
    k = _tile(K, b * skb + h * skh, skn, offs_n, offs_d, n_ctx)
    v = _tile(V, b * svb + h * svh, svn, offs_n, offs_d, n_ctx)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, n_ctx, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m < n_ctx
        q = _tile(Q, b * sqb + h * sqh, sqn, offs_m, offs_d, n_ctx)
        s = _scores(q, k, BIAS, h * sbh, sbm, offs_m, offs_n, n_ctx, qk_scale, IEEE)
        p = tl.where(rows[:, None], tl.math.exp2(s - _stats(LSE, pid_bh, offs_m, n_ctx)[:, None]), 0.0)
        do = _tile(DO, b * sdb + h * sdh, sdn, offs_m, offs_d, n_ctx)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        ds = p * (_dot(do, tl.trans(v), IEEE) - _stats(DELTA, pid_bh, offs_m, n_ctx)[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        ds_ptrs = DS + pid_bh.to(tl.int64) * n_ctx * n_ctx + offs_m[:, None] * n_ctx + offs_n[None, :]
        tl.store(ds_ptrs, ds.to(DS.dtype.element_ty), mask=rows[:, None] & cols[None, :])
    out = b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :]  # dK, dV share dQ's layout
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=cols[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=cols[:, None])


@_autotune(DQ_TILES)
@triton.jit
def _bwd_dq_kernel(Q, K, V, BIAS, DO, LSE, DELTA, DQ, n_ctx, n_heads, qk_scale, sm_scale,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbh, sbm, sdb, sdh, sdn, sgb, sgh, sgn,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One query block of one (b, h): dQ over every key block."""
    pid_m, pid_bh, b, h = _program(n_heads)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < n_ctx
    q = _tile(Q, b * sqb + h * sqh, sqn, offs_m, offs_d, n_ctx)
    do = _tile(DO, b * sdb + h * sdh, sdn, offs_m, offs_d, n_ctx)
    lse = _stats(LSE, pid_bh, offs_m, n_ctx)
    delta = _stats(DELTA, pid_bh, offs_m, n_ctx)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, n_ctx, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K, b * skb + h * skh, skn, offs_n, offs_d, n_ctx)
        s = _scores(q, k, BIAS, h * sbh, sbm, offs_m, offs_n, n_ctx, qk_scale, IEEE)
        p = tl.where(rows[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        v = _tile(V, b * svb + h * svh, svn, offs_n, offs_d, n_ctx)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=rows[:, None])


def _constants(q: torch.Tensor) -> dict:
    return dict(HEAD_DIM=q.shape[-1], IEEE=q.dtype == torch.float32)


def _grid(n: int, rows: int, block: str):
    """One program per `block` of the n tokens, for each of the `rows` (batch x heads) slices."""
    return lambda meta: (triton.cdiv(n, meta[block]), rows)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


def _forward_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape
    out = torch.empty((b, n, h, d), device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, H, N, D) view
    return out, torch.empty((b * h, n), device=q.device, dtype=torch.float32)


def _input_grads(q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    b, h, n, d = q.shape
    return tuple(torch.empty((b, n, h, d), device=q.device, dtype=q.dtype).transpose(1, 2) for _ in range(3))


@torch.library.custom_op("fdlight::biased_attention_fwd", mutates_args=())
def biased_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    check(q.is_cuda or interpreted(), f"trainer.attention=triton runs on CUDA tensors, not {q.device}; "
                                      f"use trainer.attention=sdpa there")
    b, h, n, d = q.shape
    out, lse = _forward_outputs(q)
    _fwd_kernel[_grid(n, b * h, "BLOCK_M")](q, k, v, bias, out, lse, n, h, scale * LOG2E, *_strides(q, k, v),
                                            bias.stride(0), bias.stride(1), *_strides(out), **_constants(q))
    return out, lse


@biased_attention_fwd.register_fake
def _(q, k, v, bias, scale):
    return _forward_outputs(q)


@torch.library.custom_op("fdlight::biased_attention_bwd", mutates_args=())
def biased_attention_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    delta = (grad.float() * out.float()).sum(-1).reshape(b * h, n)
    dq, dk, dv = _input_grads(q)
    ds = torch.empty((b * h, n, n), device=q.device, dtype=q.dtype)  # every sample's dS, summed below
    common = [*_strides(q, k, v), bias.stride(0), bias.stride(1), *_strides(grad, dq)]
    _bwd_dkdv_kernel[_grid(n, b * h, "BLOCK_N")](
        q, k, v, bias, grad, lse, delta, dk, dv, ds, n, h, scale * LOG2E, scale, *common, **_constants(q))
    _bwd_dq_kernel[_grid(n, b * h, "BLOCK_M")](
        q, k, v, bias, grad, lse, delta, dq, n, h, scale * LOG2E, scale, *common, **_constants(q))
    return dq, dk, dv, ds.view(b, h, n, n).sum(0, dtype=torch.float32)


@biased_attention_bwd.register_fake
def _(grad, q, k, v, bias, out, lse, scale):
    h, n = q.shape[1], q.shape[2]
    return (*_input_grads(q), q.new_empty((h, n, n), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.scale = scale
    ctx.bias_dtype = bias.dtype


def _backward(ctx, grad_out, grad_lse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dbias = biased_attention_bwd(grad_out, q, k, v, bias, out, lse, ctx.scale)
    return dq, dk, dv, dbias.to(ctx.bias_dtype), None


biased_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_head_dim(head_dim: int) -> None:
    check(16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0,
          f"trainer.attention=triton needs a head dim that is a power of two in [16, 256], not {head_dim}; "
          f"use trainer.attention=sdpa")


def check_shapes(batch: int, heads: int, tokens: int, head_dim: int, bias_shape: tuple) -> None:
    """What the kernels take: a power-of-two head dim in [16, 256], batch x heads within CUDA's grid (65,535) and a
    bias shared by the batch."""
    check_head_dim(head_dim)
    check(batch * heads <= 65535, f"trainer.attention=triton takes at most 65,535 batch x heads per call, got "
                                  f"{batch} x {heads}; use a smaller batch per device or trainer.attention=sdpa")
    check(tuple(bias_shape[-3:]) == (heads, tokens, tokens) and (len(bias_shape) == 3 or bias_shape[0] == 1),
          f"the attention bias must be (heads, N, N) or (1, heads, N, N) = ({heads}, {tokens}, {tokens}), "
          f"got {tuple(bias_shape)}")


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v; q, k, v (B, H, N, D) with the same strides, bias (H, N, N) or (1, H, N, N)."""
    b, h, n, d = q.shape
    check_shapes(b, h, n, d, tuple(bias.shape))
    if bias.dim() == 4:
        bias = bias[0]
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
    if q.stride() != k.stride() or q.stride() != v.stride() or q.stride(-1) != 1:
        q, k, v = (t.contiguous() for t in (q, k, v))
    return biased_attention_fwd(q, k, v, bias, scale if scale is not None else 1.0 / math.sqrt(d))[0]
