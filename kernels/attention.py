"""Causal self-attention as a FlashAttention-2 style Triton kernel pair.

`causal_attention(q, k, v, scale=None)` takes (B, H, T, D) tensors and returns softmax(q kᵀ · scale + causal) v.

Forward: one program per (query block, batch·head) walks the key blocks left of the diagonal without a mask,
then the diagonal block with the causal mask, keeping a running max / sum (online softmax) in float32, so no
T×T matrix ever exists. Key blocks right of the diagonal are never visited. The softmax scale (times log2 e, for
exp2) is folded into the q tile once, not into every score tile. It stores the output and the row log-sum-exp
(base 2, of the scaled scores).

Backward, as FlashAttention-2's: a small kernel computes delta = rowsum(dO·O); then one program per key block
keeps that block's k and v (k pre-scaled, once) and walks the query blocks at or below it, recomputing the
probabilities from the log-sum-exp. Each (key block, query block) pair costs 5 block matmuls: the scores, dV += Pᵀ
dO, dPᵀ = V dOᵀ, dK += dSᵀ Q and the pair's share of dQ = dS K, which is added into a float32 dQ buffer with
atomics (a separate dQ pass would recompute the scores and dP: 7 matmuls a pair). The atomics' order varies
between runs on a GPU, so dQ's last bits may too.

Loads are masked only where a tile can reach past T (the diagonal block, the last query block) or the head dim is
padded; the full tiles in between load without masks. Any T, any head dim up to 256 (padded to a power of two
≥ 16 in registers; 32/64/128 are the tuned ones), float32/float16/bfloat16 inputs with float32 accumulation.
Inputs may be strided views (e.g. the `.view(B, T, H, D).transpose(1, 2)` of a fused qkv projection): strides go
to the kernels, only a tensor whose last dim is not contiguous is copied. Outputs and gradients are laid out as
(B, T, H, D) in memory, so that `y.transpose(1, 2).contiguous()` in the model is free.

No attention dropout: the model warns once and uses torch's scaled_dot_product_attention instead when attention
dropout > 0 in training.
"""

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _autocast, _check_dtype, _dot_precision, _fresh, autotuned

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _tile_mask(rows, offs_d, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FULL: tl.constexpr):
    """Where a (rows × head dim) tile is real. FULL: every row is below T, only a padded head dim is masked."""
    if FULL:
        mask = (rows[:, None] >= 0) & (offs_d[None, :] < HEAD_DIM)
    else:
        mask = rows[:, None] < T
        if HEAD_DIM != BLOCK_D:  # compile-time: the padded head-dim columns only exist for odd head dims
            mask = mask & (offs_d[None, :] < HEAD_DIM)
    return mask


@triton.jit
def _load_tile(base, rows, stride_t, offs_d, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FULL: tl.constexpr):
    """Rows `rows` of a (T, HEAD_DIM) slice with unit stride along the head dim; zeros outside. FULL tiles (all rows
    below T) of an unpadded head dim load without a mask."""
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if FULL and HEAD_DIM == BLOCK_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=_tile_mask(rows, offs_d, T, HEAD_DIM, BLOCK_D, FULL), other=0.0)
    return tile


