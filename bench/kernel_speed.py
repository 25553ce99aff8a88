"""Benchmarks of the Triton kernels (kernels/) against PyTorch, bf16, on a CUDA GPU.

    python bench/kernel_speed.py [--quick] [--out=results.md] [--peak_tflops=989]

Sections: causal attention forward and forward+backward against SDPA's flash backend and a naive materialized
softmax; LoRA linear forward and forward+backward against the unfused PyTorch version and the frozen base GEMM
alone; one training step of the default 6-layer GPT (bf16 autocast) with attn_impl 'triton' against 'sdpa'.
Times are medians of CUDA-event timed repeats after warm-up (triton.testing.do_bench); the first call of each
Triton kernel shape also autotunes it, outside the timing. Such a time includes whatever the host cannot hide (a
call's Python and launch overhead, when it exceeds the GPU time), so the Triton kernels and the main baseline are
also timed as CUDA-graph replays (triton.testing.do_bench_cudagraph: GPU time alone; "graph" columns). Then the
configs the autotuner chose, and every compiled variant's shared memory against the estimate that pruned it.
`--out FILE` writes the Markdown tables to FILE and the same data as JSON next to it (FILE with a .json suffix).
Without CUDA it says so and exits 0. bench/gpu_session.py runs these same functions (also on a CPU, tiny).
"""

import json
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2study.cli import load_config, run_main
from gpt2study.training import peak_flops_of
from model import setting

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU, matched against the device name.

ATTENTION_SHAPES = [(32, 12, 256, 64), (16, 12, 512, 64), (8, 12, 1024, 64), (16, 12, 1024, 64), (8, 12, 2048, 64),
                    (16, 16, 512, 64), (8, 16, 1024, 64)]  # (B, H, T, D): GPT-2 small, then medium heads
ATTENTION_QUICK = [(8, 12, 1024, 64), (16, 12, 1024, 64)]
# (in, out, r, tokens, dropout): the fused attention projections of GPT-2 small and medium at 16 x 1024 tokens
LORA_SHAPES = [(768, 2304, r, 16384, 0.0) for r in (4, 8, 16)] + [(1024, 3072, r, 16384, 0.0) for r in (4, 8, 16)] + [
    (768, 2304, 8, 8192, 0.0), (768, 2304, 8, 16384, 0.1), (1024, 3072, 8, 16384, 0.1)]
LORA_QUICK = [(768, 2304, 8, 16384, 0.0), (1024, 3072, 8, 16384, 0.0)]


@dataclass
class KernelBenchConfig:
    quick: bool = setting(False, "a smaller sweep (B 8 and 16 at T 1024; two LoRA shapes at r 8)")
    out: str = setting("", "also write the tables to this Markdown file and a .json beside it")
    peak_tflops: float = setting(0.0, "peak bf16 TFLOP/s for MFU (0: by device name)", at_least=0.0)


