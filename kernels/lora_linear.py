"""LoRA linear layer as fused Triton kernels: y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ.

Shapes: x (..., in), weight W (out, in) frozen, bias (out,) or None, lora_a A (r, in), lora_b B (out, r).

One GEMM kernel serves the forward and the input gradient: Y = X Wᵀ + ((s · X Lᵀ) U) ⊙ keep/(1-p) + bias. While it
streams X and W along the reduction dim it also accumulates the rank-r product X Lᵀ from the same X tiles (one
extra, r-wide MMA per step), stores s · X Lᵀ (N×r) from its first column of programs, and adds the rank-r
update in the epilogue, so no (N, out) intermediate exists:
  forward  y  = x Wᵀ  + (s·x Aᵀ) Bᵀ + b      (L = A, U = Bᵀ; stores ts = s·x Aᵀ for the backward)
  backward dx = dy W  + ((s·dy B) A) ⊙ keep/(1-p)  (L = Bᵀ, U = A; stores gs = s·dy B)
With LoRA dropout in the forward the mask must only touch the A path, and generating it inside the GEMM would redo
it for every output block, so a small memory-bound kernel computes ts = s·drop(x) Aᵀ once and the GEMM reads it.

The LoRA weight gradients are reductions over the tokens with an r-wide operand: dB = dyᵀ ts, dA = gsᵀ drop(x)
(and dbias = dyᵀ 1, as one more column next to ts). One memory-bound launch computes them per chunk of token rows
into a float32 buffer that torch sums over the chunks: no atomics, deterministic, and every program the same work.
No dW is ever computed: the weight must be frozen.

Dropout mask: keep(i, j) = tl.rand4x(seed, i·⌈in/4⌉ + ⌊j/4⌋)[j mod 4] ≥ p for token row i and input feature j
(Philox on logical indices, so independent of tiles and strides; int32 counters, which wrap beyond 2³³ elements),
kept values scaled by 1/(1-p). The seed is drawn from torch's CPU generator per call (so torch.manual_seed makes
runs repeatable) unless given; the backward regenerates the same mask from it, nothing mask-sized is stored.
`dropout_mask(seed, n, in, p, device)` returns the mask, for tests and references.
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _autocast, _check_dtype, _dot_precision, _fresh, autotuned, interpreting


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, grouped so consecutive programs share operand tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _dropout_keep(seed, rows, col0, n_cols, p, BLOCK_COLS: tl.constexpr):
    """Keep-mask of the tile `rows` × [col0, col0 + BLOCK_COLS), col0 a multiple of 4 (see the module docstring)."""
    # One Philox call yields 4 numbers: a quarter of the work and registers of one call per element.
    quads = col0 // 4 + tl.arange(0, BLOCK_COLS // 4)
    u0, u1, u2, u3 = tl.rand4x(seed, rows[:, None] * tl.cdiv(n_cols, 4) + quads[None, :])
    return tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3)) >= p


@triton.jit
def _dropped(x, keep, keep_scale):
    return tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x.dtype)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(MASK, n_rows, n_cols, seed, p, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(seed, rows, tl.program_id(1) * BLOCK, n_cols, p, BLOCK)
    tl.store(MASK + rows[:, None] * n_cols + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit(do_not_specialize=["seed"])
def _lora_down_kernel(X, A, TS, N, K, R, sx_n, sx_k, sa_r, sa_k, sts_n, scale, seed, p, keep_scale,
                      HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """TS = scale · (drop(X) Aᵀ), one pass over X: the forward with dropout, and gs = s·dy B when no dx is needed."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    t = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        x = tl.load(X + rows[:, None] * sx_n + cols[None, :] * sx_k,
                    mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0)
        a_t = tl.load(A + cols[:, None] * sa_k + offs_r[None, :] * sa_r,
                      mask=(cols[:, None] < K) & (offs_r[None, :] < R), other=0.0)
        if HAS_DROPOUT:
            x = _dropped(x, _dropout_keep(seed, rows, k0, K, p, BLOCK_K), keep_scale)
        t = tl.dot(x, a_t, t, input_precision=PRECISION)
    tl.store(TS + rows[:, None] * sts_n + offs_r[None, :], (t * scale).to(TS.dtype.element_ty),
             mask=(rows[:, None] < N) & (offs_r[None, :] < R))


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_kernel(X, W, L, U, BIAS, T, Y, M, N, K, R, M_BUCKET,
                      sx_m, sx_k, sw_n, sw_k, sl_r, sl_k, su_r, su_n, st_m, sy_m, scale, seed, p, keep_scale,
                      HAS_BIAS: tl.constexpr, DOWN_IN_LOOP: tl.constexpr, OUT_DROPOUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """Y (M×N) = X Wᵀ + (T U) ⊙ keep/(1-p) + bias, X (M×K), W (N×K), U (R×N), all by strides. T (M×R) is
    scale · X Lᵀ (L: R×K), accumulated here and stored (DOWN_IN_LOOP), or read precomputed."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    # Wrapped indices keep the streaming loads unmasked along rows/cols; the extra rows/cols are never stored.
    x_ptrs = X + (rows % M)[:, None] * sx_m + offs_k[None, :] * sx_k
    w_ptrs = W + offs_k[:, None] * sw_k + (cols % N)[None, :] * sw_n
    l_ptrs = L + offs_k[:, None] * sl_k + offs_r[None, :] * sl_r
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
        acc = tl.dot(x, tl.load(w_ptrs, mask=k_in[:, None], other=0.0), acc, input_precision=PRECISION)
        if DOWN_IN_LOOP:
            l_t = tl.load(l_ptrs, mask=k_in[:, None] & (offs_r[None, :] < R), other=0.0)
            t = tl.dot(x, l_t, t, input_precision=PRECISION)
            l_ptrs += BLOCK_K * sl_k
        x_ptrs += BLOCK_K * sx_k
        w_ptrs += BLOCK_K * sw_k

    t_ptrs = T + rows[:, None] * st_m + offs_r[None, :]
    t_mask = (rows[:, None] < M) & (offs_r[None, :] < R)
    if DOWN_IN_LOOP:
        ts = (t * scale).to(X.dtype.element_ty)  # rounded like any 16-bit operand of the next matmul
        if pid_n == 0:
            tl.store(t_ptrs, ts, mask=t_mask)
    else:
        ts = tl.load(t_ptrs, mask=t_mask, other=0.0)
    u = tl.load(U + offs_r[:, None] * su_r + (cols % N)[None, :] * su_n, mask=offs_r[:, None] < R, other=0.0)
    if OUT_DROPOUT:
        keep = _dropout_keep(seed, rows, pid_n * BLOCK_N, N, p, BLOCK_N)
        acc += tl.where(keep, tl.dot(ts, u, input_precision=PRECISION) * keep_scale, 0.0)
    else:
        acc = tl.dot(ts, u, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols % N).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * sy_m + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _sum_over_rows(BIG, s_m, s_c, THIN, st_m, row0, row1, c0, C, R, seed, p, keep_scale,
                   DROPOUT: tl.constexpr, ONES_COLUMN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """Σ over rows [row0, row1) of drop(BIG)[row, c0:c0+BLOCK_C]ᵀ THIN[row, :R] -> (BLOCK_C, BLOCK_R) float32;
    with ONES_COLUMN, THIN's column R reads as 1, so that column of the result is the column sum of BIG."""
    cols = c0 + tl.arange(0, BLOCK_C)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
    for m0 in range(row0, row1, BLOCK_M):
        rows = m0 + offs_m
        in_rows = rows < row1
        big = tl.load(BIG + rows[:, None] * s_m + cols[None, :] * s_c, mask=in_rows[:, None] & (cols[None, :] < C),
                      other=0.0)
        if DROPOUT:
            big = _dropped(big, _dropout_keep(seed, rows, c0, C, p, BLOCK_C), keep_scale)
        thin = tl.load(THIN + rows[:, None] * st_m + offs_r[None, :], mask=in_rows[:, None] & (offs_r[None, :] < R),
                       other=0.0)
        if ONES_COLUMN:
            thin = tl.where(in_rows[:, None] & (offs_r[None, :] == R), 1.0, thin.to(tl.float32)).to(big.dtype)
        acc = tl.dot(tl.trans(big), thin, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["seed"])
def _lora_grads_kernel(DY, TS, X, GS, P, M, NOUT, K, R, rows_per_chunk,
                       sdy_m, sdy_o, sts_m, sx_m, sx_k, sgs_m, sp_chunk, seed, p, keep_scale,
                       HAS_DROPOUT: tl.constexpr, HAS_DBIAS: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """Partial sums over chunk program_id(1) of the token rows, into P[chunk] = [dB (NOUT×R) | dA (R×K) | dbias]:
    programs with program_id(0) < ⌈NOUT/BLOCK_C⌉ reduce dB = dyᵀ ts for one block of outputs (and dbias, the
    column sums of dy), the others dA = gsᵀ drop(x) for one block of inputs."""
    row0 = tl.program_id(1) * rows_per_chunk
    row1 = tl.minimum(row0 + rows_per_chunk, M)
    P += tl.program_id(1).to(tl.int64) * sp_chunk
    offs_r = tl.arange(0, BLOCK_R)
    n_db = tl.cdiv(NOUT, BLOCK_C)
    if tl.program_id(0) < n_db:
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        db = _sum_over_rows(DY, sdy_m, sdy_o, TS, sts_m, row0, row1, tl.program_id(0) * BLOCK_C, NOUT, R, seed, p,
                            keep_scale, False, HAS_DBIAS, BLOCK_C, BLOCK_M, BLOCK_R, PRECISION)
        tl.store(P + cols[:, None] * R + offs_r[None, :], db, mask=(cols[:, None] < NOUT) & (offs_r[None, :] < R))
        if HAS_DBIAS:
            tl.store(P + NOUT * R + R * K + cols, tl.sum(tl.where(offs_r[None, :] == R, db, 0.0), 1),
                     mask=cols < NOUT)
    else:
        c0 = (tl.program_id(0) - n_db) * BLOCK_C
        cols = c0 + tl.arange(0, BLOCK_C)
        da_t = _sum_over_rows(X, sx_m, sx_k, GS, sgs_m, row0, row1, c0, K, R, seed, p, keep_scale, HAS_DROPOUT,
                              False, BLOCK_C, BLOCK_M, BLOCK_R, PRECISION)
        tl.store(P + NOUT * R + offs_r[None, :] * K + cols[:, None], da_t,
                 mask=(cols[:, None] < K) & (offs_r[None, :] < R))


# ----------------------------------------------------------------------------- launch configs


def _gemm_smem(c, args):
    """Shared memory (bytes) of a GEMM config, as triton 3.6-3.9 allocates it on sm_90 (calibrated against ptxas for
    every config, dtype and variant): the X, W (and L) tiles in each of num_stages pipeline buffers, plus tf32x3's
    split epilogue operands."""
    m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    e, r = args["X"].element_size(), args["BLOCK_R"]
    per_stage = m * k + k * n + (k * r if args["DOWN_IN_LOOP"] else 0)
    split = n * (r + 32) if args["PRECISION"] == "tf32x3" else 0
    return e * (c.num_stages * per_stage + split) + 2048


def _configs(blocks):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples -> triton configs."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in blocks]


# Hopper-class GEMM tiles (wgmma through tl.dot), best guess first: 128×256×64 with 8 warps is the standard one for
# bf16 at these reduction sizes. Pruned to the device's shared memory; the last one fits anything. Keyed on the
# GEMM's sizes, the token count's power-of-two bucket, the rank's tile and the variant (not the rank itself: ranks
# 4 to 16 share one tile of 16).
GEMM_CONFIGS = _configs([(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                         (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (32, 64, 32, 4, 2)])
_GEMM = autotuned(_lora_gemm_kernel, GEMM_CONFIGS, ["M_BUCKET", "K", "N", "BLOCK_R", "DOWN_IN_LOOP", "OUT_DROPOUT"],
                  _gemm_smem, _configs([(32, 32, 32, 4, 1)])[0])


def _small_blocks(dtype):
    """(rows, features) tiles of the memory-bound kernels; small under the interpreter, to cover several blocks.
    float32 (tf32x3 dots) gets half-width tiles: 128 spills registers (ptxas, sm_90)."""
    if interpreting():
        return 16, 32
    return 64, (64 if dtype == torch.float32 else 128)


_MASK_BLOCK = 64


# ----------------------------------------------------------------------------- host side


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot wants every dim >= 16


def _lora_forward(x, weight, bias, a, b_t, scale, p, seed):
    N, K = x.shape
    NOUT, R = weight.shape[0], a.shape[0]
    y = _fresh(torch.empty(N, NOUT, dtype=x.dtype, device=x.device))
    ts = _fresh(torch.empty(N, R, dtype=x.dtype, device=x.device))
    precision = _dot_precision(x.dtype)
    if p > 0:
        block_m, block_k = _small_blocks(x.dtype)
        _lora_down_kernel[(triton.cdiv(N, block_m),)](
            x, a, ts, N, K, R, *x.stride(), *a.stride(), ts.stride(0), scale, seed, p, 1.0 / (1.0 - p),
            HAS_DROPOUT=True, BLOCK_M=block_m, BLOCK_K=block_k // 2, BLOCK_R=_block_r(R), PRECISION=precision,
            num_warps=4)
    _GEMM[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(NOUT, meta["BLOCK_N"]),)](
        x, weight, a, b_t, bias if bias is not None else y, ts, y, N, NOUT, K, R, triton.next_power_of_2(N),
        *x.stride(), *weight.stride(), *a.stride(), *b_t.stride(), ts.stride(0), y.stride(0),
        scale, seed, p, 1.0 / (1.0 - p),
        HAS_BIAS=bias is not None, DOWN_IN_LOOP=p == 0, OUT_DROPOUT=False, BLOCK_R=_block_r(R), PRECISION=precision)
    return y, ts


def _lora_backward(dy, x, weight, a, b_t, ts, scale, p, seed, need_dx, need_dbias):
    N, K = x.shape
    NOUT, R = weight.shape[0], a.shape[0]
    precision, keep_scale = _dot_precision(x.dtype), 1.0 / (1.0 - p)
    gs = _fresh(torch.empty(N, R, dtype=x.dtype, device=x.device))
    dx = None
    if need_dx:  # dx = dy W + ((s·dy B) A) ⊙ keep/(1-p), storing gs = s·dy B on the way
        dx = _fresh(torch.empty(N, K, dtype=x.dtype, device=x.device))
        _GEMM[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)](
            dy, weight, b_t, a, dx, gs, dx, N, K, NOUT, R, triton.next_power_of_2(N),
            *dy.stride(), weight.stride(1), weight.stride(0), *b_t.stride(), *a.stride(), gs.stride(0), dx.stride(0),
            scale, seed, p, keep_scale,
            HAS_BIAS=False, DOWN_IN_LOOP=True, OUT_DROPOUT=p > 0, BLOCK_R=_block_r(R), PRECISION=precision)
    else:
        block_m, block_k = _small_blocks(x.dtype)
        _lora_down_kernel[(triton.cdiv(N, block_m),)](
            dy, b_t, gs, N, NOUT, R, *dy.stride(), *b_t.stride(), gs.stride(0), scale, seed, 0.0, 1.0,
            HAS_DROPOUT=False, BLOCK_M=block_m, BLOCK_K=block_k // 2, BLOCK_R=_block_r(R), PRECISION=precision,
            num_warps=4)

    # dB, dA (and dbias) per chunk of token rows; chunks sized for about 4 programs per SM.
    block_m, block_c = _small_blocks(x.dtype)
    n_cblocks = triton.cdiv(NOUT, block_c) + triton.cdiv(K, block_c)
    chunks = min(triton.cdiv(N, block_m), triton.cdiv(4 * _num_sms(x.device), n_cblocks), 64)
    rows_per_chunk = triton.cdiv(triton.cdiv(N, chunks), block_m) * block_m
    chunks = triton.cdiv(N, rows_per_chunk)
    width = NOUT * R + R * K + (NOUT if need_dbias else 0)
    partial = _fresh(torch.empty(chunks, width, dtype=torch.float32, device=x.device))
    _lora_grads_kernel[(n_cblocks, chunks)](
        dy, ts, x, gs, partial, N, NOUT, K, R, rows_per_chunk, *dy.stride(), ts.stride(0), *x.stride(), gs.stride(0),
        partial.stride(0), seed, p, keep_scale,
        HAS_DROPOUT=p > 0, HAS_DBIAS=need_dbias, BLOCK_C=block_c, BLOCK_M=block_m,
        BLOCK_R=_block_r(R + need_dbias), PRECISION=precision, num_warps=4, num_stages=3)
    total = partial.sum(0)
    db = total[:NOUT * R].view(NOUT, R).to(x.dtype, copy=True)
    da = total[NOUT * R:NOUT * R + R * K].view(R, K).to(x.dtype, copy=True)
    dbias = total[NOUT * R + R * K:].to(x.dtype, copy=True) if need_dbias else None
    return dx, da, db, dbias


_sm_counts: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a couple of chunks, so that the chunking is tested
    if device.index not in _sm_counts:
        _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device.index]


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, p, seed):
        b_t = b.t().contiguous()  # (r, out): tiny, and every tile of it is then contiguous along `out`
        y, ts = _lora_forward(x, weight, bias, a, b_t, scale, p, seed)
        ctx.save_for_backward(x, weight, a, b_t, ts)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, a, b_t, ts = ctx.saved_tensors
        dx, da, db, dbias = _lora_backward(dy, x, weight, a, b_t, ts, ctx.scale, ctx.p, ctx.seed,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return dx, None, dbias, da, db, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout_p: float = 0.0, training: bool = False,
                seed: int | None = None) -> torch.Tensor:
    """x Wᵀ + bias + scale · (dropout(x) lora_aᵀ) lora_bᵀ. Differentiable in x, bias, lora_a, lora_b; the weight
    must not require grad. Dropout applies when training and dropout_p > 0; `seed` fixes its mask (see the module
    docstring), by default drawn from torch's CPU generator."""
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("lora_linear never computes a weight gradient: freeze the base weight (requires_grad=False)")
    in_features = x.shape[-1]
    r = lora_a.shape[0]
    if weight.dim() != 2 or weight.shape[1] != in_features or lora_a.shape != (r, in_features) \
            or lora_b.shape != (weight.shape[0], r) or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"lora_linear shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}, lora_a {tuple(lora_a.shape)}, lora_b "
                         f"{tuple(lora_b.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    x, weight, bias, lora_a, lora_b = _autocast(x, weight, bias, lora_a, lora_b)
    _check_dtype(x, weight, bias, lora_a, lora_b)
    p = float(dropout_p) if training else 0.0
    if p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    x2d = x.reshape(-1, in_features)
    if x2d.shape[0] == 0:  # the kernels index rows modulo N
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale)
    y = _LoraLinear.apply(x2d, weight, bias, lora_a, lora_b, float(scale), p, 0 if seed is None else int(seed))
    return y.view(*x.shape[:-1], weight.shape[0])


def dropout_mask(seed: int, n_rows: int, n_cols: int, p: float, device) -> torch.Tensor:
    """The (n_rows, n_cols) boolean keep-mask that lora_linear(..., training=True, seed=seed) applies to x."""
    mask = torch.empty(n_rows, n_cols, dtype=torch.int8, device=device)
    grid = (triton.cdiv(n_rows, _MASK_BLOCK), triton.cdiv(n_cols, _MASK_BLOCK))
    _dropout_mask_kernel[grid](mask, n_rows, n_cols, seed, p, BLOCK=_MASK_BLOCK)
    return mask.bool()


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, dropout_mask=None, dropout_p=0.0):
    """Plain PyTorch LoRA linear; `dropout_mask` (keep-mask of x's shape) with `dropout_p` applies LoRA dropout."""
    u = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    return torch.nn.functional.linear(x, weight, bias) + scale * (u @ lora_a.T) @ lora_b.T