@triton.jit
def _store_tile(base, rows, stride_t, offs_d, T, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    mask = _tile_mask(rows, offs_d, T, HEAD_DIM, BLOCK_D, False)
    tl.store(base + rows[:, None] * stride_t + offs_d[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _head_offset(stride_b, stride_h, H):
    """Offset of this program's (batch, head) slice; int64 since fused-qkv strides can be large."""
    bh = tl.program_id(1)
    return (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, sk_t, sv_t, rows, offs_d, lo, hi, T,
               MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr):
    """The key blocks [lo, hi): left of the diagonal (MASKED False) every key is below T and before every row."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K, cols, sk_t, offs_d, T, HEAD_DIM, BLOCK_D, not MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # q holds the scale: s is in log2 units
        if MASKED:
            s = tl.where(rows[:, None] >= cols[None, :], s, float("-inf"))
        # Every row sees key `lo` of its first block (causality), so m_new is finite and alpha never NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, cols, sv_t, offs_d, T, HEAD_DIM, BLOCK_D, not MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                     H, T, T_BUCKET, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    # Causal work grows with the query block: launch the longest programs first to shorten the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    Q += _head_offset(sq_b, sq_h, H)
    K += _head_offset(sk_b, sk_h, H)
    V += _head_offset(sv_b, sv_h, H)
    O += _head_offset(so_b, so_h, H)
    LSE += tl.program_id(1).to(tl.int64) * T

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, rows, sq_t, offs_d, T, HEAD_DIM, BLOCK_D, False)
    q = (q.to(tl.float32) * qk_scale).to(q.dtype)  # the scale, once per q tile instead of once per score tile
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    diag = pid_m * BLOCK_M
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, sk_t, sv_t, rows, offs_d, 0, diag, T,
                               False, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, sk_t, sv_t, rows, offs_d, diag,
                               tl.minimum(diag + BLOCK_M, T), T, True, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)

    _store_tile(O, rows, so_t, offs_d, T, acc / l_i[:, None], HEAD_DIM, BLOCK_D)
    tl.store(LSE + rows, m_i + tl.math.log2(l_i), mask=rows < T)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, so_b, so_h, so_t, sdo_b, sdo_h, sdo_t, H, T,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + _head_offset(so_b, so_h, H), rows, so_t, offs_d, T, HEAD_DIM, BLOCK_D, False)
    do = _load_tile(DO + _head_offset(sdo_b, sdo_h, H), rows, sdo_t, offs_d, T, HEAD_DIM, BLOCK_D, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _bwd_inner(dk, dv, k, v, Q, DO, DQ, LSE, DELTA, sq_t, sdo_t, sdq_t, cols, offs_d, lo, hi, T,
               MASKED: tl.constexpr, FULL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """The query blocks [lo, hi) against the program's key block: 5 block matmuls each. MASKED: the diagonal block
    (causal mask); FULL: every query row is below T (no row mask)."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(Q, rows, sq_t, offs_d, T, HEAD_DIM, BLOCK_D, FULL)
        do = _load_tile(DO, rows, sdo_t, offs_d, T, HEAD_DIM, BLOCK_D, FULL)
        if FULL:
            lse = tl.load(LSE + rows)
            delta = tl.load(DELTA + rows)
        else:  # lse = +inf past T makes those rows' probabilities exactly 0, whatever was loaded for them
            lse = tl.load(LSE + rows, mask=rows < T, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=rows < T, other=0.0)
        # Transposed (keys × queries) so that dK and dV accumulate without transposing the accumulators;
        # k holds the scale (log2 units).
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) - lse[None, :])
        if MASKED:
            p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)  # this key block's share of dQ (× ln 2 later)
        dq_ptrs = DQ + rows[:, None] * sdq_t + offs_d[None, :]
        if FULL and HEAD_DIM == BLOCK_D:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, mask=_tile_mask(rows, offs_d, T, HEAD_DIM, BLOCK_D, FULL), sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_kernel(Q, K, V, DO, DQ, DK, DV, LSE, DELTA,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
                     sdq_b, sdq_h, sdq_t, sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t,
                     H, T, T_BUCKET, sm_scale, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Program j: dK, dV of key block j over the query blocks at or below it (the diagonal one with the causal
    mask, then the full ones, then a tail past T), adding each pair's share of dQ into the float32 buffer DQ."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    Q += _head_offset(sq_b, sq_h, H)
    K += _head_offset(sk_b, sk_h, H)
    V += _head_offset(sv_b, sv_h, H)
    DO += _head_offset(sdo_b, sdo_h, H)
    DQ += _head_offset(sdq_b, sdq_h, H)
    DK += _head_offset(sdk_b, sdk_h, H)
    DV += _head_offset(sdv_b, sdv_h, H)
    LSE += tl.program_id(1).to(tl.int64) * T
    DELTA += tl.program_id(1).to(tl.int64) * T

    start = tl.program_id(0) * BLOCK_N
    cols = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # Keys past T (the last block's tail) are zeros; the causal mask of the diagonal, the only block they meet,
    # removes them from every row below T.
    k = _load_tile(K, cols, sk_t, offs_d, T, HEAD_DIM, BLOCK_D, False)
    k = (k.to(tl.float32) * qk_scale).to(k.dtype)  # the scale once, for the scores and (undone at the end) dQ
    v = _load_tile(V, cols, sv_t, offs_d, T, HEAD_DIM, BLOCK_D, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    below = start + BLOCK_N
    full_end = below + tl.maximum(T - below, 0) // BLOCK_M * BLOCK_M
    dk, dv = _bwd_inner(dk, dv, k, v, Q, DO, DQ, LSE, DELTA, sq_t, sdo_t, sdq_t, cols, offs_d,
                        start, tl.minimum(below, T), T, True, False, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    dk, dv = _bwd_inner(dk, dv, k, v, Q, DO, DQ, LSE, DELTA, sq_t, sdo_t, sdq_t, cols, offs_d,
                        below, full_end, T, False, True, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    dk, dv = _bwd_inner(dk, dv, k, v, Q, DO, DQ, LSE, DELTA, sq_t, sdo_t, sdq_t, cols, offs_d,
                        full_end, T, T, False, False, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    _store_tile(DK, cols, sdk_t, offs_d, T, dk * sm_scale, HEAD_DIM, BLOCK_D)
    _store_tile(DV, cols, sdv_t, offs_d, T, dv, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launch configs


# Shared memory estimates (bytes), for pruning the configs to the device. Pipelined tiles take num_stages buffers,
# tiles loaded once take one; tf32x3 dots (float32 inputs, TF32 not allowed) keep a second copy of those. Should a
# new triton allocate more, a config that does not fit costs only tuning time: triton's autotuner times it as
# infinitely slow.


def _fwd_smem(c, args):
    """q, plus a k and a v tile per stage."""
    m, n, d, e = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], args["BLOCK_D"], args["Q"].element_size()
    return e * (_resident_copies(args) * m * d + 2 * c.num_stages * n * d) + 1024


def _bwd_smem(c, args):
    """k and v resident, q and dO tiles (and their row statistics) per stage."""
    n, m, d, e, s = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], args["BLOCK_D"], args["Q"].element_size(), c.num_stages
    return e * (_resident_copies(args) * 2 * n * d + 2 * s * m * d) + 8 * s * m + 1024


def _resident_copies(args):
    return 2 if args["PRECISION"] == "tf32x3" else 1


def _configs(blocks, names):
    """Tuples of (*meta-parameters, num_warps, num_stages) -> triton configs."""
    return [triton.Config(dict(zip(names, b[:-2])), num_warps=b[-2], num_stages=b[-1]) for b in blocks]


# Candidates for H100-class GPUs (FlashAttention-2 tiles), best guess first (what tests run without tuning); the
# pruning drops those that would not fit the device's shared memory for the head dim and dtype at hand. The last of
# each list fits every dtype and head dim <= 256 on sm_90. Keyed on the head dim and T's power-of-two bucket, so
# that generation with a growing T does not retune at every step.
_KEY = ["HEAD_DIM", "T_BUCKET"]
FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4),
                        (64, 32, 4, 3), (32, 16, 4, 2)], ("BLOCK_M", "BLOCK_N"))
# (BLOCK_N keys per program, BLOCK_M queries per step, warps, stages). A program holds k, v and the dK, dV
# accumulators (two 128×64 float32 tiles) in registers: 8 warps give them room where 4 would spill.
BWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 8, 3), (128, 32, 4, 4), (128, 64, 8, 2),
                        (64, 32, 4, 4), (64, 16, 4, 3), (32, 16, 4, 2)], ("BLOCK_N", "BLOCK_M"))