def bench(fn):
    """Median milliseconds of fn(); None if it cannot run here (e.g. a backend unavailable, out of memory)."""
    from triton.testing import do_bench

    try:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    except (RuntimeError, torch.OutOfMemoryError) as e:
        print(f"  (skipped: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        torch.cuda.empty_cache()
        return None


def bench_graph(fn):
    """Mean ms of fn() replayed from a CUDA graph (no host overhead, no L2 flush); None if it cannot be captured."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=20)
    except Exception as e:  # any capture failure only loses this column
        print(f"  (graph timing skipped: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})",
              file=sys.stderr)
        torch.cuda.synchronize()
        return None


def wall_clock(fn, repeats: int = 3):
    """Median ms of fn() by the wall clock after one warm-up call: the timer for a CPU (the interpreter)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def bench_pass(fn, mode, inputs, grad, timer=bench):
    """Median ms of fn() without autograd ("fwd"), or of fn() plus the backward to `inputs` ("fwd+bwd")."""
    if mode == "fwd":

        def run():
            with torch.no_grad():
                fn()
    else:

        def run():
            torch.autograd.grad(fn(), inputs, grad)

    return timer(run)


def ratio(a, b):
    return None if a is None or b is None else a / b


def fmt(v, digits=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 10**digits else f"{v:.{digits}g}"
    return str(v)


def markdown(title, rows):
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _timers(device):
    """(main timer, CUDA-graph timer or None) for the device."""
    return (bench, bench_graph) if device == "cuda" else (wall_clock, None)


# ----------------------------------------------------------------------------- attention


def attention_rows(shapes, device="cuda", dtype=torch.bfloat16):
    """Forward and forward+backward rows per (B, H, T, D) shape: ours, SDPA (flash on CUDA) and a naive softmax."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import causal_attention, causal_attention_reference

    def sdpa(q, k, v):
        if device != "cuda":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    timer, graph_timer = _timers(device)
    impls = {"triton": causal_attention, "flash": sdpa, "naive": causal_attention_reference}
    rows = []
    for B, H, T, D in shapes:
        # q, k, v as the model makes them: strided views of one fused projection.
        qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dtype, requires_grad=True)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        grad = torch.randn(B, H, T, D, device=device, dtype=dtype)
        fwd_flops = 2 * B * H * T * T * D  # 4·B·H·T²·D, halved by causality
        for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):  # backward = 2.5 forwards
            ms = {name: bench_pass(partial(fn, q, k, v), mode, (q, k, v), grad, timer) for name, fn in impls.items()}
            graph = {name: bench_pass(partial(impls[name], q, k, v), mode, (q, k, v), grad, graph_timer)
                     for name in ("triton", "flash")} if graph_timer else {}
            rows.append({"B": B, "H": H, "T": T, "D": D, "pass": mode, **{f"{n} ms": ms[n] for n in impls},
                         **{f"{n} graph ms": graph[n] for n in graph},
                         "triton TFLOP/s": ratio(flops / 1e9, ms["triton"]),
                         "flash TFLOP/s": ratio(flops / 1e9, ms["flash"]),
                         "flash/triton time": ratio(ms["flash"], ms["triton"]),
                         "naive/triton time": ratio(ms["naive"], ms["triton"])})
            print(f"  attention B={B} H={H} T={T} D={D} {mode}: "
                  + ", ".join(f"{n} {fmt(t)} ms" for n, t in {**ms, **{f"{n} graph": t for n, t in graph.items()}}
                              .items()), file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- LoRA linear


def lora_unfused(x, weight, bias, a, b, scale, p):
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(F.dropout(x, p) if p else x, a), b)


def lora_concat(x, weight, bias, a, b, scale, p):
    """lora.py's lora_impl='concat': one matmul over [x | s·x·Aᵀ] and [W | B]."""
    from lora import _ConcatLinear

    return _ConcatLinear.apply(x, scale * F.linear(F.dropout(x, p) if p else x, a), weight, b, bias)


def lora_rows(shapes, device="cuda", dtype=torch.bfloat16):
    """Forward and forward+backward rows per (in, out, r, tokens, dropout): our Triton kernel, the concatenated
    PyTorch path, unfused PyTorch, the base GEMM."""
    from kernels.lora_linear import lora_linear

    timer, graph_timer = _timers(device)
    scale = 2.0
    rows = []
    for in_f, out_f, r, n, p in shapes:
        dt = dict(device=device, dtype=dtype)
        x = torch.randn(n, in_f, **dt, requires_grad=True)
        weight = torch.randn(out_f, in_f, **dt) / in_f**0.5
        bias = torch.randn(out_f, **dt)
        a = (torch.randn(r, in_f, **dt) / in_f**0.5).requires_grad_()
        b = (torch.randn(out_f, r, **dt) / r**0.5).requires_grad_()
        grad = torch.randn(n, out_f, **dt)
        impls = {
            "triton": (partial(lora_linear, x, weight, bias, a, b, scale, dropout_p=p, training=True), (x, a, b)),
            "concat": (partial(lora_concat, x, weight, bias, a, b, scale, p), (x, a, b)),
            "unfused": (partial(lora_unfused, x, weight, bias, a, b, scale, p), (x, a, b)),
            "base": (partial(F.linear, x, weight, bias), (x,)),  # the frozen GEMM alone (backward: dx only)
        }
        for mode in ("fwd", "fwd+bwd"):
            ms = {name: bench_pass(fn, mode, inputs, grad, timer) for name, (fn, inputs) in impls.items()}
            graph = {name: bench_pass(fn, mode, inputs, grad, graph_timer)
                     for name, (fn, inputs) in impls.items()} if graph_timer else {}
            rows.append({"in": in_f, "out": out_f, "r": r, "N": n, "dropout": p, "pass": mode,
                         **{f"{k} ms": v for k, v in ms.items()}, **{f"{k} graph ms": v for k, v in graph.items()},
                         "triton/base time": ratio(ms["triton"], ms["base"]),
                         "concat/base time": ratio(ms["concat"], ms["base"]),
                         "unfused/triton time": ratio(ms["unfused"], ms["triton"]),
                         "unfused/concat time": ratio(ms["unfused"], ms["concat"]),
                         "concat/triton time": ratio(ms["concat"], ms["triton"])})
            print(f"  lora {in_f}x{out_f} r={r} N={n} p={p} {mode}: "
                  + ", ".join(f"{k} {fmt(v)} ms" for k, v in {**ms, **{f"{n} graph": t for n, t in graph.items()}}
                              .items()), file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- what the autotuner did


def _tuned_kernels():
    """(name, autotuner, shared-memory estimate) of every autotuned kernel."""
    import kernels.attention as attention
    import kernels.lora_linear as lora

    return [("attention fwd", attention._FWD, attention._fwd_smem), ("attention bwd", attention._BWD,
                                                                    attention._bwd_smem),
            ("lora gemm", lora._GEMM, lora._gemm_smem)]


def tuned_rows():
    """The config each autotuned Triton kernel chose, per tuning key (what the timings above ran)."""
    rows = []
    for name, tuner, _ in _tuned_kernels():
        for key, cfg in getattr(tuner, "cache", {}).items():
            meta = ", ".join(f"{k} {v}" for k, v in cfg.kwargs.items())
            rows.append({"kernel": name, "key": ", ".join(map(str, key)),
                         "config": f"{meta}, {cfg.num_warps} warps, {cfg.num_stages} stages"})
    return rows


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compiled_rows():
    """Every compiled variant of the autotuned kernels (all configs the autotuner tried): its shared memory, registers
    and spills as compiled, against the estimate that let it through the pruning. Reads triton's kernel cache, whose
    layout is triton's own: a release that changes it yields a row saying so instead."""
    import triton

    from kernels import interpreting

    if interpreting():
        return []  # nothing is compiled
    rows = []
    for name, tuner, smem in _tuned_kernels():
        fn = tuner.fn
        try:
            for cache in fn.device_caches.values():
                for k in cache[0].values():
                    consts = {fn.arg_names[i[0]] if isinstance(i, tuple) else i: v for i, v in k.src.constants.items()}
                    ptr = next(t for t in k.src.signature.values() if str(t).startswith("*"))
                    args = {**consts, "Q": torch.empty(0, dtype=_DTYPES[str(ptr)[1:]])}
                    args["X"] = args["Q"]
                    blocks = {b: consts[b] for b in tuner.configs[0].kwargs}
                    cfg = triton.Config(blocks, num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages)
                    estimate, shared = smem(cfg, args), k.metadata.shared
                    rows.append({"kernel": name, "dtype": str(ptr)[1:], "head dim / rank tile":
                                 consts.get("BLOCK_D", consts.get("BLOCK_R")), "precision": consts.get("PRECISION"),
                                 "blocks": ", ".join(f"{b} {v}" for b, v in blocks.items()),
                                 "warps": cfg.num_warps, "stages": cfg.num_stages, "estimated smem": estimate,
                                 "compiled smem": shared, "estimate covers it": estimate >= shared,
                                 "registers": getattr(k, "n_regs", None), "spills": getattr(k, "n_spills", None)})
        except Exception as e:  # another triton's cache layout: say so, keep the rest of the bench
            rows.append({"kernel": name, "dtype": f"n/a ({type(e).__name__}: {str(e)[:80]})"})
    return rows


# ----------------------------------------------------------------------------- training step


def train_step(model, opt, idx, targets):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_step_rows(quick, peak_tflops):
    try:
        from model import GPT, GPTConfig
    except ImportError as e:
        print(f"  (training step skipped: {e})", file=sys.stderr)
        return []
    batch = 4 if quick else 8
    rows, sdpa_ms = [], None
    for impl in ("sdpa", "triton"):
        torch.manual_seed(0)
        cfg = GPTConfig(attn_impl=impl, dropout=0.0)
        model = GPT(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")
        targets = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")

        ms = bench(partial(train_step, model, opt, idx, targets))
        tokens = batch * cfg.block_size
        # nanoGPT's estimate: 6N per token for the matmuls (N without the position embedding) plus 12·L·T·d for
        # attention (non-causal count).
        flops = tokens * (6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size)
        sdpa_ms = ms if impl == "sdpa" else sdpa_ms
        rows.append({"attn_impl": impl, "batch": f"{batch}x{cfg.block_size}", "ms/step": ms,
                     "tokens/s": ratio(tokens * 1e3, ms),
                     "MFU %": None if ms is None or not peak_tflops else flops / (ms * 1e-3) / (peak_tflops * 1e10),
                     "sdpa/impl time": ratio(sdpa_ms, ms)})
        print(f"  train step {impl}: {fmt(ms)} ms", file=sys.stderr)
        torch.cuda.empty_cache()
    return rows


def main():
    cfg = load_config(KernelBenchConfig, sys.argv[1:], doc=__doc__)
    if not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU; none here, nothing to benchmark.")
        return
    import triton

    name = torch.cuda.get_device_name()
    peak = cfg.peak_tflops or (peak_flops_of(name) or 0) / 1e12 or None
    header = (f"## Triton kernel benchmarks\n\n{name}, torch {torch.__version__}, triton {triton.__version__}, bf16; "
              f"median ms (CUDA events); ratios > 1 mean the Triton kernel is faster; MFU peak "
              f"{fmt(peak)} TFLOP/s.\n")
    tables = {
        "Causal attention (FLOPs: causal half of 4·B·H·T²·D forward, 3.5× for fwd+bwd)":
            attention_rows(ATTENTION_QUICK if cfg.quick else ATTENTION_SHAPES),
        "LoRA linear (y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ; base = frozen x Wᵀ + b alone)":
            lora_rows(LORA_QUICK if cfg.quick else LORA_SHAPES),
        "Training step, default 6-layer GPT, bf16 autocast, fused AdamW": train_step_rows(cfg.quick, peak),
        "Autotuned configs (key: the tuning key, then the tensor dtypes)": tuned_rows(),
        "Compiled variants: shared memory (bytes) against the pruning estimate": compiled_rows(),
    }
    text = header + "\n" + "\n".join(markdown(title, rows) for title, rows in tables.items() if rows)
    print(text)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        payload = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "peak_tflops": peak,
                   "tables": tables}
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1, ensure_ascii=False, default=str))
        print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
