#!/usr/bin/env bash
# Everything a lent GPU should show, in one call (a few minutes): CUDA kernel tests, a float32
# precision check of the LoRA kernel's gradients, the kernel benchmarks, and a short real
# training run of the 6-layer model. Results go to $OUT (default out/gpu).
#   OUT=out/gpu bash bench/gpu_session.sh      (data/corpus must be prepared: see README)
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$OUT/device.txt"

echo "== LoRA kernel, float32 gradients against float64, per tl.dot precision" | tee "$OUT/lora_fp32.txt"
timeout 80 python3 - <<'PY' 2>&1 | tee -a "$OUT/lora_fp32.txt"
import torch
import kernels.lora_linear as L
torch.manual_seed(0)
N, K, O, R, s = 256, 512, 384, 8, 2.0
dev = "cuda"
x = torch.randn(N, K, device=dev)
w = torch.randn(O, K, device=dev) / K ** 0.5
b = torch.randn(O, device=dev)
a = torch.randn(R, K, device=dev) / K ** 0.5
bb = torch.randn(O, R, device=dev)
dy = torch.randn(N, O, device=dev)
ref = [t.double().requires_grad_() for t in (x, a, bb)]
y_ref = ref[0] @ w.double().T + b.double() + s * (ref[0] @ ref[1].T) @ ref[2].T
g_ref = torch.autograd.grad(y_ref, ref, dy.double())
for prec in ("tf32x3", "tf32", "ieee"):
    L._dot_precision = lambda dtype, p=prec: p
    ins = [t.clone().requires_grad_() for t in (x, a, bb)]
    try:
        y = L.lora_linear(ins[0], w, b, ins[1], ins[2], s)
        g = torch.autograd.grad(y, ins, dy)
    except Exception as e:
        print(prec, "failed:", type(e).__name__, str(e)[:200]); continue
    rel = lambda u, v: ((u.double() - v).norm() / v.norm()).item()
    print(f"{prec:7s} y {rel(y, y_ref):.1e}  dx {rel(g[0], g_ref[0]):.1e}  dA {rel(g[1], g_ref[1]):.1e}  "
          f"dB {rel(g[2], g_ref[2]):.1e}", flush=True)
PY

echo "== CUDA kernel tests" | tee "$OUT/tests.txt"
timeout 110 python3 -m pytest tests/test_kernels.py -q -x -k "cuda or bf16 or model" -p no:cacheprovider 2>&1 \
  | tail -25 | tee -a "$OUT/tests.txt"

echo "== kernel benchmarks"
timeout 130 python3 bench/kernels.py --quick --out "$OUT/kernels.md" > "$OUT/kernels.log" 2>&1
tail -40 "$OUT/kernels.log"

echo "== a short real training run (6 layers, 768 dims, bf16, corpus data)"
timeout 60 python3 train.py config/pretrain.py --data_dir=data/corpus --out_dir="$OUT/train" --max_iters=60 \
  --batch_size=16 --grad_accum=1 --warmup_iters=10 --eval_interval=60 --eval_iters=5 --log_interval=20 \
  --dtype=bfloat16 --progress=False > "$OUT/train.log" 2>&1
tail -4 "$OUT/train.log"
grep '"split": "train"' "$OUT/train/metrics.jsonl" | tail -2 | tee "$OUT/train_tail.txt"
