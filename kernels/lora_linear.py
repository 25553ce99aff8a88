"""LoRA linear layer as fused Triton kernels: y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ.

Shapes: x (..., in), weight W (out, in) frozen, bias (out,) or None, lora_a A (r, in), lora_b B (out, r).

Forward, one GEMM kernel over (token block, output block) tiles: while it streams x and W along `in` it also
accumulates the rank-r product t = x Aᵀ from the same x tiles, then adds (scale·t) Bᵀ and the bias in the
epilogue, so no (N, out) intermediate exists. The column-0 programs store s·t (N×r) for the backward.
With LoRA dropout (training, p > 0) the mask must only touch the A path and generating it inside the GEMM would
redo it for every output block, so a small memory-bound kernel computes t = drop(x) Aᵀ once and the GEMM reads it.

Dropout mask: keep(i, j) = tl.rand4x(seed, i·⌈in/4⌉ + ⌊j/4⌋)[j mod 4] ≥ p for token row i and input feature j
(Philox on logical indices, so independent of tiles and strides; int32 counters, which wrap beyond 2³³ elements),
kept values scaled by 1/(1-p). The seed is drawn from torch's CPU generator per call (so torch.manual_seed makes
runs repeatable) unless given; the backward regenerates the same mask from it, nothing mask-sized is stored.
`dropout_mask(seed, n, in, p, device)` returns the mask, for tests and references.

Backward, one GEMM kernel over (token block, input block) tiles computing dx = dy W + scale·((dy B) A) ⊙ mask/(1-p):
g = dy B is accumulated from the dy tiles the GEMM streams anyway; the column-0 programs also reduce dB = dyᵀ(s·t)
for their tokens and every program reduces its share of dA = (s·g)ᵀ drop(x) in the epilogue, both with float32
atomics (so dA and dB are not bitwise deterministic). No dW is ever computed: the weight must be frozen.
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _autocast, _check_dtype, _dot_precision, _fresh, _Launcher


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
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """TS = scale · (drop(X) Aᵀ), one pass over X (the dropout path of the forward)."""
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
        u = _dropped(x, _dropout_keep(seed, rows, k0, K, p, BLOCK_K), keep_scale)
        t = tl.dot(u, a_t, t, input_precision=PRECISION)
    tl.store(TS + rows[:, None] * sts_n + offs_r[None, :], (t * scale).to(TS.dtype.element_ty),
             mask=(rows[:, None] < N) & (offs_r[None, :] < R))


@triton.jit
def _lora_fwd_kernel(X, W, BIAS, A, B, TS, Y, N, K, NOUT, R, N_BUCKET,
                     sx_n, sx_k, sw_o, sw_k, sa_r, sa_k, sb_o, sb_r, sts_n, sy_n, scale,
                     HAS_BIAS: tl.constexpr, DOWN_IN_LOOP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                     PRECISION: tl.constexpr):
    pid_m, pid_n = _tile_ids(N, NOUT, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    # Wrapped indices keep the streaming loads unmasked along rows/cols; the extra rows/cols are never stored.
    x_ptrs = X + (rows % N)[:, None] * sx_n + offs_k[None, :] * sx_k
    w_ptrs = W + offs_k[:, None] * sw_k + (cols % NOUT)[None, :] * sw_o
    a_ptrs = A + offs_k[:, None] * sa_k + offs_r[None, :] * sa_r
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
        acc = tl.dot(x, tl.load(w_ptrs, mask=k_in[:, None], other=0.0), acc, input_precision=PRECISION)
        if DOWN_IN_LOOP:
            a_t = tl.load(a_ptrs, mask=k_in[:, None] & (offs_r[None, :] < R), other=0.0)
            t = tl.dot(x, a_t, t, input_precision=PRECISION)
            a_ptrs += BLOCK_K * sa_k
        x_ptrs += BLOCK_K * sx_k
        w_ptrs += BLOCK_K * sw_k

    ts_ptrs = TS + rows[:, None] * sts_n + offs_r[None, :]
    ts_mask = (rows[:, None] < N) & (offs_r[None, :] < R)
    if DOWN_IN_LOOP:
        ts = (t * scale).to(X.dtype.element_ty)
        if pid_n == 0:
            tl.store(ts_ptrs, ts, mask=ts_mask)
    else:
        ts = tl.load(ts_ptrs, mask=ts_mask, other=0.0)
    b_t = tl.load(B + offs_r[:, None] * sb_r + (cols % NOUT)[None, :] * sb_o, mask=offs_r[:, None] < R, other=0.0)
    acc = tl.dot(ts, b_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols % NOUT).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * sy_n + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < NOUT))


@triton.jit(do_not_specialize=["seed"])
def _lora_bwd_kernel(DY, W, A, B, TS, X, DX, DA, DB, N, K, NOUT, R, N_BUCKET,
                     sdy_n, sdy_o, sw_o, sw_k, sa_r, sa_k, sb_o, sb_r, sts_n, sx_n, sx_k, sdx_n,
                     scale, seed, p, keep_scale,
                     HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                     PRECISION: tl.constexpr):
    pid_m, pid_n = _tile_ids(N, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    dy_ptrs = DY + (rows % N)[:, None] * sdy_n + offs_o[None, :] * sdy_o
    w_ptrs = W + offs_o[:, None] * sw_o + (cols % K)[None, :] * sw_k
    b_ptrs = B + offs_o[:, None] * sb_o + offs_r[None, :] * sb_r
    # Zero beyond N, so the wrapped dy rows add nothing to dB.
    ts = tl.load(TS + rows[:, None] * sts_n + offs_r[None, :], mask=(rows[:, None] < N) & r_in[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    g = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for o0 in range(0, NOUT, BLOCK_K):
        o_in = offs_o < NOUT - o0
        dy = tl.load(dy_ptrs, mask=o_in[None, :], other=0.0)
        if NEED_DX:
            acc = tl.dot(dy, tl.load(w_ptrs, mask=o_in[:, None], other=0.0), acc, input_precision=PRECISION)
        g = tl.dot(dy, tl.load(b_ptrs, mask=o_in[:, None] & r_in[None, :], other=0.0), g, input_precision=PRECISION)
        if pid_n == 0:  # one column of programs reduces dB; the others would only repeat it
            db = tl.dot(tl.trans(dy), ts, input_precision=PRECISION)
            tl.atomic_add(DB + (o0 + offs_o)[:, None] * R + offs_r[None, :], db, mask=o_in[:, None] & r_in[None, :])
        dy_ptrs += BLOCK_K * sdy_o
        w_ptrs += BLOCK_K * sw_o
        b_ptrs += BLOCK_K * sb_o

    gs = (g * scale).to(DY.dtype.element_ty)
    a = tl.load(A + offs_r[:, None] * sa_r + (cols % K)[None, :] * sa_k, mask=r_in[:, None], other=0.0)
    out_mask = (rows[:, None] < N) & (cols[None, :] < K)
    u = tl.load(X + rows[:, None] * sx_n + cols[None, :] * sx_k, mask=out_mask, other=0.0)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, rows, pid_n * BLOCK_N, K, p, BLOCK_N)
        u = _dropped(u, keep, keep_scale)
        if NEED_DX:
            acc += tl.where(keep, tl.dot(gs, a, input_precision=PRECISION) * keep_scale, 0.0)
    elif NEED_DX:
        acc = tl.dot(gs, a, acc, input_precision=PRECISION)
    da = tl.dot(tl.trans(gs), u, input_precision=PRECISION)
    tl.atomic_add(DA + offs_r[:, None] * K + cols[None, :], da, mask=r_in[:, None] & (cols[None, :] < K))
    if NEED_DX:
        tl.store(DX + rows[:, None] * sdx_n + cols[None, :], acc.to(DX.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------- launch configs


def _configs(blocks):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples -> triton configs."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in blocks]


# Hopper-class GEMM tiles (wgmma through tl.dot), shared by the forward and backward GEMMs. Keyed on the feature
# sizes and the token count's power-of-two bucket. The interpreter's small tiles exercise tails and grouping.
_GEMM = _configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4),
                  (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)])
_GEMM_INTERPRETER = _configs([(32, 32, 32, 4, 1)])[0]
_KEY = ["N_BUCKET", "K", "NOUT", "R"]
_FWD = _Launcher(_lora_fwd_kernel, _GEMM, _KEY, _GEMM_INTERPRETER)
_BWD = _Launcher(_lora_bwd_kernel, _GEMM, _KEY, _GEMM_INTERPRETER, reset_to_zero=["DA", "DB"])
_DOWN_BLOCK_M, _DOWN_BLOCK_K = 64, 64  # memory-bound: moderate tiles, many programs
_MASK_BLOCK = 64


# ----------------------------------------------------------------------------- host side


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot wants every dim >= 16


def _b_strides(b_t):
    """(stride along out, stride along r) of B given as its contiguous (r, out) transpose, which keeps every B tile
    contiguous along `out`: masking the short r side then no longer blocks vectorized, pipelined loads."""
    return b_t.stride(1), b_t.stride(0)


def _lora_forward(x, weight, bias, a, b_t, scale, p, seed):
    N, K = x.shape
    NOUT, R = weight.shape[0], a.shape[0]
    y = _fresh(torch.empty(N, NOUT, dtype=x.dtype, device=x.device))
    ts = _fresh(torch.empty(N, R, dtype=x.dtype, device=x.device))
    precision = _dot_precision(x.dtype)
    if p > 0:
        _lora_down_kernel[(triton.cdiv(N, _DOWN_BLOCK_M),)](
            x, a, ts, N, K, R, *x.stride(), *a.stride(), ts.stride(0), scale, seed, p, 1.0 / (1.0 - p),
            BLOCK_M=_DOWN_BLOCK_M, BLOCK_K=_DOWN_BLOCK_K, BLOCK_R=_block_r(R), PRECISION=precision, num_warps=4)
    _FWD[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(NOUT, meta["BLOCK_N"]),)](
        x, weight, bias if bias is not None else y, a, b_t, ts, y, N, K, NOUT, R, triton.next_power_of_2(N),
        *x.stride(), *weight.stride(), *a.stride(), *_b_strides(b_t), ts.stride(0), y.stride(0), scale,
        HAS_BIAS=bias is not None, DOWN_IN_LOOP=p == 0, BLOCK_R=_block_r(R), PRECISION=precision)
    return y, ts


def _lora_backward(dy, x, weight, a, b_t, ts, scale, p, seed, need_dx):
    N, K = x.shape
    NOUT, R = weight.shape[0], a.shape[0]
    dx = _fresh(torch.empty(N, K, dtype=x.dtype, device=x.device)) if need_dx else x  # x: unused pointer
    da = torch.zeros(R, K, dtype=torch.float32, device=x.device)  # atomic accumulators: must start at 0
    db = torch.zeros(NOUT, R, dtype=torch.float32, device=x.device)
    _BWD[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)](
        dy, weight, a, b_t, ts, x, dx, da, db, N, K, NOUT, R, triton.next_power_of_2(N),
        *dy.stride(), *weight.stride(), *a.stride(), *_b_strides(b_t), ts.stride(0), *x.stride(), dx.stride(0),
        scale, seed, p, 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0, NEED_DX=need_dx, BLOCK_R=_block_r(R), PRECISION=_dot_precision(x.dtype))
    return (dx if need_dx else None), da.to(a.dtype), db.to(b_t.dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, p, seed):
        b_t = b.t().contiguous()  # (r, out): tiny; see _b_strides
        y, ts = _lora_forward(x, weight, bias, a, b_t, scale, p, seed)
        ctx.save_for_backward(x, weight, a, b_t, ts)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, a, b_t, ts = ctx.saved_tensors
        dx, da, db = _lora_backward(dy, x, weight, a, b_t, ts, ctx.scale, ctx.p, ctx.seed, ctx.needs_input_grad[0])
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if ctx.needs_input_grad[2] else None
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
