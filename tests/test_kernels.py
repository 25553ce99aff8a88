"""Triton kernels (kernels/) against float64 PyTorch references, forward and backward.

Without CUDA the kernels run in Triton's CPU interpreter. Triton decides that when a kernel is defined, also for
its own library kernels, so TRITON_INTERPRET is set here before triton is imported; if another module imported
triton earlier in the same process, the CPU tests skip (set TRITON_INTERPRET=1 in the environment or conftest).
With CUDA the same tests run compiled on the GPU, plus bf16 end-to-end checks of the model. Every kernel output
buffer is NaN-poisoned before the kernel runs, so an element a kernel fails to write makes the comparison fail.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import kernels  # noqa: E402

pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels import attention  # noqa: E402
from kernels.attention import causal_attention, causal_attention_reference  # noqa: E402
from kernels.lora_linear import dropout_mask, lora_linear, lora_linear_reference  # noqa: E402

# False when triton was imported (by another module) before TRITON_INTERPRET was set: triton's own library
# kernels are then compiled-mode too, so the interpreter cannot be switched on any more in this process.
INTERPRET = isinstance(attention._attn_fwd_kernel, InterpretedFunction)


def _patch_interpreter_bf16_dot() -> bool:
    """Triton 3.9's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits. Widen them to float32
    first (exact, and what the tensor cores compute). Returns whether bf16 can be tested in the interpreter."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot") or not hasattr(interpreter, "TensorHandle"):
        return False
    if getattr(builder.create_dot, "_bf16_widened", False):
        return True
    create_dot = builder.create_dot

    def widen(h):
        if getattr(h.dtype, "scalar", h.dtype) == tl.bfloat16 and h.data.dtype == np.uint16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot_bf16(self, a, b, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), *args, **kwargs)

    create_dot_bf16._bf16_widened = True
    builder.create_dot = create_dot_bf16
    return True


BF16_OK = CUDA or (INTERPRET and _patch_interpreter_bf16_dot())

NEEDS_GPU = pytest.mark.skipif(not CUDA or INTERPRET, reason="needs CUDA, compiled Triton")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 set before triton")),
    pytest.param("cuda", marks=NEEDS_GPU),
]
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not BF16_OK, reason="interpreter bf16 dot unpatched")),
]
# Compared against float64 on the same (rounded) inputs: 16-bit kernels round probabilities / the rank-r
# intermediates to the input dtype before the second matmul, like every tensor-core implementation.
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kernels, "_POISON", True)


@pytest.fixture(autouse=True)
def _first_fitting_config(monkeypatch):
    # On the GPU, run each kernel with its first config that fits instead of autotuning over all of them for
    # every shape and dtype here (minutes of compiling); tests that use the `autotune` fixture tune as in real use.
    monkeypatch.setattr(kernels, "_AUTOTUNE", False)


@pytest.fixture
def autotune(monkeypatch):
    monkeypatch.setattr(kernels, "_AUTOTUNE", True)


def _close(actual, expected, dtype, what):
    # atol relative to the tensor's scale: sums like dA = gᵀx cancel to near zero in places.
    atol = TOL[dtype]["atol"] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=TOL[dtype]["rtol"],
                               msg=lambda m: f"{what}: {m}")


def _double_leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


# ----------------------------------------------------------------------------- attention


