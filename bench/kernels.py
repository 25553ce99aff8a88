"""Benchmarks of the Triton kernels (kernels/) against PyTorch, bf16, on a CUDA GPU.

    python bench/kernels.py [--quick] [--out results.md] [--peak-tflops 989]

Sections: causal attention forward and forward+backward against SDPA's flash backend and a naive materialized
softmax; LoRA linear forward and forward+backward against the unfused PyTorch version and the frozen base GEMM
alone; one training step of the default 6-layer GPT (bf16 autocast) with attn_impl 'triton' against 'sdpa'.
Times are medians of CUDA-event timed repeats after warm-up (triton.testing.do_bench); the first call of each
Triton kernel shape also autotunes it, outside the timing. Such a time includes whatever the host cannot hide (a
call's Python and launch overhead, when it exceeds the GPU time), so the Triton kernels and the main baseline are
also timed as CUDA-graph replays (triton.testing.do_bench_cudagraph: GPU time alone; "graph" columns), and the
configs the autotuner chose are listed. `--out FILE` writes the Markdown tables to FILE and
the same data as JSON next to it (FILE with a .json suffix). Without CUDA it says so and exits 0.
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU, matched against the device name.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "4090": 165.2}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller sweep (one shape per section)")
    ap.add_argument("--out", type=Path, help="also write the tables to this Markdown file and a .json beside it")
    ap.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU (default: by device name)")
    return ap.parse_args()


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
    cols = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- attention


def attention_rows(quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import causal_attention, causal_attention_reference

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    impls = {"triton": causal_attention, "flash": flash, "naive": causal_attention_reference}
    shapes = [(8, 12, 1024, 64), (8, 16, 1024, 64)] if quick else [
        (32, 12, 256, 64), (16, 12, 512, 64), (8, 12, 1024, 64), (8, 12, 2048, 64),  # GPT-2 small heads
        (16, 16, 512, 64), (8, 16, 1024, 64)]  # GPT-2 medium heads
    rows = []
    for B, H, T, D in shapes:
        # q, k, v as the model makes them: strided views of one fused projection.
        qkv = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        grad = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        fwd_flops = 2 * B * H * T * T * D  # 4·B·H·T²·D, halved by causality
        for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):  # backward = 2.5 forwards
            ms = {name: bench_pass(partial(fn, q, k, v), mode, (q, k, v), grad) for name, fn in impls.items()}
            graph = {name: bench_pass(partial(impls[name], q, k, v), mode, (q, k, v), grad, bench_graph)
                     for name in ("triton", "flash")}
            rows.append({"B": B, "H": H, "T": T, "D": D, "pass": mode, **{f"{n} ms": ms[n] for n in impls},
                         **{f"{n} graph ms": graph[n] for n in graph},
                         "triton TFLOP/s": ratio(flops / 1e9, ms["triton"]),
                         "flash TFLOP/s": ratio(flops / 1e9, ms["flash"]),
                         "flash/triton time": ratio(ms["flash"], ms["triton"]),
                         "naive/triton time": ratio(ms["naive"], ms["triton"])})
            print(f"  attention B={B} H={H} T={T} {mode}: " + ", ".join(f"{n} {fmt(t)} ms" for n, t in ms.items())
                  + ", graph: " + ", ".join(f"{n} {fmt(t)} ms" for n, t in graph.items()), file=sys.stderr)
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- LoRA linear


def lora_unfused(x, weight, bias, a, b, scale, p):
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(F.dropout(x, p) if p else x, a), b)


def lora_rows(quick):
    from kernels.lora_linear import lora_linear

    scale = 2.0
    shapes = [(768, 2304, 8, 16384, 0.0), (1024, 3072, 8, 16384, 0.0)] if quick else [
        (768, 2304, 4, 16384, 0.0), (768, 2304, 8, 16384, 0.0), (768, 2304, 16, 16384, 0.0),
        (768, 2304, 8, 8192, 0.0), (1024, 3072, 4, 16384, 0.0), (1024, 3072, 16, 16384, 0.0),
        (1024, 3072, 8, 8192, 0.0), (768, 2304, 8, 16384, 0.1), (1024, 3072, 8, 16384, 0.1)]
    rows = []
    for in_f, out_f, r, n, p in shapes:
        dt = dict(device="cuda", dtype=torch.bfloat16)
        x = torch.randn(n, in_f, **dt, requires_grad=True)
        weight = torch.randn(out_f, in_f, **dt) / in_f**0.5
        bias = torch.randn(out_f, **dt)
        a = (torch.randn(r, in_f, **dt) / in_f**0.5).requires_grad_()
        b = (torch.randn(out_f, r, **dt) / r**0.5).requires_grad_()
        grad = torch.randn(n, out_f, **dt)
        impls = {
            "triton": (partial(lora_linear, x, weight, bias, a, b, scale, dropout_p=p, training=True), (x, a, b)),
            "unfused": (partial(lora_unfused, x, weight, bias, a, b, scale, p), (x, a, b)),
            "base": (partial(F.linear, x, weight, bias), (x,)),  # the frozen GEMM alone (backward: dx only)
        }
        for mode in ("fwd", "fwd+bwd"):
            ms = {name: bench_pass(fn, mode, inputs, grad) for name, (fn, inputs) in impls.items()}
            graph = {name: bench_pass(impls[name][0], mode, impls[name][1], grad, bench_graph)
                     for name in ("triton", "unfused", "base")}
            rows.append({"in": in_f, "out": out_f, "r": r, "N": n, "dropout": p, "pass": mode,
                         **{f"{k} ms": v for k, v in ms.items()}, **{f"{k} graph ms": v for k, v in graph.items()},
                         "triton vs base %": None if ms["triton"] is None or ms["base"] is None
                         else 100 * (ms["triton"] / ms["base"] - 1),
                         "unfused/triton time": ratio(ms["unfused"], ms["triton"])})
            print(f"  lora {in_f}x{out_f} r={r} N={n} p={p} {mode}: "
                  + ", ".join(f"{k} {fmt(v)} ms" for k, v in ms.items())
                  + ", graph: " + ", ".join(f"{k} {fmt(v)} ms" for k, v in graph.items()), file=sys.stderr)
        torch.cuda.empty_cache()
    return rows


def tuned_rows():
    """The config each autotuned Triton kernel chose, per tuning key (what the timings above ran)."""
    import kernels.attention as attention
    import kernels.lora_linear as lora

    rows = []
    for name, launcher in (("attention fwd", attention._FWD), ("attention bwd", attention._BWD),
                           ("lora gemm", lora._GEMM)):
        for key, cfg in getattr(launcher.tuned, "cache", {}).items():
            meta = ", ".join(f"{k} {v}" for k, v in cfg.kwargs.items())
            rows.append({"kernel": name, "key": ", ".join(map(str, key)),
                         "config": f"{meta}, {cfg.num_warps} warps, {cfg.num_stages} stages"})
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
        n_params = sum(p.numel() for p in model.parameters())
        wpe = getattr(getattr(model, "transformer", None), "wpe", None)
        n_params -= wpe.weight.numel() if wpe is not None else 0
        tokens = batch * cfg.block_size
        head_dim = cfg.n_embd // cfg.n_head
        # nanoGPT's estimate: 6N per token for the matmuls plus 12·L·H·Q·T for attention (non-causal count).
        flops = tokens * (6 * n_params + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.block_size)
        sdpa_ms = ms if impl == "sdpa" else sdpa_ms
        rows.append({"attn_impl": impl, "batch": f"{batch}x{cfg.block_size}", "ms/step": ms,
                     "tokens/s": ratio(tokens * 1e3, ms),
                     "MFU %": None if ms is None or not peak_tflops else flops / (ms * 1e-3) / (peak_tflops * 1e10),
                     "sdpa/impl time": ratio(sdpa_ms, ms)})
        print(f"  train step {impl}: {fmt(ms)} ms", file=sys.stderr)
        torch.cuda.empty_cache()
    return rows


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU; none here, nothing to benchmark.")
        return
    import triton

    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    header = (f"## Triton kernel benchmarks\n\n{name}, torch {torch.__version__}, triton {triton.__version__}, bf16; "
              f"median ms (CUDA events); ratios > 1 mean the Triton kernel is faster; MFU peak "
              f"{fmt(peak)} TFLOP/s.\n")
    tables = {
        "Causal attention (FLOPs: causal half of 4·B·H·T²·D forward, 3.5× for fwd+bwd)": attention_rows(args.quick),
        "LoRA linear (y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ; base = frozen x Wᵀ + b alone)": lora_rows(args.quick),
        "Training step, default 6-layer GPT, bf16 autocast, fused AdamW": train_step_rows(args.quick, peak),
    }
    tables["Autotuned configs (key: the launcher's tuning key, then the tensor dtypes)"] = tuned_rows()
    text = header + "\n" + "\n".join(markdown(title, rows) for title, rows in tables.items() if rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        payload = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "peak_tflops": peak,
                   "tables": tables}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1, ensure_ascii=False))
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