_FWD = autotuned(_attn_fwd_kernel, FWD_CONFIGS, _KEY, _fwd_smem, _configs([(32, 16, 4, 1)], ("BLOCK_M", "BLOCK_N"))[0])
_BWD = autotuned(_attn_bwd_kernel, BWD_CONFIGS, _KEY, _bwd_smem, _configs([(32, 16, 4, 1)], ("BLOCK_N", "BLOCK_M"))[0])


# ----------------------------------------------------------------------------- host side


def _bthd_empty(B, H, T, D, like):
    """A (B, H, T, D) view of a (B, T, H, D) buffer: what the model transposes back to (B, T, C) for free."""
    return _fresh(torch.empty(B, T, H, D, dtype=like.dtype, device=like.device).transpose(1, 2))


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _attn_forward(q, k, v, scale):
    B, H, T, D = q.shape
    o = _bthd_empty(B, H, T, D, q)
    lse = _fresh(torch.empty(B * H, T, dtype=torch.float32, device=q.device))
    _FWD[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, T, triton.next_power_of_2(T), scale * _LOG2E,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), PRECISION=_dot_precision(q.dtype))
    return o, lse


def _attn_backward(q, k, v, o, lse, do, scale):
    B, H, T, D = q.shape
    do = _unit_last(do)
    dims = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)))
    delta = _fresh(torch.empty(B * H, T, dtype=torch.float32, device=q.device))
    block_m = 8192 // dims["BLOCK_D"]  # o and dO tiles of 32 float32 registers per thread each, at 4 warps
    _attn_bwd_delta_kernel[(triton.cdiv(T, block_m), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T, BLOCK_M=block_m, **dims, num_warps=4)

    # dQ is a sum over key blocks, added by their programs: a float32 buffer that starts at zero
    dq_acc = torch.zeros(B, T, H, D, dtype=torch.float32, device=q.device).transpose(1, 2)
    dk, dv = (_bthd_empty(B, H, T, D, q) for _ in range(2))
    _BWD[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)](
        q, k, v, do, dq_acc, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dq_acc), *_strides(dk), *_strides(dv), H, T, triton.next_power_of_2(T), scale, scale * _LOG2E,
        PRECISION=_dot_precision(q.dtype), **dims)
    # the programs multiplied dS by the pre-scaled k: scale · log2 e; dQ wants scale alone
    return (dq_acc * _LN2).to(q.dtype), dk, dv


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _attn_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        dq, dk, dv = _attn_backward(*ctx.saved_tensors, do, ctx.scale)
        return dq, dk, dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal softmax(q kᵀ · scale) v for (B, H, T, D) tensors; scale defaults to 1/sqrt(D). Differentiable."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (B, H, T, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported by the Triton attention kernel")
    q, k, v = _autocast(q, k, v)
    _check_dtype(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _CausalAttention.apply(_unit_last(q), _unit_last(k), _unit_last(v), scale)


def causal_attention_reference(q, k, v, scale=None):
    """Plain PyTorch causal attention with a materialized softmax (for tests and benchmarks)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    T = q.shape[-2]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