def _check_attention(q, k, v, scale=None):
    """Forward and backward of causal_attention against the float64 reference on the same inputs."""
    out = causal_attention(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = _double_leaves(q, k, v)
    ref = causal_attention_reference(q64, k64, v64, scale)
    ref.backward(grad.double())
    _close(out, ref, q.dtype, "out")
    for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        _close(t.grad, t64.grad, q.dtype, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("batch,heads,T", [(1, 2, 64), (2, 1, 40), (1, 1, 1), (2, 3, 97)])
def test_attention_matches_reference(device, dtype, head_dim, batch, heads, T):
    # Interpreter tiles are 16/32 wide: T = 64 is a tile multiple, 40 and 97 have tails, 1 is a lone row.
    torch.manual_seed(head_dim + T)
    q, k, v = (torch.randn(batch, heads, T, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    _check_attention(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_strided_qkv_and_odd_head_dim(device):
    # q, k, v as the model makes them: views of one fused projection (no copies), plus a custom scale and a
    # head dim (48) that is padded to a power of two inside the kernel.
    torch.manual_seed(1)
    B, T, H, D = 2, 37, 3, 48
    qkv = torch.randn(B, T, 3 * H * D, device=device, requires_grad=True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    assert not q.is_contiguous()
    out = causal_attention(q, k, v, scale=0.3)
    assert out.transpose(1, 2).is_contiguous()  # the model's (B, T, C) reshape is free
    grad = torch.randn_like(out)
    out.backward(grad)
    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = (t.view(B, T, H, D).transpose(1, 2) for t in qkv64.split(H * D, dim=2))
    ref = causal_attention_reference(q64, k64, v64, scale=0.3)
    ref.backward(grad.double())
    _close(out, ref, torch.float32, "out")
    _close(qkv.grad, qkv64.grad, torch.float32, "dqkv")


@NEEDS_GPU
def test_attention_cuda_training_shape(autotune):
    # The autotuned GPU configs at a realistic T (with a tail), including the multi-block causal paths.
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    _check_attention(q, k, v)


@NEEDS_GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 80, 256])
def test_attention_cuda_other_head_dims(dtype, head_dim):
    # Head dims beyond the tuned ones: 80 is padded to 128, 256 in float32 only fits the smallest configs.
    torch.manual_seed(head_dim)
    q, k, v = (torch.randn(1, 2, 150, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    _check_attention(q, k, v)


class _NoLaunch:
    """A launcher that launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


H200_SMEM = 232_448  # opt-in shared memory per block on H100/H200 (what triton's driver reports)


def _prune(smem, configs, limit, monkeypatch, **args):
    """What triton.autotune's early_config_prune returns for these launch arguments on a device whose shared
    memory per block is `limit` (the real pruner, on a fake device limit: nothing compiles or launches)."""
    monkeypatch.setattr(kernels, "_smem_limit", lambda device: limit)
    return kernels.pruner(smem)(configs, {"Q": args.pop("Q"), "T": 1024}, **args)


def _attention_args(dtype, head_dim, precision="tf32"):
    return dict(Q=torch.empty(0, dtype=dtype), BLOCK_D=head_dim, PRECISION=precision, HEAD_DIM=head_dim)


@pytest.mark.parametrize("autotuning", [True, False])
def test_prune_keeps_configs_that_fit_shared_memory(monkeypatch, autotuning):
    monkeypatch.setattr(kernels, "_AUTOTUNE", autotuning)
    fwd, bwd = attention.FWD_CONFIGS, attention.BWD_CONFIGS
    # bf16, head dim 64 on an H200: every candidate fits; without autotuning only the first (the best guess) runs.
    for configs, smem in ((fwd, attention._fwd_smem), (bwd, attention._bwd_smem)):
        kept = _prune(smem, configs, H200_SMEM, monkeypatch, **_attention_args(torch.bfloat16, 64))
        assert kept == (configs if autotuning else configs[:1])
    # float32, head dim 128 with tf32x3 (two copies of resident tiles): the session-1 failure (a forward config
    # needing 328 KiB). Exactly the configs whose estimate fits stay, and they need less as the limit shrinks.
    args = _attention_args(torch.float32, 128, "tf32x3")
    need = {id(c): attention._fwd_smem(c, args) for c in fwd}
    assert max(need.values()) > H200_SMEM  # the case is a real one
    for limit in (H200_SMEM, 166_912, 101_376):  # H100/H200, A100, sm_86/89
        kept = _prune(attention._fwd_smem, fwd, limit, monkeypatch, **dict(args))
        expected = [c for c in fwd if need[id(c)] <= limit]
        assert kept == (expected if autotuning else expected[:1]) and expected
    # Nothing fits: the one config needing the least shared memory, the small last one.
    assert _prune(attention._fwd_smem, fwd, 1000, monkeypatch, **dict(args)) == [fwd[-1]]
    assert _prune(attention._bwd_smem, bwd, 1000, monkeypatch, **dict(args)) == [bwd[-1]]


def test_prune_lora_gemm_by_dtype_and_variant(monkeypatch, autotune):
    from kernels import lora_linear as lora_module

    configs, smem = lora_module.GEMM_CONFIGS, lora_module._gemm_smem

    def kept(dtype, limit, precision="tf32", down=True):
        monkeypatch.setattr(kernels, "_smem_limit", lambda device: limit)
        return kernels.pruner(smem)(configs, {"X": torch.empty(0, dtype=dtype)}, BLOCK_R=16, DOWN_IN_LOOP=down,
                                    OUT_DROPOUT=False, PRECISION=precision)

    assert kept(torch.bfloat16, H200_SMEM) == configs  # the bf16 tiles are sized for Hopper
    fp32 = kept(torch.float32, H200_SMEM, "tf32x3")
    assert configs[0] not in fp32 and configs[-1] in fp32  # 4-byte 128×256×64 tiles in 3 stages do not fit
    assert len(kept(torch.bfloat16, 101_376)) < len(configs)  # a smaller GPU keeps fewer
    # The down-projection tile in the loop costs shared memory: fewer configs fit with it than without.
    limit = smem(configs[0], dict(X=torch.empty(0, dtype=torch.bfloat16), BLOCK_R=16, DOWN_IN_LOOP=False,
                                  PRECISION="tf32"))
    assert configs[0] in kept(torch.bfloat16, limit, down=False) and configs[0] not in kept(torch.bfloat16, limit)


def test_interpreter_runs_one_small_config():
    # Autotuning in the interpreter would run every config: one fixed small config instead, the tuned lists aside.
    tuned = (attention._FWD, attention._BWD)
    if INTERPRET:
        assert all(len(t.configs) == 1 and t.configs[0] not in attention.FWD_CONFIGS + attention.BWD_CONFIGS
                   for t in tuned)
    else:
        assert [t.configs for t in tuned] == [attention.FWD_CONFIGS, attention.BWD_CONFIGS]


def test_defaults_follow_measured_wins(monkeypatch):
    # Today no generation has a measured win: every kind is off everywhere, so 'auto' means PyTorch.
    for kind in kernels.KINDS:
        assert not kernels.wins(kind, "cuda:0") and not kernels.wins(kind, "cpu")
    # A generation with an entry gets exactly the kinds listed, no other generation gets them, and a CPU never does.
    monkeypatch.setattr(kernels, "MEASURED_WINS", {(9, 0): {"attention_fwd": "bench/results/x.md"}})
    monkeypatch.setattr(kernels, "_capabilities", {0: (9, 0), 1: (8, 0)})
    assert kernels.wins("attention_fwd", torch.device("cuda", 0))
    assert not kernels.wins("attention", "cuda:0") and not kernels.wins("lora_linear", "cuda:0")
    assert not kernels.wins("attention_fwd", "cuda:1") and not kernels.wins("attention_fwd", "cpu")
    with pytest.raises(ValueError, match="unknown kernel kind"):
        kernels.wins("attn", "cuda:0")


def test_unwritten_output_is_caught(monkeypatch):
    # The poison is what makes the other tests sensitive to elements a kernel never writes.
    monkeypatch.setattr(attention, "_FWD", _NoLaunch())
    q = torch.randn(1, 1, 8, 32, device="cuda" if CUDA and not INTERPRET else "cpu")
    assert torch.isnan(causal_attention(q, q, q)).all()


# ----------------------------------------------------------------------------- LoRA linear


def _lora_inputs(device, dtype, lead, in_f, out_f, r, bias):
    x = torch.randn(*lead, in_f, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(out_f, in_f, device=device) / in_f**0.5).to(dtype)
    b = torch.randn(out_f, device=device, dtype=dtype, requires_grad=True) if bias else None
    a = (torch.randn(r, in_f, device=device) / in_f**0.5).to(dtype).requires_grad_()
    bb = (torch.randn(out_f, r, device=device) / r**0.5).to(dtype).requires_grad_()
    return x, weight, b, a, bb


def _check_lora(x, weight, bias, a, b, scale, p=0.0, seed=None):
    y = lora_linear(x, weight, bias, a, b, scale, dropout_p=p, training=p > 0, seed=seed)
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == x.dtype
    grad = torch.randn_like(y)
    y.backward(grad)
    mask = dropout_mask(seed, x[..., 0].numel(), x.shape[-1], p, x.device).view(x.shape) if p > 0 else None
    x64, b64, a64, bb64 = _double_leaves(x, bias, a, b)
    ref = lora_linear_reference(x64, weight.double(), b64, a64, bb64, scale, mask, p)
    ref.backward(grad.double())
    _close(y, ref, x.dtype, "y")
    for name, t, t64 in (("dx", x, x64), ("dA", a, a64), ("dB", b, bb64), ("dbias", bias, b64)):
        if t is not None and t.requires_grad:
            _close(t.grad, t64.grad, x.dtype, name)
    assert weight.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,in_f,out_f,r,bias", [
    ((37,), 40, 50, 4, True),  # tails everywhere (interpreter tiles are 32)
    ((2, 32), 64, 96, 16, False),  # tile multiples, 3-d input, no bias
    ((1,), 48, 24, 8, True),  # a single token
])
def test_lora_linear_matches_reference(device, dtype, lead, in_f, out_f, r, bias):
    torch.manual_seed(in_f + r)
    _check_lora(*_lora_inputs(device, dtype, lead, in_f, out_f, r, bias), scale=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_linear_dropout_matches_reference_with_same_mask(device, dtype):
    torch.manual_seed(3)
    _check_lora(*_lora_inputs(device, dtype, (2, 19), 72, 40, 8, True), scale=0.5, p=0.3, seed=1234)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_linear_without_input_grad(device, p):
    # x needs no gradient (e.g. a frozen embedding below): no dx GEMM, dy B comes from the small down kernel.
    torch.manual_seed(4)
    x, weight, bias, a, b = _lora_inputs(device, torch.float32, (45,), 40, 72, 4, True)
    _check_lora(x.detach(), weight, bias, a, b, scale=1.5, p=p, seed=99)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_dropout_mask_properties(device):
    p = 0.25
    mask = dropout_mask(7, 64, 260, p, device)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.02  # 16640 draws: ~6 standard deviations
    # Defined per logical element, so independent of how many rows are launched (and of the tiling).
    assert torch.equal(dropout_mask(7, 5, 260, p, device), mask[:5])
    assert not torch.equal(dropout_mask(8, 64, 260, p, device), mask)
    assert dropout_mask(7, 64, 260, 0.0, device).all()
    # Without an explicit seed, calls differ and torch.manual_seed makes them repeatable.
    x, weight, bias, a, b = _lora_inputs(device, torch.float32, (4,), 32, 16, 4, False)
    with torch.no_grad():
        torch.manual_seed(0)
        y1 = lora_linear(x, weight, bias, a, b, 1.0, dropout_p=0.5, training=True)
        y2 = lora_linear(x, weight, bias, a, b, 1.0, dropout_p=0.5, training=True)
        torch.manual_seed(0)
        y3 = lora_linear(x, weight, bias, a, b, 1.0, dropout_p=0.5, training=True)
        y_eval = lora_linear(x, weight, bias, a, b, 1.0, dropout_p=0.5, training=False)
    assert not torch.equal(y1, y2) and torch.equal(y1, y3)
    torch.testing.assert_close(y_eval, lora_linear_reference(x, weight, bias, a, b, 1.0), atol=1e-4, rtol=1e-4)


def test_lora_linear_rejects_trainable_weight():
    x, weight, bias, a, b = _lora_inputs("cpu", torch.float32, (2,), 16, 8, 4, False)
    with pytest.raises(ValueError, match="freeze"):
        lora_linear(x, weight.requires_grad_(), bias, a, b, 1.0)


# ----------------------------------------------------------------------------- model, end to end


@pytest.mark.parametrize("device", DEVICES)
def test_model_train_step_triton_matches_sdpa(device, monkeypatch):
    # One training step of the model with attn_impl='triton' against 'sdpa': float32 in the interpreter, bf16
    # autocast on the GPU (then within bf16 tolerance).
    model = pytest.importorskip("model")
    calls = []
    monkeypatch.setattr(attention, "causal_attention", lambda *a: calls.append(1) or causal_attention(*a))
    bf16 = device == "cuda"
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=4, n_embd=256, block_size=256, vocab_size=1024, dropout=0.0, bias=True)
    if not bf16:
        shape.update(n_embd=64, block_size=32, vocab_size=128)
    ref = model.GPT(model.GPTConfig(**shape, attn_impl="sdpa")).to(device)
    tri = model.GPT(model.GPTConfig(**shape, attn_impl="triton")).to(device)
    tri.load_state_dict(ref.state_dict())
    idx, targets = torch.randint(0, shape["vocab_size"], (2, 4, shape["block_size"] - 3), device=device)
    losses = []
    for m in (ref, tri):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            _, loss = m(idx, targets)
        loss.backward()
        losses.append(loss.item())
    assert len(calls) == shape["n_layer"]  # the model did run our kernel
    tol = 2e-2 if bf16 else 1e-5
    assert abs(losses[0] - losses[1]) <= tol * abs(losses[0])
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
        err = (p_tri.grad.float() - p_ref.grad.float()).norm() / p_ref.grad.float().norm().clamp_min(1e-12)
        assert err < (5e-2 if bf16 else 1e-4), f"{name}: relative gradient error {err:.3g}"
